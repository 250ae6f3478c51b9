"""A user-style model factory (``wide_teacher:make``) whose logits span far more than the float16
range: five classes with ordinary logits, five whose log-probabilities lie below -65504."""

import torch
from torch import nn


class WideLogits(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Linear(40, 16)
        self.classifier = nn.Linear(16, num_classes)
        with torch.no_grad():
            far = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -7e4, -1e5, -2e5, -3e5, -5e5])
            self.classifier.bias.copy_(far[:num_classes])

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x.flatten(1))))


def make(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return WideLogits(num_classes)
