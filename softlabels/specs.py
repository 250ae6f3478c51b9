"""Model specs: one grammar for teachers and students.

Spec forms::

    builtin:<arch>              softlabels.models (cnn, mlp, resmlp, linear); sized from the dataset
    torchvision:<arch>          torchvision.models.get_model(arch, weights=None, num_classes=...)
    timm:<arch>                 timm.create_model(arch, pretrained=False, num_classes=...) (needs timm)
    package.module:factory      factory(num_classes=...) if it takes num_classes, else factory()

Nothing is downloaded: torchvision and timm models are built without pretrained weights.
Initialisation is seeded inside a forked RNG, so a spec always gives the same model.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import re

import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.models import build_model, list_models

__all__ = ["SPEC_FORMS", "build_from_spec", "find_classifier", "suggest", "describe_specs"]

SPEC_FORMS = "builtin:<arch>, torchvision:<arch>, timm:<arch> or package.module:factory"
_CLASSIFIER_NAMES = ("classifier", "fc", "head", "heads.head", "head.fc", "last_linear")


def build_from_spec(
    spec: str, input_shape: tuple[int, ...], num_classes: int | None, *, seed: int | None = 0, role: str = "teacher"
) -> nn.Module:
    """Instantiate the (untrained) model named by ``spec`` for inputs of ``input_shape`` with
    ``num_classes`` outputs. ``role`` ("teacher" or "student") words the errors. ``seed=None``
    initialises from the caller's RNG (a trainer that seeds once for the student and its loss)."""
    if seed is None:
        return _build(spec.strip(), tuple(input_shape), num_classes, role)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec.strip(), tuple(input_shape), num_classes, role)


def _build(spec: str, input_shape: tuple[int, ...], num_classes: int | None, role: str) -> nn.Module:
    kind, sep, target = spec.partition(":")
    kind, target = kind.strip(), target.strip()
    if not sep or not kind or not target:
        raise SpecError(f"{role} spec '{spec}' is not one of {SPEC_FORMS}")
    if kind == "builtin":
        if num_classes is None:
            raise SpecError(f"{role} {spec} needs the number of classes (from the dataset)")
        return build_model(target, input_shape, num_classes)
    if kind == "torchvision":
        return _torchvision(target, num_classes)
    if kind == "timm":
        if importlib.util.find_spec("timm") is None:
            raise SpecError(f"{role} {spec} needs timm, which is not installed: pip install timm")
        import timm

        if not timm.is_model(target):
            raise SpecError(f"timm has no model '{target}'{suggest(target, timm.list_models())}")
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(target, pretrained=False, **kwargs)
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", kind) and target.isidentifier():
        return _factory(kind, target, num_classes, role)
    raise SpecError(f"{role} spec '{spec}' is not one of {SPEC_FORMS}")


def suggest(name: str, choices: list[str]) -> str:
    """`` (did you mean a, b?)`` for close matches of ``name``, else ``""``."""
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _torchvision(arch: str, num_classes: int | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if arch not in known:
        raise SpecError(f"torchvision has no model '{arch}'{suggest(arch, known)}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _factory(module_name: str, attr: str, num_classes: int | None, role: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SpecError(
                f"cannot import module '{module_name}' for the {role} (install it or put it on PYTHONPATH)"
            ) from None
        raise SpecError(f"importing '{module_name}' for the {role} failed: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"module '{module_name}' has no callable '{attr}'")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    takes_classes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:  # user code (README: package.module:factory runs that module's code)
        model = factory(num_classes=num_classes) if takes_classes and num_classes is not None else factory()
    except SystemExit as exc:
        raise SpecError(
            f"{role} factory {module_name}:{attr}() tried to exit the program (SystemExit {exc.code!r}); a factory must "
            "return a torch.nn.Module"
        ) from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"{module_name}:{attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final ``nn.Linear`` (the layer producing the logits): a conventionally named one
    (``classifier``, ``fc``, ``head``, ... or the last Linear inside such a Sequential), else the
    last ``nn.Linear`` registered in the model."""
    modules = dict(model.named_modules())
    for name in _CLASSIFIER_NAMES:
        module = modules.get(name)
        if isinstance(module, nn.Linear):
            return name, module
        if isinstance(module, nn.Sequential):
            inner = [(f"{name}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
            if inner:
                return inner[-1]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise SpecError(
            f"{type(model).__name__} has no nn.Linear layer; softlabels needs the logits to come from a final "
            "nn.Linear (classifier weights and penultimate features are read from it)"
        )
    return linears[-1]


def describe_specs() -> str:
    """One line for help texts."""
    return f"{SPEC_FORMS}; built-in archs: {', '.join(list_models())}"
