"""``softlabels list datasets|teachers|students|methods|augmentations``: every built-in with its
parameters and defaults (like timm's ``list_models``), read from the registries themselves, so
the listing cannot drift from what the spec parsers accept."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import typer

KINDS = ("datasets", "teachers", "students", "methods", "augmentations")

Row = tuple[str, str, str]  # (how to write it, parameters with defaults, what it is)


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _params(schema: Mapping[str, Any]) -> str:
    """``{"max": Param("int", 6)}`` -> ``max=6``."""
    return ", ".join(f"{key}={_value(param.default)}" for key, param in schema.items()) or "-"


def _first_line(obj: Any) -> str:
    """The first sentence of ``obj``'s own docstring, without reST markup."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")
    return re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s", text, maxsplit=1)[0].rstrip(".")


def dataset_rows() -> list[Row]:
    from softlabels.datasets import digits, mnist1d, synthetic, vision

    rows = []
    for module in (mnist1d, synthetic, digits):
        rows.append((f"{module.NAME}[:key=value,...]", _params(module.SCHEMA),
                     f"{_first_line(module)}; splits {', '.join(module.SPLITS)}"))
    for name, entry in vision.TORCHVISION.items():
        rows.append((f"{name}:/root[?key=value&...]", f"mean={_value(entry.mean)}, std={_value(entry.std)}",
                     f"torchvision {entry.cls} files under /root/{entry.layout} (never downloaded); "
                     f"splits {', '.join(entry.splits)}"))
    rows.append(("imagefolder:/root[?key=value&...]", _params(vision.IMAGEFOLDER_SCHEMA),
                 "one folder per class (torchvision ImageFolder); split folders train/val/test/transfer under "
                 "/root when present; eval: Resize(size) + CenterCrop(crop) + Normalize(mean, std); "
                 "num_classes=0 takes the class folders"))
    return rows


def _model_rows(prefix: str) -> list[Row]:
    from softlabels import models

    rows = []
    for name in models.list_models():
        factory = models._REGISTRY.get(name)
        extra = [p for p in inspect.signature(factory).parameters.values()
                 if p.name not in ("input_shape", "num_classes") and p.default is not p.empty]
        params = ", ".join(f"{p.name}={_value(p.default)}" for p in extra) or "-"
        rows.append((f"{prefix}{name}", params, _first_line(factory) or _MODEL_NOTES.get(name, "")))
    return rows


_MODEL_NOTES = {
    "mlp": "flatten, 100-100 ReLU MLP (the MNIST-1D student baseline)",
    "linear": "flatten + linear classifier (multinomial logistic regression)",
    "cnn": "1-D: MNIST-1D's 3-conv layout, 64 channels; images: 3-stage conv-BN-ReLU + global pooling",
    "resmlp": "256-wide residual MLP, 2 pre-norm blocks (a teacher for synthetic)",
}


def teacher_rows() -> list[Row]:
    import importlib.util

    rows = _model_rows("builtin:")
    try:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        rows.append(("torchvision:ARCH", f"{len(names)} classification models, e.g. resnet18, resnet50, "
                     "mobilenet_v3_small, vit_b_16", "weights=None, num_classes from the dataset; pretrained "
                     "weights come from --weights FILE"))
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    timm = "installed" if importlib.util.find_spec("timm") else "not installed: pip install timm"
    rows.append(("timm:ARCH", "-", f"timm.create_model(ARCH, pretrained=False) ({timm})"))
    rows.append(("package.module:factory", "-", "your own factory(num_classes=C) or factory(), imported "
                 "relative to the working directory"))
    return rows


def student_rows() -> list[Row]:
    return _model_rows("builtin:")


def method_rows() -> list[Row]:
    from softlabels.losses import STORE_CONSTANTS, list_methods, method_class, method_defaults

    rows = []
    for name in list_methods():
        params = {k: v for k, v in method_defaults(name).items() if k not in STORE_CONSTANTS}
        text = ", ".join(f"{k}={_value(v)}" for k, v in params.items()) or "-"
        rows.append((name, text, _first_line(method_class(name))))
    return rows


def augmentation_rows() -> list[Row]:
    from softlabels.augment import POLICIES, STUDENT_AUGMENTS

    rows = [(f"dump --augment {name}", _params(cls.schema), _first_line(cls) or "no augmentation (V = 1)")
            for name, cls in POLICIES.items()]
    rows += [(f"train --student-augment {name}", _params(cls.schema),
              "student only, fresh per epoch, NOT seen by the teacher") for name, cls in STUDENT_AUGMENTS.items()]
    return rows


ROWS: dict[str, Callable[[], list[Row]]] = {
    "datasets": dataset_rows, "teachers": teacher_rows, "students": student_rows,
    "methods": method_rows, "augmentations": augmentation_rows,
}


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_builtins(
        what: str = typer.Argument(..., help=f"What to list: {', '.join(KINDS)}.", metavar="|".join(KINDS)),
    ) -> None:
        """List the built-in datasets, teachers, students, methods or augmentations with their parameters
        and defaults (write a spec as NAME:key=value,...)."""
        from rich.console import Console
        from rich.table import Table

        from softlabels.errors import SpecError

        kind = what.strip().lower()
        if kind not in ROWS:
            raise SpecError(f"cannot list '{what}'; choose one of: {', '.join(KINDS)}")
        table = Table(title=f"softlabels {kind}", title_justify="left")
        for column in ("spec", "parameters (defaults)", "what it is"):
            table.add_column(column, overflow="fold")
        for row in ROWS[kind]():
            table.add_row(*row)
        Console(soft_wrap=False).print(table)
