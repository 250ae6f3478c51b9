"""Where code runs: the device, and the one autocast choice for it."""

from __future__ import annotations

import contextlib

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device, *, training: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU. Inference falls back to fp16 on a GPU
    without bf16; training keeps bf16 there (fp16 would need a GradScaler, bf16 needs none)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if training or torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16)
