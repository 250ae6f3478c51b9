"""Which run owns a store that is being written (docs/FORMAT.md §5, "Ownership").

Every dump that creates, resumes or overwrites a store writes a fresh ``run_id`` into the root
metadata; ``--overwrite`` also increments ``generation``. Workers check the store's current run
id before and after writing a unit, the driver before recording a unit and before finalizing.
A writer whose run id is no longer the store's -- the store was replaced with ``--overwrite``
or taken over by a ``--resume`` elsewhere -- stops with one line instead of writing into the
new owner's store. The check reads the root ``zarr.json`` afresh (no cache), one small read per
unit.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softlabels.errors import SoftlabelsError
from softlabels.stores import format as fmt

RUN_ID_KEY = "run_id"
GENERATION_KEY = "generation"


class OwnershipLostError(SoftlabelsError):
    """Another run now owns the store this run was writing."""

    exit_code = 1


def new_run_id() -> str:
    return uuid.uuid4().hex


def current_owner(zstore: Any) -> tuple[str | None, int | None]:
    """``(run_id, generation)`` recorded in the store's root metadata now; ``(None, None)`` when
    the root is gone or unreadable (the store was deleted, or is being replaced)."""
    try:
        raw = sync(zstore.get("zarr.json", prototype=default_buffer_prototype()))
        meta = json.loads(raw.to_bytes())["attributes"][fmt.ATTRS_KEY] if raw is not None else {}
    except (ValueError, KeyError, TypeError, OSError):
        return None, None
    return meta.get(RUN_ID_KEY), meta.get(GENERATION_KEY)


def check_owner(zstore: Any, location: str, run_id: str | None, doing: str) -> None:
    """Raise :class:`OwnershipLostError` unless ``run_id`` still owns the store (no-op for
    ``run_id=None``: a writer not bound to a run, e.g. a test opening a store by hand)."""
    if run_id is None:
        return
    owner, generation = current_owner(zstore)
    if owner != run_id:
        now = "it no longer exists" if owner is None else f"run {owner[:12]} (generation {generation}) owns it now"
        raise OwnershipLostError(
            f"{location}: this dump (run {run_id[:12]}) stopped before {doing}: {now}, after --overwrite or "
            "--resume elsewhere; nothing more was written by this run"
        )
