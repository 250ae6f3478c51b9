"""Every Ray call of softlabels lives here, so a Ray upgrade touches one file.

The driver starts (or joins) a Ray instance, creates one actor per GPU (or ``workers`` CPU
actors), and hands out units. Actors write their units straight into the store and return only
the digests; the driver records completion. A dead actor is restarted and its in-flight units
retried by Ray itself (``max_restarts`` / ``max_task_retries``), never by hand-rolled code.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from softlabels.errors import Interrupted, SoftlabelsError
from softlabels.pipelines.predictor import DumpConfig, Loaded, TeacherPredictor
from softlabels.stores.ownership import OwnershipLostError

MAX_RESTARTS = 4
UNITS_IN_FLIGHT_PER_ACTOR = 2
POLL_SECONDS = 0.5  # how often the driver asks the workers for rows done between units


class DumpWorker:
    """Ray actor body: a :class:`TeacherPredictor` kept warm across units.

    An async actor with two threads: inference (one unit at a time, in call order) and writing
    (validate, compress, write). So the teacher computes unit u+1 while unit u is written, and
    the event loop stays free to *announce* each unit the moment its call arrives, so that the
    predictor's decode workers start on it before the unit ahead of it is done. Each call still
    returns only once its unit is durable."""

    def __init__(self, config: DumpConfig, shared: list) -> None:
        import concurrent.futures

        import ray

        # The ref travels inside a list so Ray does not resolve it as a constructor argument:
        # the driver holds it for the whole run, so a restarted actor can always fetch it again.
        loaded = ray.get(shared[0]) if shared else None
        self.predictor = TeacherPredictor(config, loaded=loaded)
        pool = concurrent.futures.ThreadPoolExecutor
        self._inference = pool(max_workers=1, thread_name_prefix="teacher")
        self._writes = pool(max_workers=1, thread_name_prefix="store-writer")

    async def pid(self) -> int:
        return os.getpid()

    async def rows_done(self) -> int:
        """Rows this worker has run through the teacher (answered while a unit computes)."""
        return self.predictor.rows_done

    async def write_unit(self, unit: int) -> tuple[int, dict[str, str]]:
        import asyncio

        loop = asyncio.get_running_loop()
        writer = self.predictor.writer()
        start, stop = writer.schema.unit_range(unit)
        self.predictor.announce(start, stop)
        fields = await loop.run_in_executor(self._inference, self.predictor.predict_unit, start, stop)
        digests = await loop.run_in_executor(self._writes, writer.write_unit, unit, fields)
        return unit, digests


class UnitFailed(SoftlabelsError):
    pass


@contextlib.contextmanager
def _native_stderr_silenced():
    """Ray's C++ core worker warns, on stderr, that a restartable actor has constructor arguments
    in the object store (ray#53727: a restart fails if they are lost). The driver holds that
    reference for the whole run, so the warning is noise; it is the only thing printed here.
    Failures to create an actor still surface as Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _init_ray(address: str | None, workers: int) -> bool:
    """Start an embedded Ray instance, or join ``address``. Returns True when started here."""
    import ray

    if ray.is_initialized():
        return False
    with _keep_signal_handlers():
        return _start_ray(ray, address, workers)


@contextlib.contextmanager
def _keep_signal_handlers():
    """ray.init replaces the driver's SIGTERM handler with one that exits abruptly; keep ours, so
    SIGTERM ends a dump like Ctrl-C: one line, Ray shut down, the store resumable."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _start_ray(ray, address: str | None, workers: int) -> bool:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False, configure_logging=True)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise SoftlabelsError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    else:
        # Workers import user factories (package.module:factory) relative to the driver's cwd;
        # they inherit this environment (a runtime_env would defeat Ray's prestarted workers).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), **kwargs)
    return True


def run_units(
    config: DumpConfig,
    units: Sequence[int],
    *,
    workers: int | None,
    address: str | None,
    on_done: Callable[[int, dict[str, str]], None],
    on_actors: Callable[[list], None] | None = None,
    loaded: Loaded | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Compute and write ``units`` on Ray actors; call ``on_done(unit, digests)`` in the driver
    exactly once per unit, as each finishes; returns start-up and work seconds. ``loaded`` (dataset + teacher, as the driver loaded
    them) goes through the object store once, so workers neither regenerate the data nor need
    the weights file on their node."""
    import ray

    t0 = time.perf_counter()
    started = _init_ray(address, workers or 1)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            n = min(workers or gpus, gpus)
            options = {"num_gpus": 1, "num_cpus": 1}
        else:
            n = workers or 1
            options = {"num_cpus": 1}
        if not config.threads_per_worker and not gpus:
            config = replace(config, threads_per_worker=max(1, (os.cpu_count() or 1) // n))
        n = max(1, min(n, len(units)))
        actor_cls = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, **options)(DumpWorker)
        shared = [ray.put(loaded)] if loaded is not None else []
        with _native_stderr_silenced():
            actors = [actor_cls.remote(config, shared) for _ in range(n)]
        ray.get([actor.pid.remote() for actor in actors])  # constructors done: workers are ready
        ready = time.perf_counter()
        if on_actors is not None:
            on_actors(actors)
        _schedule(actors, list(units), on_done, on_rows)
        return {"startup_seconds": ready - t0, "work_seconds": time.perf_counter() - ready, "workers": n}
    finally:
        if started:
            ray.shutdown()


def _schedule(actors: list, queue: list[int], on_done: Callable[[int, dict[str, str]], None],
              on_rows: Callable[[int], None] | None = None) -> None:
    queue.reverse()
    in_flight: dict = {}
    state: dict = {"failure": None, "lost": None}

    def submit(actor) -> None:
        if queue and state["failure"] is None and state["lost"] is None:
            unit = queue.pop()
            in_flight[actor.write_unit.remote(unit)] = (unit, actor)

    for actor in actors:
        for _ in range(UNITS_IN_FLIGHT_PER_ACTOR):
            submit(actor)
    with _signals_deferred() as caught:
        _wait_all(in_flight, caught, submit, on_done, state, actors, on_rows)
    if state["lost"] is not None:
        raise OwnershipLostError(str(state["lost"]))
    if state["failure"]:
        raise UnitFailed(f"{state['failure']}; completed units are recorded, fix the cause and rerun with --resume")


def _wait_all(in_flight: dict, caught: list, submit, on_done, state: dict, actors: list,
              on_rows: Callable[[int], None] | None) -> None:
    import ray

    last_poll = time.perf_counter()
    while in_flight:
        if caught:  # a signal arrived: stop here; recorded units stay recorded (resumable)
            raise Interrupted(caught[0])
        # a short timeout: the driver notices a signal while every unit is still computing
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
        if not ready:
            if on_rows is not None and time.perf_counter() - last_poll >= POLL_SECONDS:
                last_poll = time.perf_counter()  # between units: how far the workers are, for progress
                try:
                    on_rows(sum(ray.get([a.rows_done.remote() for a in actors], timeout=POLL_SECONDS)))
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                    pass  # a busy or restarting worker: the next poll or the unit's completion reports
            continue
        unit, actor = in_flight.pop(ready[0])
        try:
            done_unit, digests = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OwnershipLostError):
                state["lost"] = state["lost"] or cause  # another run owns the store: nothing to resume here
                continue
            message = str(cause) if isinstance(cause, SoftlabelsError) else f"{type(cause).__name__}: {cause}"
            state["failure"] = state["failure"] or f"unit {unit} failed: {' '.join(message.split())}"
            continue
        except ray.exceptions.RayActorError as exc:
            state["failure"] = state["failure"] or (
                f"unit {unit} failed: its worker died {MAX_RESTARTS + 1} times ({type(exc).__name__})"
            )
            continue
        on_done(done_unit, digests)
        submit(actor)


@contextlib.contextmanager
def _signals_deferred():
    """While Ray calls block in C++, a Python handler that raises corrupts the call; record
    SIGINT/SIGTERM here instead and let the loop raise :class:`Interrupted` between calls."""
    import signal

    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

