"""Students: any ``nn.Module`` mapping a batch of inputs to ``[B, C]`` logits.

:func:`build_student` takes the teacher grammar (:mod:`softlabels.specs`) -- ``torchvision:<arch>``,
``timm:<arch>``, ``package.module:factory``, ``builtin:<arch>`` (a bare ``<arch>`` means builtin) --
built with the store's number of classes and no downloaded weights. :func:`check_student` runs
one probe batch and refuses a student whose output is not ``[B, num_classes]``.
:class:`StudentFeatures` captures the output of any named module (the hint layer).
"""

from __future__ import annotations

import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.models import list_models
from softlabels.specs import SPEC_FORMS, build_from_spec, find_classifier, suggest

__all__ = ["build_student", "check_student", "StudentFeatures", "PENULTIMATE"]

#: The hint layer name meaning "the input of the student's classifier" (its final nn.Linear).
PENULTIMATE = "penultimate"


def build_student(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The untrained student named by ``spec``, initialised from the caller's torch RNG."""
    spec = spec.strip()
    if ":" not in spec:
        spec = f"builtin:{spec}"
    kind, _, arch = spec.partition(":")
    if kind.strip() == "builtin" and arch.strip().lower() not in list_models():
        raise SpecError(
            f"unknown student spec '{spec}'; built-in archs: {', '.join(list_models())} "
            f"(any other student: {SPEC_FORMS})"
        )
    return build_from_spec(spec, input_shape, num_classes, seed=None, role="student")


def _probe(input_shape: tuple[int, ...]) -> torch.Tensor:
    """Two seeded random inputs (a private generator: the caller's RNG is not advanced)."""
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))


def check_student(model: nn.Module, spec: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """One forward (eval mode, no grad) on a probe batch: the logits must be ``[2, num_classes]``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(_probe(input_shape))
    except RuntimeError as exc:
        raise SpecError(
            f"student {spec} cannot run on inputs of shape {list(input_shape)}: {str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"student {spec} returned {got}; a student must return logits [batch, classes]")
    if out.shape[1] != num_classes:
        raise SpecError(
            f"student {spec} outputs {out.shape[1]} classes but the store has {num_classes}; build it with "
            f"num_classes={num_classes} (specs get it automatically)"
        )


class StudentFeatures:
    """The hint layer: captures, on every forward, the output of the module named ``layer``
    (``"penultimate"``: the input of the classifier). With ``pool=True`` a map
    ``[B, C, *spatial]`` is global-average-pooled to ``[B, C]`` (to regress a stored vector).
    ``value`` holds the last capture (with its graph); ``shape`` its per-sample shape once
    :meth:`probe` has run."""

    def __init__(self, model: nn.Module, layer: str = PENULTIMATE, *, pool: bool = True) -> None:
        self.layer = layer
        self.pool = pool
        self.value: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None
        modules = dict(model.named_modules())
        if layer == PENULTIMATE:
            _, head = find_classifier(model)
            self._handle = head.register_forward_pre_hook(lambda m, args: self._keep(args[0]))
        elif layer and layer in modules:
            self._handle = modules[layer].register_forward_hook(lambda m, args, out: self._keep(out))
        else:
            names = [n for n in modules if n]
            top = [n for n, _ in model.named_children()]
            raise SpecError(
                f"the student has no module '{layer}'{suggest(layer, names)}; top-level modules: "
                f"{', '.join(top)} (or 'penultimate', the classifier's input); pass --student-feature-layer NAME"
            )

    def _keep(self, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):
            raise SpecError(f"student module '{self.layer}' returned {type(out).__name__}, not a tensor")
        if self.layer == PENULTIMATE:
            out = out.flatten(1)
        elif out.ndim > 2 and self.pool:
            out = out.mean(dim=tuple(range(2, out.ndim)))
        self.value = out

    def probe(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape of the hint features, from one probe forward (eval mode, no grad)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(_probe(input_shape))
        finally:
            model.train(was_training)
        self.shape = tuple(int(d) for d in self.value.shape[1:])
        self.value = None
        return self.shape

    def remove(self) -> None:
        self._handle.remove()
