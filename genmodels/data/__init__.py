"""Data: sources, validation, quantization, splits and content-addressed snapshots.

``prepare(dataset, location, PrepConfig(...))`` reads and validates a source and returns an
in-memory :class:`Snapshot`; ``write_snapshot`` / ``read_snapshot`` move it to and from any
:mod:`genmodels.storage` root with checksums.
"""

from genmodels.data.errors import DataError
from genmodels.data.prep import (
    SNAPSHOT_FORMAT,
    SPLITS,
    PrepConfig,
    Snapshot,
    Split,
    dataset_names,
    load_source,
    prepare,
    read_snapshot,
    snapshot_prefix,
    write_snapshot,
)
from genmodels.data.sources import FASHION_MNIST_CLASSES, RawDataset, decode_idx, encode_idx

__all__ = [
    "DataError", "FASHION_MNIST_CLASSES", "PrepConfig", "RawDataset", "SNAPSHOT_FORMAT", "SPLITS",
    "Snapshot", "Split", "dataset_names", "decode_idx", "encode_idx", "load_source", "prepare",
    "read_snapshot", "snapshot_prefix", "write_snapshot",
]
