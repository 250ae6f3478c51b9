"""The trainer's progress display: one rich bar per epoch on stderr (batches, images/s, running
loss and its components, ETA), and a summary line per finished epoch. When stderr is not a terminal
(a log file), plain epoch lines of :class:`softlabels.progress.EpochProgress` instead. A no-op when
disabled."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["BatchProgress"]


class BatchProgress:
    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled, self.epochs = enabled, epochs
        self.bar: Any = None
        self.task: Any = None
        self.plain: Any = None

    def __enter__(self) -> BatchProgress:
        if self.enabled and not sys.stderr.isatty():
            from softlabels.progress import EpochProgress

            self.plain = EpochProgress(True, self.epochs, "train", accuracy=True).__enter__()
        elif self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console(stderr=True)
            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.__enter__()
        return self

    def start_epoch(self, epoch: int, batches: int) -> None:
        self._start, self._images = time.perf_counter(), 0
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                "train", total=batches, epoch=f"{epoch + 1}/{self.epochs}", speed="-", loss="-"
            )

    def step(self, images: int, loss: float, components: dict[str, float]) -> None:
        """After a batch: ``loss`` and ``components`` are the epoch's running means so far."""
        self._images += images
        if self.bar is not None:
            rate = self._images / max(time.perf_counter() - self._start, 1e-9)
            parts = " ".join(f"{k} {v:.3f}" for k, v in sorted(components.items()))
            self.bar.update(self.task, advance=1, speed=f"{rate:,.0f}", loss=f"{loss:.4f}" + (f" ({parts})" if parts else ""))

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self.plain is not None:
            self.plain.update(record["epoch"], record["loss"], record.get("test_accuracy"))
        if self.bar is not None:
            acc = record.get("test_accuracy")
            acc_text = "" if acc is None else f"  {record.get('eval_split', 'eval')} acc {100 * acc:.2f}%"
            self.bar.console.print(
                f"epoch {record['epoch']}/{self.epochs}  loss {record['loss']:.4f}  "
                f"{record['images_per_second']:,.0f} img/s{acc_text}",
                highlight=False,
            )

    def __exit__(self, *exc: Any) -> None:
        if self.plain is not None:
            self.plain.__exit__(*exc)
        if self.bar is not None:
            self.bar.__exit__(*exc)
