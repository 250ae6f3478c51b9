"""The ``softlabels`` command line. Typer lives here and only here (and in sibling CLI modules).

User mistakes raise :class:`softlabels.errors.SoftlabelsError`; :func:`main` prints them as one
``error: ...`` line on stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import sys

import typer

from softlabels import __version__
from softlabels.cli.options import show_flags_as_flags
from softlabels.errors import SoftlabelsError

app = typer.Typer(
    name="softlabels",
    help="Offline knowledge distillation: dump teacher targets once into a Zarr v3 store, "
    "train students from it without the teacher.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"softlabels {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Offline knowledge distillation with self-describing Zarr v3 target stores."""


def _register() -> None:
    from softlabels.cli import store_commands

    store_commands.register(app)
    try:
        from softlabels.cli.teacher import teacher_app
    except ImportError:  # pragma: no cover - during bootstrapping only
        teacher_app = None
    if teacher_app is not None:
        app.add_typer(teacher_app, name="teacher")
    for module in ("dump", "train", "copy", "listing"):
        try:
            mod = __import__(f"softlabels.cli.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"softlabels.cli.{module}":
                raise
            continue
        mod.register(app)


_register()
show_flags_as_flags()


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (for CLI-level problems found outside the library)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(code)


def main() -> None:
    try:
        app()
    except SoftlabelsError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
