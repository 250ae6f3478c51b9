"""``softlabels train`` under ``torchrun``: one process per device, DistributedDataParallel.

torch.distributed does all the work; this module only reads what ``torchrun`` set up:

- :func:`launched` -- ``torchrun`` (or any launcher following its environment contract) sets
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them a
  run is today's single process, unchanged.
- :func:`init_distributed` joins the process group (``nccl`` on CUDA, ``gloo`` on CPU) with
  torch.distributed's own ``timeout``: a collective that waits longer than it (a rank died, a
  machine vanished) raises instead of hanging forever. Each rank uses ``LOCAL_RANK``'s device.
- :class:`TrainStep` puts the student *and* the method (its trainable parts, e.g. the hint
  regressor) into one module, so that :meth:`DistContext.wrap` synchronises both with one
  ``DistributedDataParallel``; single-process runs call it unwrapped.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from softlabels.defaults import DIST_TIMEOUT
from softlabels.errors import SoftlabelsError

__all__ = ["DistContext", "DistributedRunError", "TrainStep", "launched", "init_distributed",
           "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = DIST_TIMEOUT  # softlabels.defaults: without torch, for --help


class DistributedRunError(SoftlabelsError):
    """A collective failed: another rank died or stopped answering."""

    exit_code = 1


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one rank of a group."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@dataclass
class DistContext:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed
    owned: bool = False  # this context initialised the process group (and destroys it)
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of every rank, by rank

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank) if self.distributed else torch.device("cuda")
        return torch.device("cpu")

    def wrap(self, module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` in DistributedDataParallel (rank 0's parameters are broadcast to all ranks)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    def barrier(self) -> None:
        if self.distributed:
            self.collective(dist.barrier)

    def collective(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, a step that talks to the other ranks (DDP's forward and
        backward, a barrier); its failure (a peer gone, the timeout) becomes one line naming
        the rank that died when it ran on this machine."""
        if not self.distributed:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except dist.DistError as exc:
            raise DistributedRunError(self._lost_peer(exc)) from None
        except RuntimeError as exc:  # gloo reports a closed connection as a plain RuntimeError
            if not _is_transport_error(exc):
                raise
            raise DistributedRunError(self._lost_peer(exc)) from None

    def dead_peers(self) -> list[int]:
        """Ranks on this machine whose process is gone (the others cannot be checked from here)."""
        host = socket.gethostname()
        return [r for r, (h, pid) in enumerate(self.peers) if h == host and r != self.rank and not _alive(pid)]

    def _lost_peer(self, exc: BaseException | None) -> str:
        dead = self.dead_peers()
        cause = "torchrun stopped this rank (SIGTERM)" if exc is None else _first_sentence(exc)
        who = f"rank {', '.join(map(str, dead))} died" if dead else "another rank failed or stopped answering"
        return (
            f"{who}, so this rank stops ({cause}); torchrun's summary names each rank's exit code. Fix the cause and "
            "rerun the same command with --resume to continue from the last epoch's checkpoint"
        )

    def stopped(self, exc: BaseException) -> BaseException:
        """What to raise for a SIGTERM: torchrun's elastic agent sends it to every rank when one
        fails -- name the dead rank when there is one on this machine; otherwise (a user's kill,
        a scheduler's preemption) the interruption itself."""
        if self.distributed and getattr(exc, "signum", None) == signal.SIGTERM and self.dead_peers():
            return DistributedRunError(self._lost_peer(None))
        return exc

    def gather(self, value: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``value`` (small JSON-able dicts: per-epoch sums), in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        self.collective(dist.all_gather_object, out, value)
        return out

    def epoch_sums(self, loss_sum: float, parts: dict[str, float], seen: int) -> tuple[float, dict[str, float], int]:
        """The epoch's loss sum, component sums and sample count over every rank."""
        everyone = self.gather({"loss": loss_sum, "parts": parts, "seen": seen})
        total_parts: dict[str, float] = {}
        for one in everyone:
            for key, value in one["parts"].items():
                total_parts[key] = total_parts.get(key, 0.0) + value
        return sum(o["loss"] for o in everyone), total_parts, sum(o["seen"] for o in everyone)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def _first_sentence(exc: BaseException) -> str:
    """gloo's ``[.../pair.cc:545] Read error [10.0.0.2]:4311: Connection reset by peer. This is ...``
    -> ``Read error [10.0.0.2]:4311: Connection reset by peer``."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", " ".join(str(exc).split()))
    return text.split(". ")[0][:200]


def _is_transport_error(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(key in text for key in ("gloo", "Connection", "NCCL", "timed out", "Timed out", "ProcessGroup"))


def _alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (killed, not yet reaped by torchrun)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def init_distributed(timeout: float = DEFAULT_TIMEOUT) -> DistContext:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); a 1-rank context without torchrun.
    An already initialised group (a user's own launcher) is used as it is, and not destroyed."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           dist.get_backend())
    if not launched():
        return DistContext()
    if not timeout > 0:
        from softlabels.errors import SpecError

        raise SpecError(f"--dist-timeout must be > 0 seconds, got {timeout:g}")
    rank, world, local = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (dist.DistError, RuntimeError, ValueError) as exc:
        raise DistributedRunError(
            f"cannot join the torchrun group ({' '.join(str(exc).split())[:200]}); check --rdzv-endpoint / "
            "MASTER_ADDR:MASTER_PORT and that every node runs the same command"
        ) from None
    if rank:  # every rank runs the same code on the same data: rank 0's warnings say it once
        warnings.simplefilter("ignore")
    ctx = DistContext(rank, world, local, backend, owned=True)
    ctx.peers = [tuple(p) for p in ctx.gather({"peer": [socket.gethostname(), os.getpid()]}) for p in [p["peer"]]]
    return ctx


class TrainStep(nn.Module):
    """The student and the method as one module: ``forward`` computes the student's logits
    (under ``precision``'s autocast) and the method's loss on them; returns ``(total, components)``.
    Wrapped in DistributedDataParallel, the student's and the method's parameters are synchronised."""

    def __init__(self, student: nn.Module, method: nn.Module, features: Any, precision: Any) -> None:
        super().__init__()
        self.student, self.method = student, method
        self._features, self._precision = features, precision

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, targets: dict[str, torch.Tensor], stage: str):
        with self._precision.autocast():
            logits = self.student(x)
        feats = self._features.value if self._features is not None else None
        out = self.method(logits.float(), labels, targets, student_features=feats, stage=stage)
        return out.total, out.components
