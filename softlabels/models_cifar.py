"""CIFAR ResNets (He et al. 2016, section 4.2): ``resnet20`` and ``resnet56``, the student and
teacher of Tang et al. 2020's CIFAR-100 table (and of RepDistiller's resnet56 -> resnet20 pair).

A 3x3 conv with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64 channels
(stride 2 at the start of stages 2 and 3), global average pooling and the ``classifier``
``nn.Linear``; depth ``6n + 2`` (n = 3: 20 layers, 269,722 parameters for 10 classes; n = 9: 56
layers, 853,018). Shortcuts are option A of the paper (identity; where the shape changes, a
stride-2 subsample zero-padded to the new channel count), Kaiming-normal conv init. Inputs are
``(C, H, W)`` images of any size (32x32 for CIFAR).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from softlabels.errors import SpecError
from softlabels.models import register_model

__all__ = ["CifarResNet"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and not block else 1))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _cifar_resnet(name: str, n: int):
    @register_model(name)
    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise SpecError(f"{name}: needs (C, H, W) image inputs, got shape {input_shape}")
        return CifarResNet(n, input_shape[0], num_classes)

    return factory


resnet20 = _cifar_resnet("resnet20", 3)
resnet56 = _cifar_resnet("resnet56", 9)
