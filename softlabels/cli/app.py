"""The ``softlabels`` command line. Typer lives here and only here (and in sibling CLI modules).

User mistakes raise :class:`softlabels.errors.SoftlabelsError`; :func:`main` prints them as one
``error: ...`` line on stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import typer

from softlabels import __version__
from softlabels.cli.options import show_flags_as_flags
from softlabels.errors import Interrupted, SoftlabelsError

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
    from softlabels.cli import copy, dump, listing, report, store_commands, teacher, train

    store_commands.register(app)
    app.add_typer(teacher.teacher_app, name="teacher")
    for module in (dump, train, copy, report, listing):
        module.register(app)


_register()
show_flags_as_flags()


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _rank_prefix() -> str:
    """``"rank 1/2: "`` in a torchrun job of several ranks (whose error lines all reach one terminal)."""
    world = os.environ.get("WORLD_SIZE")
    if "RANK" not in os.environ or not world or int(world) <= 1:
        return ""
    return f"rank {os.environ['RANK']}/{world}: "


def main() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        app()
    except SoftlabelsError as exc:
        sys.stderr.write(f"error: {_rank_prefix()}{' '.join(str(exc).split())}\n")
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        resumable = "; a dump's store stays resumable: rerun it with --resume" if sys.argv[1:2] == ["dump"] else ""
        sys.stderr.write(f"error: the disk is full ({exc.strerror}){where}; free some space{resumable}\n")
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        # 128 + the signal's number, as a shell reports it (130 Ctrl-C, 143 SIGTERM); a dump's store
        # stays resumable: units are recorded one by one and the status is still 'writing'
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        resumable = "; resume with --resume" if sys.argv[1:2] == ["dump"] else ""
        sys.stderr.write(f"interrupted{resumable}\n")
        sys.exit(128 + int(signum))


if __name__ == "__main__":
    main()
