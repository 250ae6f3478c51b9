"""User-style teacher factories (``slow_teacher:make``, ``slow_teacher:other``). ``make`` is a small
MLP that sleeps 0.25 s per batch (a one-unit dump then reports progress between batches); with
``SLOW_TEACHER_GATE`` set it instead makes a dump race deterministic: after
``SLOW_TEACHER_FREE_BATCHES`` batches, its forward waits while the file named by the gate exists
(the test removes it when the race is set up)."""

import os
import time

import torch
from torch import nn

_batches = {"n": 0}


class Gated(nn.Module):
    def __init__(self, num_classes: int, gated: bool) -> None:
        super().__init__()
        self.body = nn.Linear(40, 16)
        self.classifier = nn.Linear(16, num_classes)
        self.gated = gated

    def forward(self, x):
        if self.gated and x.shape[0] > 1:  # the driver's one-row probe is never held
            _batches["n"] += 1
            gate = os.environ.get("SLOW_TEACHER_GATE")
            if gate and _batches["n"] > int(os.environ.get("SLOW_TEACHER_FREE_BATCHES", "0")):
                while os.path.exists(gate):
                    time.sleep(0.05)
            elif not gate:
                time.sleep(0.25)
        return self.classifier(torch.relu(self.body(x.flatten(1))))


def make(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return Gated(num_classes, gated=True)


def other(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(1)
    return Gated(num_classes, gated=False)
