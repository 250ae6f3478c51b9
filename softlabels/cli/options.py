"""Command-line options shared by several commands: ``--storage-option KEY=VALUE``."""

from __future__ import annotations

import json
from typing import Any

import typer

from softlabels.errors import SpecError

STORAGE_OPTION_HELP = (
    "fsspec storage option KEY=VALUE for remote stores (repeatable; values parsed as JSON), e.g. "
    "endpoint_url=http://127.0.0.1:9000, anon=true, key=..., secret=.... Without them the standard AWS_* "
    "environment variables apply. See docs/SHARING.md."
)


def storage_option_flag(name: str = "--storage-option", help: str = STORAGE_OPTION_HELP) -> Any:
    return typer.Option(None, name, help=help)


def parse_key_values(items: list[str] | None, flag: str, *, example: str = "", dashes_to_underscores: bool = False) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: values are JSON when they parse as JSON,
    strings otherwise. Shared by every repeatable KEY=VALUE flag."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if dashes_to_underscores:
            key = key.replace("-", "_")
        if not eq or not key:
            hint = f" (e.g. {example})" if example else ""
            raise SpecError(f"{flag} expects KEY=VALUE{hint}, got '{item}'")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw.strip()
    return out


def parse_storage_options(items: list[str] | None, flag: str = "--storage-option") -> dict[str, Any]:
    """``["endpoint_url=http://h:9000", "anon=true"]`` -> ``{"endpoint_url": "http://h:9000", "anon": True}``."""
    return parse_key_values(items, flag, example="endpoint_url=http://127.0.0.1:9000")
