"""The epoch progress bar of both trainers (teacher fit, student train): rich, on stderr
(stdout stays for results); a no-op when disabled."""

from __future__ import annotations

from typing import Any


class EpochProgress:
    """``with EpochProgress(enabled, epochs, "train", accuracy=True) as bar: bar.update(...)``.

    ``accuracy`` adds a test-accuracy column; ``transient`` clears the bar at the end and shows
    nothing when stderr is not a terminal (no stray lines in logs and pipes)."""

    def __init__(self, enabled: bool, epochs: int, label: str, *, accuracy: bool = False, transient: bool = False):
        self.enabled, self.epochs, self.label = enabled, epochs, label
        self.accuracy, self.transient = accuracy, transient
        self.bar: Any = None

    def __enter__(self) -> EpochProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            fields = "loss {task.fields[loss]}" + ("  test acc {task.fields[acc]}" if self.accuracy else "")
            self.bar = Progress(
                TextColumn(f"[bold]{self.label}[/] epoch"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn(fields),
                TimeElapsedColumn(),
                console=console,
                transient=self.transient,
                disable=self.transient and not console.is_terminal,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.epochs, loss="-", acc="-")
        return self

    def update(self, epoch: int, loss: float, accuracy: float | None = None) -> None:
        """Epoch ``epoch`` (1-based) finished with mean ``loss`` (and test ``accuracy``)."""
        if self.bar is not None:
            acc = "-" if accuracy is None else f"{100 * accuracy:.2f}%"
            self.bar.update(self.task, completed=epoch, loss=f"{loss:.4f}", acc=acc)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
