"""Built-in architectures, sized for the built-in datasets, in a timm-style registry.

Every model ends in an ``nn.Linear`` attribute named ``classifier`` whose input is the
penultimate feature, so distillation methods that need the teacher's classifier weights or
features (KD-sim, feature dumps) find them without configuration.

* ``mlp`` -- flatten, 100-100 ReLU MLP: the MNIST-1D student baseline (40-100-100-10).
* ``cnn`` -- for 1D inputs ``(L,)``/``(C, L)``: MNIST-1D's 3-conv baseline layout (kernels
  5/3/3, strides 2, ReLU, flatten, linear) widened from 25 to 64 channels so the teacher is
  larger than the ``mlp`` student (28k vs 15k parameters on MNIST-1D) and reaches ~92-93% test
  accuracy in 20-40 epochs (25 channels: ~90% after 60); for images ``(C, H, W)``: a 3-stage
  conv-BN-ReLU network with global average pooling.
* ``resmlp`` -- flatten, 256-wide residual MLP (2 pre-norm blocks): a teacher for ``synthetic``.
* ``linear`` -- flatten + ``classifier``: multinomial logistic regression.
* ``tangmlp-<W>`` (W in 8, 16, 32, 64, 128, 256, 512) -- the MLP of Tang et al. 2020's synthetic
  study: two ReLU layers of width W with batch norm, a residual connection around the second,
  and a cosine classifier (L2-normalised weight rows and penultimate activations, times a
  learned scale, no bias). A wide one is the teacher, a narrow one the student.
* ``resnet20`` / ``resnet56`` (:mod:`softlabels.models_cifar`) -- the CIFAR ResNets of He et al.
  2016 (3 stages of 16/32/64 channels, 3n+3n+3n basic blocks, option-A shortcuts).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.registry import Registry

__all__ = ["register_model", "build_model", "list_models"]

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
_REGISTRY: Registry[ModelFactory] = Registry("model")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(input_shape, num_classes) -> nn.Module`` as ``name``."""
    return _REGISTRY.register(name)


def list_models() -> list[str]:
    return _REGISTRY.names()


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate a registered architecture for inputs of ``input_shape`` (one sample)."""
    key = arch.strip().lower()
    factory = _REGISTRY.get(
        key,
        f"unknown architecture '{arch}'; built-ins: {', '.join(list_models())} "
        "(any other model: torchvision:<name>, timm:<name> or package.module:factory)",
    )
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise SpecError(f"{key}: input shape {shape} must be non-empty with positive sizes")
    if num_classes < 1:
        raise SpecError(f"{key}: num_classes must be >= 1, got {num_classes}")
    return factory(shape, int(num_classes))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), (100, 100), num_classes)


@register_model("linear")
def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), (), num_classes)


def _conv_len(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1d(nn.Module):
    """MNIST-1D's ConvBase layout: conv(5,s2)-conv(3,s2)-conv(3,s2), flatten, linear."""

    def __init__(self, in_channels: int, length: int, num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.unsqueeze = in_channels == 0  # (L,) inputs get a channel axis
        c_in = max(in_channels, 1)
        self.features = nn.Sequential(
            nn.Conv1d(c_in, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        out_len = _conv_len(_conv_len(_conv_len(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        if out_len < 1:
            raise SpecError(f"cnn: 1D inputs of length {length} are too short (need >= 3)")
        self.classifier = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unsqueeze:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


class CNN2d(nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels), 2x2 max-pool between stages while the
    map is at least 8 pixels wide, global average pooling, linear classifier."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = in_channels, min(height, width)
        for i, c_out in enumerate((32, 64, 128)):
            if i and size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) == 1:
        return CNN1d(0, input_shape[0], num_classes)
    if len(input_shape) == 2:
        return CNN1d(input_shape[0], input_shape[1], num_classes)
    if len(input_shape) == 3:
        return CNN2d(*input_shape, num_classes)
    raise SpecError(f"cnn: supports (L,), (C, L) and (C, H, W) inputs, got shape {input_shape}")


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            *(ResidualBlock(width) for _ in range(depth)),
            nn.LayerNorm(width),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("resmlp")
def resmlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResMLP(math.prod(input_shape), num_classes)


class CosineClassifier(nn.Linear):
    """``logits = scale * <x / |x|, w_c / |w_c|>``: an ``nn.Linear`` (no bias) whose weight rows
    and input are L2-normalised, times a learned ``scale`` (init 10: cosines alone, in [-1, 1],
    cannot make a confident softmax). ``weight`` is the raw matrix, so stores and KD-sim read it
    like any classifier's (KD-sim normalises its rows itself)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit_x = nn.functional.normalize(x, dim=-1)
        return self.scale * nn.functional.linear(unit_x, nn.functional.normalize(self.weight, dim=-1))


class TangMLP(nn.Module):
    """``h1 = relu(bn(W1 x))``, ``h2 = h1 + relu(bn(W2 h1))``, ``logits = cosine(h2)``."""

    def __init__(self, in_features: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(in_features, width), nn.BatchNorm1d(width)
        self.fc2, self.bn2 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.classifier = CosineClassifier(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.classifier(h + torch.relu(self.bn2(self.fc2(h))))


def _register_tangmlp(width: int) -> None:
    @register_model(f"tangmlp-{width}")
    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return TangMLP(math.prod(input_shape), num_classes, width)


for _width in (8, 16, 32, 64, 128, 256, 512):
    _register_tangmlp(_width)


from softlabels import models_cifar  # noqa: E402,F401  (registers resnet20, resnet56)
