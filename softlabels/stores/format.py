"""Store format v1: array names, shapes, dtypes, chunk/shard layout, codecs and metadata.

This module is the single source of truth for what ``docs/FORMAT.md`` specifies. Writer,
reader and verifier all derive the layout from a :class:`StoreSchema`, so they cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from softlabels.errors import InvalidTargetsError
# The per-sample field names live in softlabels.fields (the one list); re-exported here.
from softlabels.fields import (
    AUGMENT_PREFIX,
    FEATURES_PREFIX,
    FIELDS,
    LABEL_LOGIT,
    LABELS,
    LOGSUMEXP,
    TOPK_INDICES,
    TOPK_VALUES,
    check_k_range,
)

FORMAT_NAME = "softlabels"
FORMAT_VERSION = "1.2"  # 1.1: metadata_sha256, label_in_topk; optional augment/<param> arrays (multi-view dumps)
# 1.2: the compact target codec; float16 log-probabilities clamped at -65504 (summary.float16_clamped);
# crop-flip view 0 = the eval view; run_id, generation, store_digest
FORMAT_MAJOR = 1
# Stores a reader older than this cannot decode record it (the compact codec: "1.2").
MIN_READER_KEY = "min_reader_version"
COMPACT_MIN_READER = "1.2"
ATTRS_KEY = "softlabels"

# float16 stores clamp the normalised logits (log-probabilities, always <= 0) of these arrays at
# the float16 minimum instead of refusing them, when every stored T is below CLAMP_MAX_TEMPERATURE:
# then exp(v / T) is exactly 0 in float32 for v and for the clamp bound alike (docs/FORMAT.md §2).
CLAMPED_LOG_PROBS = (TOPK_VALUES, LABEL_LOGIT)
FLOAT16_MIN = -65504.0
CLAMP_MAX_TEMPERATURE = 600.0  # exp(-65504 / T) is exactly 0 in float32 for T < 630
AUGMENT_DTYPES = ("uint8", "int16", "int32")
CLASSIFIER_WEIGHT = "teacher/classifier_weight"
CLASSIFIER_BIAS = "teacher/classifier_bias"
UNITS_COMPLETE = "units/complete"
UNITS_SHA256 = "units/sha256"
UNITS_CODEC_FIDELITY = "units/codec_fidelity"
CODEC_FIDELITY_COLUMNS = ("kl_sum", "kl_max", "rows", "top1_agree")

VALUE_DTYPES = ("float16", "float32")
CODEC_FIELDS = (TOPK_VALUES, TOPK_INDICES, LOGSUMEXP, LABEL_LOGIT)  # what the compact codec encodes
COMPACT_LOGP_GAPS = "compact/logp_gaps"
COMPACT_LABEL_GAP = "compact/label_gap"
COMPACT_VALUE_DTYPE = "uint8"  # schema.value_dtype of compact stores: the values are stored as uint8 codes
FEATURE_DTYPE = "float16"
MAX_UINT16_CLASSES = 65_536

# Layout defaults, justified by benchmarks/store_io.py (see BENCHMARKS.md): 65,536-row shards
# are the unit of work and of atomic writes; 8,192-row inner chunks are the unit of reads.
TARGET_ZSTD_LEVEL = 9
FEATURE_ZSTD_LEVEL = 1
DEFAULT_ROWS_PER_SHARD = 65_536
DEFAULT_ROWS_PER_CHUNK = 8_192
MIN_ROWS_PER_SHARD = 256
TARGET_UNITS_SMALL_STORE = 16

# Bounds on counts read from (untrusted) metadata, checked before anything of that size is
# allocated or iterated (FORMAT.md §6 "Bounds"): far above any real store, far below a hang.
MAX_SAMPLES = 2**40
MAX_UNITS = 2**20
MAX_CLASSES = 2**31 - 1
MAX_VIEWS = 2**16
MAX_FEATURE_DIM = 2**20
MAX_TEMPERATURES = 64


def newer_minor(version: object) -> bool:
    """True for a ``format_version`` of this major with a newer minor: such a store may hold
    arrays and keys this reader does not know, which it must ignore (not flag, but copy)."""
    try:
        major, minor = (int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return False
    return major == FORMAT_MAJOR and minor > int(FORMAT_VERSION.split(".")[1])


def plain_name(name: str) -> bool:
    """A feature or augmentation name becomes one path segment of an object key: it must not be
    empty, ``.`` or ``..``, nor hold ``/``, ``\\`` or NUL (keys must stay inside the store)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\x00")


def index_dtype(num_classes: int) -> str:
    """uint16 covers C <= 65,536 (indices 0..65,535); larger vocabularies need int32."""
    return "uint16" if num_classes <= MAX_UINT16_CLASSES else "int32"


def default_layout(num_samples: int) -> tuple[int, int]:
    """(rows_per_shard, rows_per_chunk) for N rows.

    Big stores get 65,536-row shards of 8,192-row chunks. Small stores (a dataset of a few
    thousand rows) get smaller power-of-two shards so that there are ~16 units of work to
    spread over workers and to resume from.
    """
    shard = DEFAULT_ROWS_PER_SHARD
    while shard > MIN_ROWS_PER_SHARD and num_samples / shard < TARGET_UNITS_SMALL_STORE:
        shard //= 2
    return shard, min(DEFAULT_ROWS_PER_CHUNK, shard)


@dataclass(frozen=True)
class ArraySpec:
    """One Zarr array of the store: where it lives, its shape, dtype and layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    per_sample: bool


@dataclass(frozen=True)
class StoreSchema:
    """Everything that defines a store's content. Two dumps with equal schemas produce
    identical arrays; a resume is only allowed into a store with an equal schema."""

    num_samples: int
    num_classes: int
    k: int
    temperatures: tuple[float, ...]
    views: int = 1
    labeled: bool = True
    value_dtype: str = "float16"
    features: tuple[tuple[str, int], ...] = ()
    classifier_dim: int | None = None
    classifier_bias: bool = False
    rows_per_shard: int = 0
    rows_per_chunk: int = 0
    teacher: Mapping[str, Any] = field(default_factory=dict)
    dataset: Mapping[str, Any] = field(default_factory=dict)
    augmentation: Mapping[str, Any] | None = None
    codec: Mapping[str, Any] | None = None  # None: the fp16/fp32 layout; else the compact codec's record (§8)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InvalidTargetsError(f"a store needs at least one sample, got num_samples={self.num_samples}")
        _bounded("num_samples", self.num_samples, MAX_SAMPLES)
        _bounded("num_classes", self.num_classes, MAX_CLASSES)
        _bounded("views", self.views, MAX_VIEWS)
        _bounded("number of temperatures", len(self.temperatures), MAX_TEMPERATURES)
        for _, dim in self.features:
            _bounded("feature dim", int(dim), MAX_FEATURE_DIM)
        if self.num_classes < 2:
            raise InvalidTargetsError(f"a classifier needs at least 2 classes, got num_classes={self.num_classes}")
        check_k_range(self.k, self.num_classes)
        temps = tuple(float(t) for t in self.temperatures)
        if not temps or any(not math.isfinite(t) or t <= 0 for t in temps):
            raise InvalidTargetsError(f"temperatures must be positive numbers, got {list(self.temperatures)}")
        if len(set(temps)) != len(temps):
            raise InvalidTargetsError(f"temperatures contain duplicates: {list(temps)}")
        object.__setattr__(self, "temperatures", temps)
        if self.views < 1:
            raise InvalidTargetsError(f"views must be >= 1, got {self.views}")
        if self.codec is not None:
            self._set_codec()
        elif self.value_dtype not in VALUE_DTYPES:
            raise InvalidTargetsError(f"value dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        feats = tuple((str(n), int(d)) for n, d in self.features)
        for name, dim in feats:
            if not plain_name(name) or dim < 1:
                raise InvalidTargetsError(
                    f"bad feature array {name!r} with dim {dim}: names are plain (no '/', not '.' or '..'), dims >= 1"
                )
        object.__setattr__(self, "features", feats)
        if not self.rows_per_shard or not self.rows_per_chunk:
            shard, chunk = default_layout(self.num_samples)
            object.__setattr__(self, "rows_per_shard", self.rows_per_shard or shard)
            object.__setattr__(self, "rows_per_chunk", self.rows_per_chunk or min(chunk, self.rows_per_shard or shard))
        if self.rows_per_chunk < 1 or self.rows_per_shard < 1:
            raise InvalidTargetsError(f"rows_per_shard and rows_per_chunk must be >= 1, got {self.rows_per_shard}, "
                                      f"{self.rows_per_chunk}")
        _bounded("num_units", -(-self.num_samples // self.rows_per_shard), MAX_UNITS)
        if self.rows_per_shard % self.rows_per_chunk:
            raise InvalidTargetsError(
                f"rows_per_shard={self.rows_per_shard} must be a multiple of rows_per_chunk={self.rows_per_chunk}"
            )
        object.__setattr__(self, "teacher", dict(self.teacher))
        object.__setattr__(self, "dataset", dict(self.dataset))
        if self.augmentation is not None:
            object.__setattr__(self, "augmentation", dict(self.augmentation))
            for name, spec in dict(self.augmentation.get("arrays", {})).items():
                if not plain_name(name) or spec.get("dtype") not in AUGMENT_DTYPES:
                    raise InvalidTargetsError(
                        f"bad augmentation array {name!r} {spec!r}: names are plain, dtypes one of {AUGMENT_DTYPES}"
                    )

    def _set_codec(self) -> None:
        codec = dict(self.codec or {})
        if self.value_dtype not in ("float16", COMPACT_VALUE_DTYPE):  # float16: the caller's default
            raise InvalidTargetsError(
                f"value dtype {self.value_dtype} applies to the fp16 codec only; the compact codec stores uint8 codes"
            )
        object.__setattr__(self, "value_dtype", COMPACT_VALUE_DTYPE)
        object.__setattr__(self, "codec", self.compact_codec_from(codec).to_dict())

    def compact_codec_from(self, codec: Mapping[str, Any]) -> Any:
        from softlabels.stores.codecs.compact import CompactCodec

        if codec.get("name") == "compact" and "logp_step" not in codec:  # a new store: the defaults
            return CompactCodec(self.num_classes, self.k, self.temperatures)
        return CompactCodec.from_dict(codec, num_classes=self.num_classes, k=self.k, temperatures=self.temperatures)

    @property
    def compact(self) -> Any:
        """The :class:`~softlabels.stores.codecs.compact.CompactCodec` of a compact store, else None."""
        return None if self.codec is None else self.compact_codec_from(self.codec)

    @property
    def codec_name(self) -> str:
        return "fp16" if self.codec is None else str(self.codec["name"])

    # -- derived layout -------------------------------------------------------------
    @property
    def index_dtype(self) -> str:
        return index_dtype(self.num_classes) if self.codec is None else self.compact.index_dtype

    @property
    def num_units(self) -> int:
        return -(-self.num_samples // self.rows_per_shard)

    def unit_range(self, unit: int) -> tuple[int, int]:
        """Rows [start, stop) of work unit ``unit``: exactly one shard of every per-sample array."""
        if not 0 <= unit < self.num_units:
            raise IndexError(f"unit {unit} outside 0..{self.num_units - 1}")
        start = unit * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.num_samples)

    def per_sample_arrays(self) -> list[ArraySpec]:
        """Per-sample arrays in their canonical order (the order of ``units/sha256``)."""
        n, v = self.num_samples, self.views

        def spec(name: str, tail: tuple[int, ...], dtype: str) -> ArraySpec:
            return ArraySpec(
                name=name,
                shape=(n, *tail),
                dtype=dtype,
                chunks=(self.rows_per_chunk, *tail),
                shards=(self.rows_per_shard, *tail),
                per_sample=True,
            )

        dtypes = {"value": self.value_dtype, "index": self.index_dtype}
        fields = [f for f in FIELDS if self.labeled or not f.labeled_only]
        compact = self.compact
        if compact is not None:  # the codec's arrays stand in for the top-k fields (docs/FORMAT.md §8)
            specs = [spec(name, (v, *tail), dtype) for name, _, tail, dtype in compact.arrays(self.labeled)]
            fields = [f for f in fields if f.name not in CODEC_FIELDS]
        else:
            specs = []
        specs += [spec(f.name, f.shape(v, self.k, len(self.temperatures)), dtypes.get(f.dtype, f.dtype)) for f in fields]
        for name, dim in self.features:
            specs.append(spec(FEATURES_PREFIX + name, (v, dim), FEATURE_DTYPE))
        for name, aug in dict((self.augmentation or {}).get("arrays", {})).items():
            specs.append(spec(AUGMENT_PREFIX + name, (v, *(int(d) for d in aug["shape"])), str(aug["dtype"])))
        return specs

    def fields(self) -> list[ArraySpec]:
        """The per-sample fields a reader returns, with their in-memory dtypes: the stored arrays
        for the fp16 codec; for the compact codec the decoded ``topk_values``, ``logsumexp`` and
        ``label_logit`` (float32) and ``topk_indices`` (uint16) in place of its coded arrays."""
        stored = self.per_sample_arrays()
        if self.codec is None:
            return stored
        n, v, rows, shard = self.num_samples, self.views, self.rows_per_chunk, self.rows_per_shard
        dtypes = {"value": "float32", "index": "uint16"}  # what the compact decoder returns
        specs = []
        for f in FIELDS:
            if f.name in CODEC_FIELDS and (self.labeled or not f.labeled_only):
                tail = f.shape(v, self.k, len(self.temperatures))
                specs.append(ArraySpec(f.name, (n, *tail), dtypes.get(f.dtype, f.dtype), (rows, *tail), (shard, *tail), True))
        return specs + [s for s in stored if not s.name.startswith("compact/")]

    def logical_bytes_per_sample(self) -> int:
        """Uncompressed bytes of one row over all per-sample arrays (docs/FORMAT.md gives the
        formula: linear in V for everything but ``labels``)."""
        return sum(math.prod(a.shape[1:]) * np.dtype(a.dtype).itemsize for a in self.per_sample_arrays())

    def constant_arrays(self) -> list[ArraySpec]:
        """Arrays written once: teacher classifier and the completion records."""
        specs = []
        if self.classifier_dim is not None:
            shape = (self.num_classes, self.classifier_dim)
            specs.append(ArraySpec(CLASSIFIER_WEIGHT, shape, "float32", shape, None, False))
            if self.classifier_bias:
                specs.append(ArraySpec(CLASSIFIER_BIAS, (self.num_classes,), "float32", (self.num_classes,), None, False))
        n_arrays = len(self.per_sample_arrays())
        specs.append(ArraySpec(UNITS_COMPLETE, (self.num_units,), "uint8", (1,), None, False))
        specs.append(ArraySpec(UNITS_SHA256, (self.num_units, n_arrays, 32), "uint8", (1, n_arrays, 32), None, False))
        if self.codec is not None:
            shape = (self.num_units, len(self.temperatures), len(CODEC_FIDELITY_COLUMNS))
            specs.append(ArraySpec(UNITS_CODEC_FIDELITY, shape, "float64", (1, *shape[1:]), None, False))
        return specs

    def all_arrays(self) -> list[ArraySpec]:
        return self.per_sample_arrays() + self.constant_arrays()

    # -- JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        d["features"] = {name: dim for name, dim in self.features}
        d["index_dtype"] = self.index_dtype
        d["feature_dtype"] = FEATURE_DTYPE
        d["num_units"] = self.num_units
        d["per_sample_arrays"] = [a.name for a in self.per_sample_arrays()]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreSchema:
        return cls(
            num_samples=int(d["num_samples"]),
            num_classes=int(d["num_classes"]),
            k=int(d["k"]),
            temperatures=tuple(float(t) for t in d["temperatures"]),
            views=int(d.get("views", 1)),
            labeled=bool(d.get("labeled", True)),
            value_dtype=str(d.get("value_dtype", "float16")),
            features=tuple((str(n), int(dim)) for n, dim in dict(d.get("features", {})).items()),
            classifier_dim=None if d.get("classifier_dim") is None else int(d["classifier_dim"]),
            classifier_bias=bool(d.get("classifier_bias", False)),
            rows_per_shard=int(d["rows_per_shard"]),
            rows_per_chunk=int(d["rows_per_chunk"]),
            teacher=dict(d.get("teacher", {})),
            dataset=dict(d.get("dataset", {})),
            augmentation=None if d.get("augmentation") is None else dict(d["augmentation"]),
            codec=None if d.get("codec") is None else dict(d["codec"]),
        )

    def differences(self, other: StoreSchema) -> list[str]:
        """Human-readable list of fields that differ (used to refuse a resume)."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        out = []
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{key}: store has {a.get(key)!r}, this run has {b.get(key)!r}")
        return out


def _bounded(what: str, value: int, limit: int) -> None:
    if value > limit:
        raise InvalidTargetsError(f"{what} = {value} exceeds this format's bound of {limit:,}")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def codecs_for(spec: ArraySpec) -> dict[str, Any]:
    """Zarr v3 codec settings: blosc(zstd, level 9; level 1 for features) with byte shuffle for
    floats and bit shuffle for integers (the best of the six combinations measured on teacher-like top-k data, see
    BENCHMARKS.md), crc32c on every chunk and on every shard index (zarr's default
    ``index_codecs``). Returned as kwargs for ``zarr.create_array``."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    itemsize = np.dtype(spec.dtype).itemsize
    shuffle = "shuffle" if spec.dtype in ("float16", "float32") else "bitshuffle"
    filters: tuple[Any, ...] = ()
    if spec.name == COMPACT_LOGP_GAPS and spec.shape[1] == 1:  # one view: rank-major + bitshuffle, -10 % bytes
        from zarr.codecs import TransposeCodec

        filters = (TransposeCodec(order=(*range(1, len(spec.shape)), 0)),)
    elif spec.name in (COMPACT_LOGP_GAPS, COMPACT_LABEL_GAP):
        # gaps of several views: row-major, so zstd matches each view against the sample's others
        # (-18 % bytes against rank-major + bitshuffle); label gaps, mostly 0: -12 % against bitshuffle
        shuffle = "shuffle"
    elif spec.name.startswith("compact/") and itemsize == 1:  # bitshuffle costs 13-130 % more bytes here
        shuffle = "noshuffle"
    # Feature rows are wide (hundreds of values): level 9 costs ~35x the time of level 1 for
    # ~13 % fewer bytes, enough to slow a dump by 15 %. Top-k rows are tiny: level 9 is cheap.
    level = FEATURE_ZSTD_LEVEL if spec.name.startswith(FEATURES_PREFIX) else TARGET_ZSTD_LEVEL
    compressor = BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=itemsize)
    kwargs: dict[str, Any] = {
        "serializer": BytesCodec(endian="little"),
        "compressors": (compressor, Crc32cCodec()),
        "filters": filters,
    }
    return kwargs
