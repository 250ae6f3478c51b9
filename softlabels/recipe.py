"""The optimisation recipe of a student run, named as timm's and torchvision's reference scripts
name it: optimizer (``sgd`` with Nesterov-free momentum, ``adamw``, ``adam``), learning rate,
weight decay (never on norms and biases: parameters with fewer than 2 dims), a per-step schedule
(``cosine`` to 0, ``step`` by ``decay_rate`` every ``decay_epochs``, ``constant``) after a linear
warm-up of ``warmup_epochs``, mixed precision, channels-last and gradient-norm clipping.

The defaults (Adam, cosine, no warm-up, no decay) are the trainer's historical recipe, so runs on
the built-in datasets are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from softlabels.defaults import RECIPE_DEFAULTS
from softlabels.errors import SpecError

__all__ = ["Recipe", "OPTIMIZERS", "SCHEDULES", "param_groups", "build_optimizer", "build_scheduler", "Precision"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
WARMUP_START = 0.01  # warm-up starts at this fraction of --lr (torchvision's --lr-warmup-decay default)


@dataclass(frozen=True)
class Recipe:
    optimizer: str = RECIPE_DEFAULTS["optimizer"]
    lr: float = RECIPE_DEFAULTS["lr"]
    momentum: float = RECIPE_DEFAULTS["momentum"]
    weight_decay: float = RECIPE_DEFAULTS["weight_decay"]
    schedule: str = RECIPE_DEFAULTS["schedule"]
    warmup_epochs: float = RECIPE_DEFAULTS["warmup_epochs"]
    decay_epochs: float = RECIPE_DEFAULTS["decay_epochs"]
    decay_rate: float = RECIPE_DEFAULTS["decay_rate"]
    amp: bool = False
    channels_last: bool = False
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise SpecError(f"learning rate must be > 0, got {self.lr}")
        checks = {
            "--momentum": (self.momentum, 0 <= self.momentum < 1, "must be in [0, 1)"),
            "--weight-decay": (self.weight_decay, self.weight_decay >= 0, "must be >= 0"),
            "--warmup-epochs": (self.warmup_epochs, self.warmup_epochs >= 0, "must be >= 0"),
            "--decay-epochs": (self.decay_epochs, self.decay_epochs > 0, "must be > 0"),
            "--decay-rate": (self.decay_rate, 0 < self.decay_rate <= 1, "must be in (0, 1]"),
        }
        for flag, (value, ok, problem) in checks.items():
            if not ok:
                raise SpecError(f"{flag} {value:g} {problem}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise SpecError(f"--grad-clip {self.grad_clip:g} must be > 0 (omit it to not clip)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """One group, or -- with weight decay -- a decayed group (weights with >= 2 dims) and an
    undecayed one (norm scales, biases, other vectors), like timm's ``param_groups_weight_decay``."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(recipe: Recipe, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    groups = param_groups(modules, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(groups, lr=recipe.lr)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    """A per-step scheduler (call ``step()`` after every optimizer step): linear warm-up over
    ``warmup_epochs`` from ``WARMUP_START * lr``, then the schedule over the remaining steps."""
    steps = epochs * steps_per_epoch
    warmup = min(int(round(recipe.warmup_epochs * steps_per_epoch)), max(steps - 1, 0))
    main_steps = max(steps - warmup, 1)
    lr_sched = torch.optim.lr_scheduler
    if recipe.schedule == "cosine":
        main = lr_sched.CosineAnnealingLR(optimizer, T_max=main_steps)
    elif recipe.schedule == "step":
        step_size = max(int(round(recipe.decay_epochs * steps_per_epoch)), 1)
        main = lr_sched.StepLR(optimizer, step_size=step_size, gamma=recipe.decay_rate)
    else:
        main = lr_sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = lr_sched.LinearLR(optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warmup)
    return lr_sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class Precision:
    """The ``--amp`` policy for a device: bf16 autocast on CUDA where supported, else fp16 with a
    gradient scaler; full precision on CPU (and without ``--amp``)."""

    def __init__(self, amp: bool, device: torch.device) -> None:
        self.dtype: torch.dtype | None = None
        if amp and device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return "off" if self.dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16+scaler"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float | None
    ) -> None:
        """``zero_grad``, backward, optional clipping of the global grad norm, step."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
