"""Student runs written by ``softlabels train``: find their ``metrics.json``, group them by recipe
(everything but the seed), and summarise each group over its seeds.

A run written before ``metrics.json`` carried a per-epoch ``history`` still gets its final
accuracy in the tables; it just has no curve.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import SoftlabelsError

#: What makes two runs the same recipe, with metrics.json's ``recipe`` record (the optimiser,
#: schedule, precision, transforms) where present. The seed and everything measured (accuracies,
#: times, history, warnings) are left out.
RECIPE_KEYS = ("method", "hparams", "temperature", "k", "epochs", "batch_size", "lr", "optimizer", "schedule",
               "views", "student_augment", "student", "dataset", "train_splits", "store_path")
_NOT_RECIPE = {"seed", "resume"}


class RunsError(SoftlabelsError):
    pass


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]

    @property
    def recipe(self) -> dict[str, Any]:
        recipe = {key: self.metrics.get(key) for key in RECIPE_KEYS}
        recorded = self.metrics.get("recipe")  # the optimisation recipe `softlabels train` records
        if isinstance(recorded, dict):
            recipe.update({key: value for key, value in recorded.items() if key not in _NOT_RECIPE})
        return recipe

    @property
    def accuracy_curve(self) -> list[float] | None:
        history = self.metrics.get("history")
        if not isinstance(history, list) or not history:
            return None
        curve = [h.get("test_accuracy") for h in history if isinstance(h, dict)]
        return None if not curve or any(a is None for a in curve) else [float(a) for a in curve]

    @property
    def stores(self) -> list[str]:
        paths = self.metrics.get("store_path")
        if paths is None:
            return []
        return [str(p) for p in paths] if isinstance(paths, list) else [str(paths)]


@dataclass
class RunGroup:
    """Runs with one recipe, differing only in the seed."""

    label: str
    recipe: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    @property
    def accuracies(self) -> list[float]:
        return [float(r.metrics["test_accuracy"]) for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for a single run)."""
        return statistics.stdev(self.accuracies) if len(self.runs) > 1 else 0.0

    @property
    def seeds(self) -> list[Any]:
        return [r.metrics.get("seed") for r in self.runs]

    def curves(self) -> np.ndarray | None:
        """``[runs, epochs]`` test accuracy, over the runs that recorded a history (None if none did)."""
        curves = [c for c in (r.accuracy_curve for r in self.runs) if c is not None]
        if not curves:
            return None
        length = min(len(c) for c in curves)
        return np.asarray([c[:length] for c in curves])


def find_runs(directories: list[str | Path]) -> list[Run]:
    """Every ``metrics.json`` in or below each directory; a directory without one is an error."""
    runs = []
    for directory in directories:
        root = Path(directory)
        if not root.is_dir():
            raise RunsError(f"--runs {root}: no such directory; pass a `softlabels train --out` directory or a parent of several")
        files = sorted(root.rglob("metrics.json"))
        if not files:
            raise RunsError(
                f"--runs {root} has no metrics.json (neither in it nor below it); pass the --out directory of "
                "`softlabels train` runs, or a directory above them"
            )
        runs += [_load(f) for f in files]
    return runs


def _load(path: Path) -> Run:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunsError(f"{path} is not readable JSON ({exc}); rerun that `softlabels train` or remove the file") from None
    if not isinstance(metrics, dict) or "method" not in metrics or "test_accuracy" not in metrics:
        raise RunsError(f"{path} is not a `softlabels train` metrics.json (no method or test_accuracy); remove it "
                        "or point --runs elsewhere")
    if metrics["test_accuracy"] is None:
        raise RunsError(f"{path} records no test accuracy (trained with --eval-split none); it cannot be compared")
    return Run(path.parent, metrics)


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """Group by recipe, best mean test accuracy first. A group's label is its method, T, k and
    training splits, plus -- only where that still leaves two groups alike -- the recipe entries
    that tell them apart."""
    groups: dict[str, RunGroup] = {}
    for run in runs:
        key = json.dumps(run.recipe, sort_keys=True, default=str)
        groups.setdefault(key, RunGroup("", run.recipe)).runs.append(run)
    result = list(groups.values())
    bases = [_base_label(g.recipe) for g in result]
    for group, base in zip(result, bases):
        alike = [g.recipe for g, b in zip(result, bases) if b == base]
        extra = []
        if len(alike) > 1:
            for key in sorted(group.recipe):
                values = {json.dumps(r.get(key), sort_keys=True, default=str) for r in alike}
                if len(values) > 1:
                    extra.append(_differing(key, group.recipe.get(key), [r.get(key) for r in alike]))
        group.label = " ".join([base, *extra])
    return sorted(result, key=lambda g: -g.mean)  # best recipe first: which one won is the first question


def _base_label(recipe: dict[str, Any]) -> str:
    parts = [str(recipe.get("method"))]
    if recipe.get("temperature") is not None:
        parts.append(f"T={recipe['temperature']:g}")
    if recipe.get("k") is not None:
        parts.append(f"k={recipe['k']}")
    splits = recipe.get("train_splits") or []
    if len(splits) > 1 or (splits and splits != ["train"]):
        parts.append("+".join(splits))
    return " ".join(parts)


def _differing(key: str, value: Any, others: list[Any]) -> str:
    if isinstance(value, dict):
        keys = sorted({k for o in others if isinstance(o, dict) for k in o} | set(value))
        diff = [k for k in keys if any(not isinstance(o, dict) or o.get(k) != value.get(k) for o in others)]
        return " ".join(f"{k}={_short(value.get(k))}" for k in diff)
    if key == "store_path":
        paths = value if isinstance(value, list) else [value]
        return "store=" + "+".join(Path(str(p)).name for p in paths if p is not None)
    return f"{key}={_short(value)}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(_short(v) for v in value)
    return str(value)
