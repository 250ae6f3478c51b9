"""Parsing and canonical formatting of dataset spec parameters.

Built-ins take ``name:key=value,key=value``; path datasets take ``name:/path?key=value&key=value``
(``&`` so that values such as ``mean=0.5,0.5,0.5`` can contain commas). Every loader declares
its parameters as a schema; the canonical spec lists all of them, defaults included, in schema
order, so equal canonical specs mean equal data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from softlabels.errors import SpecError

__all__ = ["Param", "split_name", "parse_params", "format_params", "split_path_query", "check_split", "spec_identity"]


@dataclass(frozen=True)
class Param:
    """One spec parameter: its type (``int``, ``float`` or ``floats`` for a comma list), default
    and an optional check returning an error fragment such as ``"must be >= 1"``."""

    kind: str
    default: Any
    check: Callable[[Any], str | None] | None = None
    maximum: float | None = None  # documented upper bound (README "Specs"): no spec may ask for a hang


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def split_name(spec: str) -> tuple[str, str]:
    """``"mnist1d:seed=0"`` -> ``("mnist1d", "seed=0")``; names are case-insensitive."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    return name.strip().lower(), rest.strip()


def _convert(dataset: str, key: str, param: Param, text: str) -> Any:
    try:
        if param.kind == "int":
            return int(text)
        if param.kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        if param.kind == "floats":
            values = tuple(float(t) for t in text.split(","))
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(text)
            return values
    except ValueError:
        kind = {"int": "an integer", "float": "a number", "floats": "a comma-separated list of numbers"}[param.kind]
        raise SpecError(f"{dataset}: {key} must be {kind}, got '{text}'") from None
    raise AssertionError(param.kind)


def parse_params(dataset: str, text: str, schema: dict[str, Param], *, sep: str = ",") -> dict[str, Any]:
    """Parse ``key=value`` pairs against ``schema``; fill defaults; validate."""
    values = {key: param.default for key, param in schema.items()}
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(sep))):
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or not raw.strip():
            raise SpecError(f"{dataset}: expected key=value in the spec, got '{item}'")
        if key not in schema:
            known = ", ".join(schema) or "none"
            raise SpecError(f"{dataset}: unknown parameter '{key}' (accepted: {known})")
        if key in seen:
            raise SpecError(f"{dataset}: parameter '{key}' given twice")
        seen.add(key)
        values[key] = _convert(dataset, key, schema[key], raw.strip())
    for key, param in schema.items():
        if param.maximum is not None and isinstance(values[key], (int, float)) and values[key] > param.maximum:
            raise SpecError(f"{dataset}: {key}={_format_value(values[key])} is above its bound of {param.maximum:,}")
        if param.check is not None and values[key] is not None:
            problem = param.check(values[key])
            if problem:
                raise SpecError(f"{dataset}: {key}={_format_value(values[key])} {problem}")
    return values


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_params(values: dict[str, Any], *, sep: str = ",") -> str:
    """Canonical ``key=value`` list in the given (schema) order."""
    return sep.join(f"{key}={_format_value(value)}" for key, value in values.items())


def split_path_query(dataset: str, rest: str) -> tuple[str, str]:
    """``"/data/x?size=224"`` -> (absolute path, ``"size=224"``). The query starts at the last ``?``."""
    path, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    path = path.strip()
    if not path:
        raise SpecError(
            f"{dataset} needs a local root directory: {dataset}:/path/to/root "
            "(softlabels never downloads datasets)"
        )
    return os.path.abspath(os.path.expanduser(path)), query


def check_split(dataset: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise SpecError(f"{dataset} has no split '{split}' (available: {', '.join(splits)})")


def spec_identity(spec: str) -> str:
    """A canonical spec without the local root of a path dataset (``imagefolder:/a/b?size=256`` ->
    ``imagefolder:?size=256``): the same files at another path are the same data; their content is
    compared through the dataset's manifest instead."""
    name, rest = split_name(spec)
    if rest.startswith(("/", ".", "~")) or (os.sep in rest.split("?", 1)[0]):
        _, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
        return f"{name}:?{query}"
    return spec
