"""The ``softlabels`` command line. Typer lives here and only here (and in sibling CLI modules).

User mistakes raise :class:`softlabels.errors.SoftlabelsError`; :func:`main` prints them as one
``error: ...`` line on stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import sys

import typer

from softlabels import __version__
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
    from softlabels.cli import copy, dump, report, store_commands, teacher, train

    store_commands.register(app)
    app.add_typer(teacher.teacher_app, name="teacher")
    for module in (dump, train, copy, report):
        module.register(app)


_register()


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
