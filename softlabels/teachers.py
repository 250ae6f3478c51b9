"""Teachers: a model named by a spec, loaded with a checkpoint, checked before any dump.

Specs (``builtin:<arch>``, ``torchvision:<arch>``, ``timm:<arch>``, ``package.module:factory``)
are built by :mod:`softlabels.specs`, the grammar students share.

Weights are never downloaded: pretrained weights come from the ``weights`` file, read with
``torch.load(..., weights_only=True)`` (tensors and plain containers only; nothing else is ever
unpickled). The file may hold a state_dict, or a dict with a ``state_dict`` or ``model`` entry
holding one; a ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix on every
key is stripped. Mismatches are reported by key before anything is loaded.

Before a teacher is returned it is run once on a random batch of ``input_shape`` to check that
it produces logits ``[B, C]`` and that those logits are exactly the output of the classifier
(the final ``nn.Linear``), whose weights and input KD-sim and feature dumps rely on.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.specs import build_from_spec, find_classifier, suggest as _suggest

__all__ = [
    "Teacher",
    "load_teacher",
    "build_teacher_model",
    "find_classifier",
    "classifier_parameters",
    "FeatureRecorder",
    "load_state_dict_file",
]

_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Teacher:
    """A ready teacher: ``model`` in eval mode plus the identity stores record."""

    model: nn.Module
    spec: str
    checkpoint_sha256: str | None
    num_classes: int
    classifier_name: str

    def to_dict(self) -> dict:
        """JSON identity for store metadata (architecture, weights hash, output size)."""
        model_type = type(self.model)
        return {
            "spec": self.spec,
            "checkpoint_sha256": self.checkpoint_sha256,
            "num_classes": int(self.num_classes),
            "classifier_name": self.classifier_name,
            "model_class": f"{model_type.__module__}.{model_type.__qualname__}",
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
        }


# --------------------------------------------------------------------------- model construction


def build_teacher_model(spec: str, input_shape: tuple[int, ...], num_classes: int | None, *, seed: int = 0) -> nn.Module:
    """Instantiate the (untrained) model named by a teacher spec (:mod:`softlabels.specs`)."""
    return build_from_spec(spec, input_shape, num_classes, seed=seed, role="teacher")


# --------------------------------------------------------------------------- checkpoints


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` safely (``weights_only=True``), unwrapping the usual
    containers; a one-line :class:`SpecError` for anything else."""
    if not os.path.isfile(path):
        raise SpecError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise SpecError(f"checkpoint {path} is not a torch checkpoint (expected a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise SpecError(
            f"checkpoint {path} is not a plain state_dict: loading it would unpickle Python objects{what}, "
            "which softlabels never does; re-save it with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise SpecError(f"checkpoint {path} cannot be read by torch.load: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(obj, torch.Tensor):
        raise SpecError(f"checkpoint {path} holds a single tensor, not a state_dict (a dict of parameter tensors)")
    if not isinstance(obj, Mapping):
        raise SpecError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    if not _is_state_dict(obj):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None or not _is_state_dict(inner):
            bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), "?")
            raise SpecError(
                f"checkpoint {path} is not a state_dict: entry '{bad}' is a {type(obj[bad]).__name__}, "
                "not a tensor, and there is no 'state_dict' or 'model' entry holding one"
            )
        obj = inner
    state = dict(obj)
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise SpecError(
                f"checkpoint {path} does not fit the model: '{key}' has shape {list(value.shape)} "
                f"in the checkpoint but {list(expected[key].shape)} in the model"
            )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_names(unexpected)}")
        raise SpecError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- classifier & features


def classifier_parameters(teacher: Teacher) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's classifier weight ``[C, D]`` and bias ``[C]`` (or ``None``), float32."""
    module = teacher.model.get_submodule(teacher.classifier_name)
    weight = module.weight.detach().cpu().float().numpy().copy()
    bias = None if module.bias is None else module.bias.detach().cpu().float().numpy().copy()
    return weight, bias


class FeatureRecorder:
    """Capture intermediate features during forward passes, as float32 ``[B, D]``.

    ``layers`` maps a store name to a module name; ``"penultimate"`` means the *input* of the
    classifier (flattened to ``[B, D]``). Any other module contributes its *output*: 2-D outputs
    as they are, higher-rank outputs treated as channels-first ``[B, C, *spatial]`` and
    global-average-pooled over the spatial dims to ``[B, C]``. A module that runs several
    times in one forward keeps its last call. Use as a context manager (hooks are removed on
    exit); after each forward, ``recorder.features`` holds the captures (detached, same device)::

        with FeatureRecorder(model, {"penultimate": "penultimate"}) as rec:
            logits = model(x)
            feats = rec.features["penultimate"]
    """

    def __init__(self, model: nn.Module, layers: dict[str, str]) -> None:
        self.model = model
        self.layers = dict(layers)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []
        modules = dict(model.named_modules())
        self._targets: dict[str, tuple[nn.Module, bool]] = {}
        for store_name, module_name in self.layers.items():
            if module_name == "penultimate":
                _, module = find_classifier(model)
                self._targets[store_name] = (module, True)
            elif module_name in modules and module_name:
                self._targets[store_name] = (modules[module_name], False)
            else:
                top = [n for n, _ in model.named_children()]
                raise SpecError(
                    f"the teacher has no module '{module_name}'{_suggest(module_name, [n for n in modules if n])}; "
                    f"top-level modules: {', '.join(top)} (or 'penultimate')"
                )

    def __enter__(self) -> FeatureRecorder:
        for store_name, (module, is_input) in self._targets.items():
            if is_input:
                hook = module.register_forward_pre_hook(self._input_hook(store_name))
            else:
                hook = module.register_forward_hook(self._output_hook(store_name))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_hook(self, store_name: str):
        def hook(module, args):
            self.features[store_name] = args[0].detach().flatten(1).float()

        return hook

    def _output_hook(self, store_name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise SpecError(f"module for '{store_name}' returned {type(output).__name__}, not a tensor")
            out = output.detach().float()
            if out.ndim > 2:
                out = out.mean(dim=tuple(range(2, out.ndim)))
            self.features[store_name] = out.reshape(out.shape[0], -1)

        return hook


# --------------------------------------------------------------------------- loading


def _check_outputs(model: nn.Module, classifier_name: str, input_shape: tuple[int, ...], spec: str) -> int:
    """One forward on a seeded random batch: logits must be ``[B, C]`` and equal the classifier's output."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape, generator=generator)
    classifier = model.get_submodule(classifier_name)
    captured: list[torch.Tensor] = []
    handle = classifier.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            logits = model(x)
    except RuntimeError as exc:
        raise SpecError(
            f"teacher {spec} cannot run on inputs of shape {list(input_shape)}: {str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SpecError(f"teacher {spec} returned {got} in eval mode; expected logits [batch, classes]")
    if not captured or captured[-1].shape != logits.shape or not torch.allclose(
        captured[-1], logits, rtol=0.0, atol=0.0, equal_nan=True  # NaN logits are the dump's to report
    ):
        raise SpecError(
            f"teacher {spec}: the logits are not the output of its final nn.Linear '{classifier_name}' "
            "(something runs after it); softlabels needs logits = classifier(penultimate features)"
        )
    return int(logits.shape[1])


def load_teacher(spec: str, weights: str | None, *, input_shape: tuple[int, ...], num_classes: int | None) -> Teacher:
    """Build the teacher named by ``spec``, load ``weights`` (a state_dict file), check it on
    ``input_shape`` and return it in eval mode. ``num_classes`` (from the dataset) sizes the
    output layer where the spec form allows and must match the teacher's output."""
    spec = spec.strip()
    model = build_teacher_model(spec, input_shape, num_classes)
    sha = None
    if weights is not None:
        path = os.fspath(weights)
        state = load_state_dict_file(path)
        _load_weights(model, state, path)
        sha = _sha256_file(path)
    model.eval()
    classifier_name, classifier = find_classifier(model)
    outputs = _check_outputs(model, classifier_name, tuple(input_shape), spec)
    if num_classes is not None and outputs != num_classes:
        raise SpecError(f"teacher {spec} outputs {outputs} classes but the dataset has {num_classes}")
    return Teacher(model=model, spec=spec, checkpoint_sha256=sha, num_classes=outputs, classifier_name=classifier_name)
