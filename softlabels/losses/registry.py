"""register_method / list_methods / build_method, on the one registry helper (:mod:`softlabels.registry`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from softlabels.errors import SpecError
from softlabels.losses.method import STORE_CONSTANTS, DistillationMethod
from softlabels.registry import Registry


_REGISTRY: Registry[type[DistillationMethod]] = Registry("method")


def _check_method(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, DistillationMethod)):
        raise TypeError(f"@register_method({name!r}) must decorate a DistillationMethod subclass")


def register_method(name: str) -> Callable[[type[DistillationMethod]], type[DistillationMethod]]:
    """Class decorator (timm-style): ``@register_method("kd-topk")``. Names are unique."""
    register = _REGISTRY.register(name, check=lambda cls: _check_method(name, cls))

    def decorator(cls: type[DistillationMethod]) -> type[DistillationMethod]:
        register(cls)
        cls.name = name
        return cls

    return decorator


def list_methods(registration_order: bool = False) -> list[str]:
    """Registered method names, sorted (or in the order they were registered: baselines first)."""
    return list(_REGISTRY) if registration_order else _REGISTRY.names()


def method_class(name: str) -> type[DistillationMethod]:
    """The class registered under ``name``; SpecError listing the choices otherwise."""
    return _REGISTRY.get(name)


def method_defaults(name: str) -> dict[str, Any]:
    """Keyword arguments of method ``name`` with their defaults (``inspect.Parameter.empty``
    never appears: required build-time inputs default to None and are checked at build)."""
    sig = inspect.signature(method_class(name).__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}


def build_method(name: str, **hparams: Any) -> DistillationMethod:
    """Instantiate method ``name`` with hyperparameters / store constants.

    Keys in :data:`STORE_CONSTANTS` that the method does not take are ignored so a trainer can
    pass the same store constants to every method; any other unknown key is a SpecError.
    """
    cls = method_class(name)
    accepted = method_defaults(name)
    unknown = sorted(k for k in hparams if k not in accepted and k not in STORE_CONSTANTS)
    if unknown:
        raise SpecError(
            f"method {name!r} has no hyperparameter(s) {unknown}; it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(**{k: v for k, v in hparams.items() if k in accepted})
