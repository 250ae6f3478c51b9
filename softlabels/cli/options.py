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


# rich help panels: every command groups its options under these names, in this order
DATA, TEACHER, TARGETS, TRAINING, WORKERS, OUTPUT = "Data", "Teacher", "Targets", "Training", "Workers", "Output"


def storage_option_flag(name: str = "--storage-option", help: str = STORAGE_OPTION_HELP, panel: str | None = None) -> Any:
    return typer.Option(None, name, help=help, rich_help_panel=panel)


def flag(*names: str, help: str, panel: str | None = None, **kwargs: Any) -> Any:
    """A boolean option that takes no value (``--help`` shows it without a type: see
    :func:`show_flags_as_flags`)."""
    return typer.Option(False, *names, help=help, rich_help_panel=panel, **kwargs)


def show_flags_as_flags() -> None:
    """typer 0.29's rich help prints ``<bool>`` after every flag, ``--help`` included, as if it
    took a value. A flag takes none: show no type for it."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_softlabels_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag and not self.count else shown(self, ctx)

    display_type_rich._softlabels_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


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
