"""Training checkpoints: everything a run needs to continue bit-identically, without pickle.

``OUT/checkpoint.pt`` is a ``torch.save`` of a dict holding only tensors, plain containers and
one JSON string, so ``torch.load(path, weights_only=True)`` reads it::

    {"format": "softlabels-checkpoint", "version": 1,
     "json":      JSON text: epoch (epochs completed), step (optimizer steps), sampler position
                  (epoch, batch), run arguments, history, numpy/python RNG scalars,
     "model":     student state_dict,        "loss":      the method's state_dict (e.g. regressor),
     "optimizer": optimizer.state_dict(),    "scheduler": scheduler.state_dict(),
     "scaler":    GradScaler state or {},
     "rng":       {"torch": uint8, "numpy": uint32 [624], "python": int64 [625], "cuda": [uint8, ...]}}

It is written to ``checkpoint.pt.tmp`` and renamed over the old one, so a run killed at any
moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels.errors import SpecError

__all__ = [
    "CHECKPOINT", "save_checkpoint", "load_checkpoint", "resume_run", "capture_rng", "restore_rng", "argument_differences",
]

CHECKPOINT = "checkpoint.pt"
_FORMAT, _VERSION = "softlabels-checkpoint", 1


def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """The torch (CPU and CUDA), numpy-global and python RNG states as (tensors, JSON scalars)."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    tensors: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).astype(np.int64)),
        "python": torch.tensor(py_words, dtype=torch.int64),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    scalars = {
        "numpy": {"kind": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "gauss": py_gauss},
    }
    return tensors, scalars


def restore_rng(tensors: dict[str, Any], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if tensors.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    n = scalars["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = scalars["python"]
    random.setstate((p["version"], tuple(int(w) for w in tensors["python"].tolist()), p["gauss"]))


def _cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    return state


def save_checkpoint(path: str | Path, *, info: dict[str, Any], model, loss, optimizer, scheduler, scaler=None) -> None:
    """Write the checkpoint atomically (temp file, fsync, rename). ``info`` is the JSON part."""
    rng, rng_scalars = capture_rng()
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "json": json.dumps({**info, "rng": rng_scalars}, sort_keys=True),
        "model": _cpu(model.state_dict()),
        "loss": _cpu(loss.state_dict()),
        "optimizer": _cpu(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "scaler": {} if scaler is None else scaler.state_dict(),
        "rng": rng,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(info, payload)`` of a checkpoint, read with ``weights_only=True``; a one-line
    :class:`SpecError` when it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"--resume: there is no checkpoint at {path}; run without --resume to start the run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise SpecError(f"--resume: {path} cannot be read ({str(exc).splitlines()[0][:160]}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise SpecError(f"--resume: {path} is not a softlabels training checkpoint")
    if int(payload.get("version", 0)) > _VERSION:
        raise SpecError(f"--resume: {path} has checkpoint version {payload['version']}; upgrade softlabels")
    return json.loads(payload["json"]), payload


def argument_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["--lr 0.1 in the checkpoint, 0.05 now", ...]`` for every argument that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            flag = "--" + key.replace("_", "-")
            out.append(f"{flag} {json.dumps(a, default=str)} in the checkpoint, {json.dumps(b, default=str)} now")
    return out


def resume_run(path: str | Path, run_args: dict[str, Any], *, model, loss, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the run's objects and the RNGs, after checking that
    it was written with ``run_args``; returns its JSON part (epoch, step, history, ...)."""
    info, payload = load_checkpoint(path)
    differences = argument_differences(info["args"], run_args)
    if differences:
        raise SpecError(
            f"cannot resume from {path}: the arguments differ ({'; '.join(differences)}); rerun with the "
            "checkpoint's arguments, or train into a new --out"
        )
    model.load_state_dict(payload["model"])
    loss.load_state_dict(payload["loss"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    restore_rng(payload["rng"], info["rng"])
    return info
