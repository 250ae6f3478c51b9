"""The softlabels store: Zarr v3 format (``format``), writer, reader and verifier."""

from softlabels.stores.format import FORMAT_VERSION, StoreSchema
from softlabels.stores.metadata import labels_fingerprint
from softlabels.stores.reader import SoftLabelStore, open_store
from softlabels.stores.writer import StoreWriter

__all__ = ["FORMAT_VERSION", "StoreSchema", "StoreWriter", "SoftLabelStore", "open_store", "labels_fingerprint"]
