"""The teacher side of a dump, as a plain class with no Ray in it: load the teacher and the
dataset once, then turn a unit (a shard-aligned row range) into the store's fields.

Ray actors wrap it (``softlabels.pipelines.ray_dump``); tests and single-process runs call it
directly.
"""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from softlabels.datasets.info import in_memory
from softlabels.device import autocast_for, pick_device
from softlabels.stores import format as fmt
from softlabels.stores.writer import StoreWriter
from softlabels.targets import summarize_logits

PENULTIMATE = "penultimate"
DEFAULT_K = 10  # top-k when none is given: min(DEFAULT_K, classes)


@dataclass(frozen=True)
class DumpConfig:
    """Everything a worker needs to reproduce its share of the dump (picklable, JSON-able)."""

    teacher: str
    dataset: str
    out: str
    weights: str | None = None
    split: str = "train"
    k: int | None = None  # None: min(DEFAULT_K, the teacher's class count)
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    feature_layers: tuple[str, ...] = (PENULTIMATE,)
    value_dtype: str = "float16"
    codec: str = "fp16"  # target codec: "fp16" (value_dtype floats) or "compact" (format 1.2, docs/FORMAT.md §8)
    batch_size: int = 256
    loader_workers: int = 1  # decoding processes per worker (file datasets; in-memory ones slice)
    threads_per_worker: int = 0
    rows_per_shard: int = 0
    rows_per_chunk: int = 0
    views: int = 1  # V augmented views per sample (``augment`` says how they are drawn)
    augment: str = "none"  # a softlabels.augment policy spec, e.g. "shift1d:max=6"
    augment_seed: int = 0  # parameters of (sample i, view v) depend only on (augment_seed, i, v)
    # fsspec options for a remote ``out`` (endpoint, credentials): travel to the workers with the
    # config because they may not share the driver's environment; never shown nor serialised.
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False, hash=False)
    # the dump run that owns the store (set by the driver): workers stop if the store changes owner
    run_id: str | None = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("storage_options")  # may hold credentials
        d.pop("run_id")
        d["temperatures"] = list(self.temperatures)
        d["feature_layers"] = list(self.feature_layers)
        return d


def feature_store_name(layer: str) -> str:
    """Array name under ``features/`` for a module name (``layer4.1`` -> ``layer4.1``)."""
    return layer.replace("/", "_")


@dataclass(frozen=True)
class Loaded:
    """Dataset and teacher as loaded once by the driver; shipped to workers as one object."""

    dataset: Any
    info: Any
    teacher: Any


def load_inputs(config: DumpConfig) -> Loaded:
    from softlabels.datasets import load_dataset
    from softlabels.teachers import load_teacher

    dataset, info = load_dataset(config.dataset, config.split)
    teacher = load_teacher(config.teacher, config.weights, input_shape=info.input_shape, num_classes=info.num_classes)
    return Loaded(dataset, info, teacher)


class _SampleViews(torch.utils.data.Dataset):
    """Item ``i`` = sample ``i``: its index, its V views' parameters and the V views ``[V, ...]``
    built by the policy (what a decode worker computes for a multi-view dump of a file dataset)."""

    def __init__(self, dataset: Any, policy: Any, seed: int, views: int) -> None:
        self.dataset, self.policy, self.seed, self.views = dataset, policy, seed, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        raw = self.policy.sample(self.seed, np.array([i]), self.views, self.dataset)
        params = {fmt.AUGMENT_PREFIX + name: arr[0] for name, arr in raw.items()}
        x = self.policy.build(self.dataset, np.full(self.views, i), {name: arr[0] for name, arr in raw.items()})
        return i, params, x


class _QueuedRanges(torch.utils.data.Sampler):
    """Batch sampler over the row ranges queued so far, in order. Its iterator ends when the
    queue is empty (it never blocks), and the next epoch starts at whatever was queued since."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.queued: collections.deque[tuple[int, int]] = collections.deque()

    def __iter__(self):
        while self.queued:
            start, stop = self.queued.popleft()
            for s in range(start, stop, self.batch_size):
                yield list(range(s, min(s + self.batch_size, stop)))


class BatchStream:
    """One persistent DataLoader over the units a worker will compute, in order.

    Why: a DataLoader per unit restarts its decode processes at every unit and lets them idle
    while the teacher computes the unit's last batch. Here the caller *announces* units as soon
    as it knows them (the Ray actor: when the call arrives, before the unit before it has
    finished), the decode workers run ahead across unit boundaries, and :meth:`batches` hands
    out each unit's batches when its turn comes. A unit asked for out of turn, or a unit whose
    consumer stopped early (an error), resets the stream: correctness never depends on the
    announcements, only the prefetch does.
    """

    def __init__(self, dataset: Any, batch_size: int, workers: int, pin_memory: bool) -> None:
        self.batch_size = batch_size
        self._ranges = _QueuedRanges(batch_size)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._ranges, num_workers=workers, pin_memory=pin_memory,
            persistent_workers=workers > 0,
        )
        self._announced: collections.deque[tuple[int, int]] = collections.deque()
        self._iterator = None

    def announce(self, start: int, stop: int) -> None:
        """Rows ``[start, stop)`` will be asked for after every range announced before them."""
        self._announced.append((start, stop))
        self._ranges.queued.append((start, stop))

    def reset(self) -> None:
        self._announced.clear()
        self._ranges.queued.clear()
        self._iterator = None  # the next iter() of the persistent loader drops what is in flight

    def batches(self, start: int, stop: int):
        """The collated batches of rows ``[start, stop)``, in order."""
        if not self._announced or self._announced[0] != (start, stop):
            later = [r for r in self._announced if r != (start, stop)]
            self.reset()
            for r in [(start, stop), *later]:
                self.announce(*r)
        finished = False
        try:
            for _ in range(math.ceil((stop - start) / self.batch_size)):
                yield self._next()
            finished = True
        finally:
            if finished:
                self._announced.popleft()
            else:  # the consumer failed or stopped mid-unit: its other batches are in flight
                self.reset()

    def _next(self):
        if self._iterator is not None:
            try:
                return next(self._iterator)
            except StopIteration:
                pass  # everything queued so far was delivered; start an epoch over the new ranges
        self._iterator = iter(self._loader)
        return next(self._iterator)


class TeacherPredictor:
    """Holds teacher + dataset; :meth:`predict_unit` returns a unit's fields as numpy arrays."""

    def __init__(self, config: DumpConfig, device: torch.device | None = None, loaded: Loaded | None = None) -> None:
        from softlabels.teachers import FeatureRecorder

        self.config = config
        self.device = device or pick_device()
        if config.threads_per_worker:
            import numcodecs.blosc

            torch.set_num_threads(config.threads_per_worker)
            numcodecs.blosc.set_nthreads(config.threads_per_worker)  # compression shares the budget
        loaded = loaded or load_inputs(config)
        self.dataset, self.info, self.teacher = loaded.dataset, loaded.info, loaded.teacher
        self.model = self.teacher.model.to(self.device).eval()
        layers = {feature_store_name(name): name for name in config.feature_layers}
        self._recorder = FeatureRecorder(self.model, layers)
        self._layers = list(layers)
        self.labeled = self.info.labels is not None
        self.k = config.k if config.k is not None else min(DEFAULT_K, int(self.teacher.num_classes))
        self.rows_done = 0  # rows through the teacher so far (progress between units)
        self._writer: StoreWriter | None = None
        self._stream: BatchStream | None = None
        from softlabels.augment import get_policy

        self.policy = get_policy(config.augment)
        self.augmented = config.views > 1 or self.policy.name != "none"

    def loaded(self) -> Loaded:
        return Loaded(self.dataset, self.info, self.teacher)

    def _in_memory(self) -> bool:
        return in_memory(self.dataset) is not None

    def _batches(self, start: int, stop: int):
        """Input batches of rows ``[start, stop)``: slices of an in-memory dataset, else from the
        worker's :class:`BatchStream` (decoded in ``loader_workers`` processes)."""
        if self._in_memory():
            for s in range(start, stop, self.config.batch_size):
                yield self.dataset.inputs[s : min(s + self.config.batch_size, stop)]
            return
        for batch in self._batch_stream().batches(start, stop):
            yield batch[0]  # the input of an (input, label, ...) item

    def _batch_stream(self) -> BatchStream:
        """The worker's one stream: of ``(input, label)`` items, or for a multi-view dump of
        :class:`_SampleViews` items (each sample's file decoded once for its V views)."""
        if self._stream is None:
            source = self.dataset
            if self.augmented:
                source = _SampleViews(self.dataset, self.policy, self.config.augment_seed, self.config.views)
            self._stream = BatchStream(source, self.config.batch_size, self.config.loader_workers,
                                       pin_memory=self.device.type == "cuda")
        return self._stream

    def announce(self, start: int, stop: int) -> None:
        """Rows ``[start, stop)`` come next after those already announced: their decoding may
        start now. Only a hint (see :class:`BatchStream`); in-memory datasets (sliced, nothing to
        decode) ignore it."""
        if not self._in_memory():
            self._batch_stream().announce(start, stop)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher logits (float32) and recorded features for one batch."""
        with self._recorder as rec, autocast_for(self.device):
            logits = self.model(x.to(self.device, non_blocking=True))
        # in the order the user named the layers, not the order their hooks fired
        return logits.float(), {name: rec.features[name].float() for name in self._layers}

    def view_params(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Explicit augmentation parameters ``{augment/<name>: [n, V, ...]}`` for samples ``index``."""
        params = self.policy.sample(self.config.augment_seed, index, self.config.views, self.dataset)
        return {fmt.AUGMENT_PREFIX + name: arr for name, arr in params.items()}

    def views_for(self, index: np.ndarray, params: dict[str, np.ndarray], view: int) -> torch.Tensor:
        """The inputs the teacher sees for view ``view`` of samples ``index``: the policy's
        ``build`` -- the same function the trainer replays the stored parameters with."""
        one = {name[len(fmt.AUGMENT_PREFIX):]: arr[:, view] for name, arr in params.items()}
        return self.policy.build(self.dataset, index, one)

    def _view_batches(self, start: int, stop: int):
        """``(index, params, views)`` per batch; ``views(v)`` gives view v's inputs. In-memory
        datasets build a view as one vectorised op; file datasets (images) build all V views of
        a sample in one stream item (decoding the file once), in ``loader_workers`` processes."""
        if self._in_memory():
            for s in range(start, stop, self.config.batch_size):
                index = np.arange(s, min(s + self.config.batch_size, stop), dtype=np.int64)
                params = self.view_params(index)
                yield index, params, lambda view, index=index, params=params: self.views_for(index, params, view)
            return
        for index, params, x in self._batch_stream().batches(start, stop):
            yield index.numpy(), {k: v.numpy() for k, v in params.items()}, lambda view, x=x: x[:, view]

    def _predict_views(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Fields for rows ``[start, stop)`` with V augmented views each, plus their parameters."""
        parts: dict[str, list[np.ndarray]] = {}
        labels_all = None
        if self.labeled:
            labels_all = torch.as_tensor(self.info.labels[start:stop], dtype=torch.long)
        for index, params, views in self._view_batches(start, stop):
            per_view: dict[str, list[np.ndarray]] = {}
            for view in range(self.config.views):
                logits, feats = self.forward(views(view))
                lab = None if labels_all is None else labels_all[index - start].to(logits.device)
                fields = summarize_logits(logits, self.k, self.config.temperatures, lab)
                fields.update({fmt.FEATURES_PREFIX + name: f for name, f in feats.items()})
                for name, t in fields.items():
                    per_view.setdefault(name, []).append(t.cpu().numpy())
            for name, views in per_view.items():
                parts.setdefault(name, []).append(np.stack(views, axis=1))
            for name, arr in params.items():
                parts.setdefault(name, []).append(arr)
            self.rows_done += len(index)
        out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        if labels_all is not None:
            out[fmt.LABELS] = labels_all.numpy()
        return out

    def predict_unit(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Fields for rows ``[start, stop)``: view axis of size V, labels when labelled."""
        if self.augmented:
            return self._predict_views(start, stop)
        parts: dict[str, list[np.ndarray]] = {}
        labels_all = None
        if self.labeled:
            labels_all = torch.as_tensor(self.info.labels[start:stop], dtype=torch.long)
        offset = 0
        for x in self._batches(start, stop):
            logits, feats = self.forward(x)
            n = logits.shape[0]
            lab = None if labels_all is None else labels_all[offset : offset + n].to(logits.device)
            fields = summarize_logits(logits, self.k, self.config.temperatures, lab)
            for name, t in fields.items():
                parts.setdefault(name, []).append(t.unsqueeze(1).cpu().numpy())
            for name, f in feats.items():
                parts.setdefault(fmt.FEATURES_PREFIX + name, []).append(f.unsqueeze(1).cpu().numpy())
            offset += n
            self.rows_done += n
        out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        if labels_all is not None:
            out[fmt.LABELS] = labels_all.numpy()
        return out

    def writer(self) -> StoreWriter:
        if self._writer is None:
            self._writer = StoreWriter(
                self.config.out, storage_options=self.config.storage_options, run_id=self.config.run_id
            )
        return self._writer

    def write_unit(self, unit: int) -> dict[str, str]:
        """Predict and write one unit into the store; returns its digests for the driver."""
        start, stop = self.writer().schema.unit_range(unit)
        return self.writer().write_unit(unit, self.predict_unit(start, stop))

    def probe(self) -> dict[str, Any]:
        """One forward pass on the first sample: class count and feature widths, checked
        before any store is created."""
        if self._in_memory():
            x = self.dataset.inputs[:1]
        else:  # one item in this process: no decode workers for a probe
            x = torch.utils.data.default_collate([self.dataset[0]])[0]
        logits, feats = self.forward(x)
        return {"num_classes": int(logits.shape[-1]), "features": {n: int(f.shape[-1]) for n, f in feats.items()}}
