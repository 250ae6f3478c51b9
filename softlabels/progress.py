"""Progress on stderr that moves, in a terminal and in a log file.

In a terminal: a rich bar with the count, the rate and the ETA, redrawn as work completes. When
stderr is not a terminal (a log file, a pipe, a batch job): one plain line every ``interval``
seconds (default 10; ``SOFTLABELS_PROGRESS_SECONDS`` overrides it) and one at the end, e.g.::

    dump: 1,536/4,000 rows (38.4 %), 512 rows/s, ETA 5 s, units 6/16

stdout stays for results.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

__all__ = ["Progress", "EpochProgress", "format_seconds"]

DEFAULT_INTERVAL = 10.0


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """``with Progress("dump", total=N, unit="rows") as p: p.update(done, units="3/16")``.

    ``total`` may be set later (:meth:`set_total`); ``fields`` are shown after the rate as
    ``key value``. The rate and ETA are measured from :meth:`start` (the first unit of work,
    not process start-up), over the work done since then."""

    def __init__(self, label: str, total: int | None = None, *, unit: str = "rows", enabled: bool = True,
                 interval: float | None = None, stream: Any = None) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream or sys.stderr
        env = os.environ.get("SOFTLABELS_PROGRESS_SECONDS")
        self.interval = interval if interval is not None else float(env) if env else DEFAULT_INTERVAL
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.fields = 0, {}
        self._t0: float | None = None
        self._base = 0  # work already done when the clock started (a resumed dump)
        self._last_line = 0.0
        self._last_text = ""
        self._t_end: float | None = None
        self._bar = None

    # -- figures --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds from the start to now, or to the moment the total was reached."""
        if self._t0 is None:
            return 0.0
        return (self._t_end or time.perf_counter()) - self._t0

    def rate(self) -> float:
        elapsed = self.elapsed()
        return (self.done - self._base) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def line(self) -> str:
        """The plain progress line."""
        parts = [f"{self.label}: {self.done:,}" + (f"/{self.total:,}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.1f} %)"
        if self._t0 is not None and self.done > self._base:
            parts.append(f"{self.rate():,.0f} {self.unit}/s")
            eta = self.eta()
            if eta is not None:
                parts.append(f"ETA {format_seconds(eta)}")
        parts += [f"{key} {value}" for key, value in self.fields.items() if value not in (None, "")]
        return ", ".join(parts)

    # -- updates --------------------------------------------------------------------------------
    def set_total(self, total: int) -> None:
        self.total = total
        self._redraw()

    def start(self, total: int | None = None, done: int = 0) -> None:
        """Start the clock (idempotent); ``done`` counts work finished before (not in the rate)."""
        if total is not None:
            self.total = total
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._base = self.done = done
            self._last_line = self._t0
        self._redraw()

    def update(self, done: int | None = None, *, advance: int = 0, **fields: Any) -> None:
        if self._t0 is None:
            self.start()
        if done is not None:
            self.done = max(self.done, done)  # monotonic, even if a restarted worker recounts
        self.done += advance
        self.fields.update(fields)
        if self.total is not None and self.done >= self.total and self._t_end is None:
            self._t_end = time.perf_counter()  # the rate of the work, not of what follows it
        self._redraw()
        now = time.perf_counter()
        if self.enabled and not self.tty and now - self._last_line >= self.interval:
            self._last_line = now
            self._write(self.line())

    def _redraw(self) -> None:
        if self._bar is not None:
            text = "  ".join(f"{k} {v}" for k, v in self.fields.items() if v not in (None, ""))
            rate = f"{self.rate():,.0f} {self.unit}/s" if self.done > self._base else ""
            eta = self.eta()
            self._bar.update(self._task, total=self.total, completed=self.done, rate=rate,
                             eta="" if eta is None else f"ETA {format_seconds(eta)}", fields=text)

    def _write(self, text: str) -> None:
        if text == self._last_text:
            return
        self._last_text = text
        self.stream.write(text + "\n")
        self.stream.flush()

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[fields]}"),
                TimeElapsedColumn(), console=Console(file=self.stream), transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, rate="", eta="", fields="")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._bar is not None:
            self._redraw()
            self._bar.__exit__(exc_type, *exc)
        elif self.enabled and exc_type is None and self._t0 is not None:
            self._write(self.line())


class EpochProgress:
    """``with EpochProgress(enabled, epochs, "train", accuracy=True) as bar: bar.update(...)``: the
    epoch progress of both trainers (teacher fit, student train) on :class:`Progress`.

    ``accuracy`` adds the test accuracy; ``transient`` clears the bar at the end and prints
    nothing when stderr is not a terminal. Otherwise, outside a terminal, plain lines such as
    ``train: 12/60 epochs (20.0 %), 0.5 epochs/s, ETA 1 min 36 s, loss 0.4123, test acc 91.20%``."""

    def __init__(self, enabled: bool, epochs: int, label: str, *, accuracy: bool = False, transient: bool = False):
        tty = sys.stderr.isatty()
        self.accuracy = accuracy
        self.progress = Progress(label, epochs, unit="epochs", enabled=enabled and (tty or not transient))

    def __enter__(self) -> EpochProgress:
        self.progress.__enter__()
        self.progress.start()
        return self

    def update(self, epoch: int, loss: float, accuracy: float | None = None) -> None:
        """Epoch ``epoch`` (1-based) finished with mean ``loss`` (and test ``accuracy``)."""
        fields = {"loss": f"{loss:.4f}"}
        if self.accuracy:
            fields["test acc"] = "-" if accuracy is None else f"{100 * accuracy:.2f}%"
        self.progress.update(epoch, **fields)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
