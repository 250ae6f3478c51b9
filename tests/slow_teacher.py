"""A user-style model factory (``slow_teacher:make``): a small MLP that sleeps 0.25 s per batch, so
that a one-unit dump takes long enough to report progress between batches."""

import time

import torch
from torch import nn


class Slow(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Linear(40, 16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        if x.shape[0] > 1:  # not the one-row probe
            time.sleep(0.25)
        return self.classifier(torch.relu(self.body(x.flatten(1))))


def make(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return Slow(num_classes)
