"""Prep: split, quantize and content-hash a source into a snapshot; write/read snapshots.

A snapshot is immutable and content-addressed: ``snapshots/<dataset>/<hash[:16]>/`` holds
one ``.npz`` per split and, written last, ``manifest.json`` with the sha256 of each file. A
prefix without a manifest is an unfinished write and is never read. The same input with the
same settings gives the same hash and byte-identical files, so re-running prep is free and a
training run names its exact data by hash.

Binary snapshots keep grey intensities for every split (the loader binarizes the training
split afresh each epoch), and additionally store val/test binarized ONCE with a recorded
seed, so that likelihoods of different runs and models are measured on the same bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from genmodels.config import dataclass_from_dict
from genmodels.data.errors import DataError
from genmodels.data.sources import CHANNEL_MODES, RawDataset, read_source, source_names
from genmodels.models.base import ImageSpec
from genmodels.storage import Storage

__all__ = [
    "PrepConfig", "SNAPSHOT_FORMAT", "SPLITS", "Snapshot", "Split", "dataset_names", "load_source",
    "prepare", "read_snapshot", "snapshot_prefix", "write_snapshot",
]

SNAPSHOT_FORMAT = "genmodels.snapshot/1"
SPLITS = ("train", "val", "test")
QUANTIZATIONS = {"binary": 2, "8bit": 256}
MANIFEST = "manifest.json"
# Distinct sub-streams of one seed, so changing e.g. the val size never changes how the
# test split is binarized.
_STREAM_TEST_SPLIT, _STREAM_VAL_SPLIT, _STREAM_TEST_ORDER = 0, 1, 5
_STREAM_BINARIZE = {"train": 2, "val": 3, "test": 4}
# Zip entries get this fixed timestamp: np.savez stamps the current time, which would make
# the same arrays give different bytes on every write.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class PrepConfig:
    quantization: str = "binary"  # "binary" | "8bit"
    val_size: float | int = 0.1  # fraction of train (float) or a count (int) held out for validation
    test_size: float | int = 0.2  # only used when the source has no test split
    seed: int = 0  # split permutation and the one-time val/test binarization
    image_size: int | None = None  # folder sources: resize to (size, size)
    channels: str = "L"  # folder sources: "L" | "RGB"
    max_train: int | None = None  # optional cap on train (quick runs); a deterministic subset

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"PrepConfig.quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        for name in ("val_size", "test_size"):
            v = getattr(self, name)
            if isinstance(v, (float, np.floating)):
                if not 0.0 <= v < 1.0:
                    raise ValueError(f"PrepConfig.{name} as a fraction must lie in [0, 1), got {v}")
            elif not _is_int(v) or v < 0:
                raise ValueError(f"PrepConfig.{name} must be a fraction in [0, 1) or a count >= 0, got {v!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"PrepConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 1):
            raise ValueError(f"PrepConfig.image_size must be None or an int >= 1, got {self.image_size!r}")
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"PrepConfig.channels must be one of {sorted(CHANNEL_MODES)}, got {self.channels!r}")
        if self.max_train is not None and (not _is_int(self.max_train) or self.max_train < 1):
            raise ValueError(f"PrepConfig.max_train must be None or an int >= 1, got {self.max_train!r}")
        # numpy scalars would pass the checks above but break the JSON manifest.
        for name in ("val_size", "test_size", "seed", "image_size", "max_train"):
            v = getattr(self, name)
            if isinstance(v, np.integer):
                object.__setattr__(self, name, int(v))
            elif isinstance(v, np.floating):
                object.__setattr__(self, name, float(v))

    @property
    def levels(self) -> int:
        return QUANTIZATIONS[self.quantization]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrepConfig":
        return dataclass_from_dict(cls, data)


@dataclass
class Split:
    x: np.ndarray  # uint8 [N, C, H, W]: intensities 0..255 (binary) or the 8-bit data itself
    y: np.ndarray  # int64 [N]
    #: uint8 {0, 1} [N, C, H, W]: val/test of binary snapshots, binarized once with the
    #: snapshot's binarize_seed; None for train (binarized dynamically by the loader) and 8-bit.
    x_binary: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise ValueError(f"Split.x must be uint8 [N, C, H, W], got {self.x.dtype} {self.x.shape}")
        if self.y.dtype != np.int64 or self.y.shape != self.x.shape[:1]:
            raise ValueError(f"Split.y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {self.y.shape}")
        if self.x_binary is not None and (self.x_binary.dtype != np.uint8 or self.x_binary.shape != self.x.shape):
            raise ValueError(
                f"Split.x_binary must be uint8 {self.x.shape}, got {self.x_binary.dtype} {self.x_binary.shape}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"x": self.x, "y": self.y}
        if self.x_binary is not None:
            out["x_binary"] = self.x_binary
        return out


@dataclass
class Snapshot:
    dataset: str  # "fashion-mnist", "digits", "folder", "npz"
    image: ImageSpec
    splits: dict[str, Split]  # "train", "val", "test"
    class_names: list[str]
    prep: PrepConfig
    binarize_seed: int | None
    hash: str  # sha256 of the split arrays + dataset, classes, quantization and seeds
    #: provenance: where the source was read from and the digest of its bytes.
    source: dict[str, str] = field(default_factory=dict)
    _files: dict[str, bytes] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def prefix(self) -> str:
        return snapshot_prefix(self.dataset, self.hash)

    def files(self) -> dict[str, bytes]:
        """The bytes of each split's .npz, keyed by file name (computed once)."""
        if self._files is None:
            self._files = {f"{name}.npz": _npz_bytes(self.splits[name].arrays()) for name in SPLITS}
        return self._files

    def manifest(self) -> dict[str, Any]:
        files = self.files()
        splits = {}
        for name in SPLITS:
            s = self.splits[name]
            splits[name] = {
                "file": f"{name}.npz",
                "count": len(s),
                "shape": list(s.x.shape),
                "arrays": sorted(s.arrays()),
                "class_counts": np.bincount(s.y, minlength=self.image.num_classes).tolist(),
            }
        return {
            "format": SNAPSHOT_FORMAT,
            "dataset": self.dataset,
            "hash": self.hash,
            "image": dataclasses.asdict(self.image),
            "quantization": self.prep.quantization,
            "class_names": list(self.class_names),
            "prep": self.prep.to_dict(),
            "seeds": {"split": self.prep.seed, "binarize": self.binarize_seed},
            "splits": splits,
            "files": {
                name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                for name, data in sorted(files.items())
            },
            "source": dict(self.source),
        }


# --- hashing and file format -----------------------------------------------------------


def _content_hash(
    dataset: str, class_names: list[str], prep: PrepConfig, binarize_seed: int | None, splits: Mapping[str, Split]
) -> str:
    h = hashlib.sha256()
    header = {
        "format": SNAPSHOT_FORMAT, "dataset": dataset, "class_names": list(class_names),
        "quantization": prep.quantization, "seed": prep.seed, "binarize_seed": binarize_seed,
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for name in SPLITS:
        arrays = splits[name].arrays()
        for key in ("x", "y", "x_binary"):
            arr = arrays.get(key)
            if arr is None:
                h.update(f"|{name}.{key}:none".encode())
                continue
            arr = np.ascontiguousarray(arr)
            h.update(f"|{name}.{key}:{arr.dtype.str}:{arr.shape}:".encode())
            h.update(arr.reshape(-1).view(np.uint8))  # flat bytes; works for empty splits too
    return h.hexdigest()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load) whose bytes depend only on the arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    return buf.getvalue()


def _npz_arrays(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # any parse failure of a checksummed file means a broken writer
        raise DataError(f"{where}: not a readable snapshot .npz ({exc})") from exc


def snapshot_prefix(dataset: str, content_hash: str) -> str:
    return f"snapshots/{dataset}/{content_hash[:16]}/"


# --- prep --------------------------------------------------------------------------------


def dataset_names() -> list[str]:
    return source_names()


def load_source(dataset: str, location: str | None = None, prep: PrepConfig = PrepConfig()) -> RawDataset:
    """Read and validate a source (the folder source is resized/converted per ``prep``)."""
    return read_source(dataset, location, image_size=prep.image_size, channels=prep.channels)


def _count(size: float | int, n: int, what: str, where: str) -> int:
    k = int(round(size * n)) if isinstance(size, float) else int(size)
    if k == 0 and size > 0:
        # Found out here, not by the evaluation after a whole training run.
        raise DataError(f"{where}: {what}={size!r} of {n} images rounds to none, and that split would be empty; "
                        f"use more images or a count ({what}=1 or more)")
    if k >= n:
        raise DataError(f"{where}: {what}={size!r} would take {k} of {n} images and leave none to train on")
    return k


def _binarize(x: np.ndarray, seed: int, split: str) -> np.ndarray:
    # Bernoulli(p = x / 255): 0 stays 0 and 255 stays 1 exactly, since random() is in [0, 1).
    rng = np.random.default_rng([seed, _STREAM_BINARIZE[split]])
    return (rng.random(x.shape) < x / 255.0).astype(np.uint8)


def prepare(dataset: str, location: str | None = None, prep: PrepConfig = PrepConfig()) -> Snapshot:
    """Source -> validated, split, quantized, hashed snapshot (in memory; nothing is written)."""
    raw = load_source(dataset, location, prep)
    where = raw.location or dataset
    n = len(raw.x)

    if raw.has_test:
        pool = np.arange(n)
        test_order = (np.arange(len(raw.y_test)) if raw.mixed_order else
                      np.random.default_rng([prep.seed, _STREAM_TEST_ORDER]).permutation(len(raw.y_test)))
        x_test, y_test = raw.x_test[test_order], raw.y_test[test_order]
    else:
        n_test = _count(prep.test_size, n, "test_size", where)
        if n_test == 0:
            # Every figure is measured on the test split: found out here, not after a training run.
            raise DataError(f"{where}: test_size={prep.test_size!r} leaves no test split (the source has none "
                            "of its own); every evaluation needs one")
        perm = np.random.default_rng([prep.seed, _STREAM_TEST_SPLIT]).permutation(n)
        test_idx, pool = perm[:n_test], perm[n_test:]
        if raw.mixed_order:
            test_idx = np.sort(test_idx)
        x_test, y_test = raw.x[test_idx], raw.y[test_idx]

    n_val = _count(prep.val_size, len(pool), "val_size", where)
    order = pool[np.random.default_rng([prep.seed, _STREAM_VAL_SPLIT]).permutation(len(pool))]
    val_idx, train_idx = order[:n_val], order[n_val:]
    if prep.max_train is not None:
        train_idx = train_idx[: prep.max_train]  # a random subset: `order` is shuffled
    # The caps that take a split's first examples (max_train_examples, max_val_examples, a quick
    # evaluation's first test images) need an order that mixes the classes: a mixed source keeps
    # its own inside each split, any other keeps the seeded shuffle (a folder's first 500 training
    # images were its first four classes). The loader shuffles train either way.
    if raw.mixed_order:
        val_idx, train_idx = np.sort(val_idx), np.sort(train_idx)

    parts = {
        "train": (raw.x[train_idx], raw.y[train_idx]),
        "val": (raw.x[val_idx], raw.y[val_idx]),
        "test": (x_test, y_test),
    }
    binary = prep.quantization == "binary"
    binarize_seed = prep.seed if binary else None
    splits = {
        name: Split(
            np.ascontiguousarray(x),
            np.ascontiguousarray(y, dtype=np.int64),
            _binarize(x, prep.seed, name) if binary and name != "train" else None,
        )
        for name, (x, y) in parts.items()
    }
    c, h, w = raw.image_shape
    image = ImageSpec(channels=c, height=h, width=w, levels=prep.levels, num_classes=raw.num_classes)
    return Snapshot(
        dataset=dataset,
        image=image,
        splits=splits,
        class_names=list(raw.class_names),
        prep=prep,
        binarize_seed=binarize_seed,
        hash=_content_hash(dataset, raw.class_names, prep, binarize_seed, splits),
        source={"location": raw.location, "sha256": raw.source_sha256},
    )


# --- snapshot storage ---------------------------------------------------------------------


def _normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _verify_files(storage: Storage, prefix: str, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    files = manifest.get("files")
    if not isinstance(files, Mapping) or not files:
        raise DataError(f"{storage.url_for(prefix + MANIFEST)}: manifest lists no files")
    out = {}
    for name, meta in sorted(files.items()):
        key = prefix + name
        try:
            data = storage.get_bytes(key)
        except FileNotFoundError:
            raise DataError(f"{storage.url_for(key)}: listed in the manifest but missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != meta.get("sha256"):
            raise DataError(
                f"{storage.url_for(key)}: checksum mismatch: sha256 {actual} but the manifest says "
                f"{meta.get('sha256')} (corrupted or partially written object)"
            )
        out[name] = data
    return out


def write_snapshot(snapshot: Snapshot, storage: Storage) -> str:
    """Write the split files, then the manifest; return the key prefix of the snapshot.

    Rewriting a snapshot that is already there and verifies is a no-op; a broken one (a
    file missing or failing its checksum) is repaired.
    """
    prefix = snapshot.prefix
    manifest_key = prefix + MANIFEST
    if storage.exists(manifest_key):
        try:
            existing = storage.get_json(manifest_key)
        except ValueError:
            existing = {"hash": snapshot.hash, "files": {}}  # unparseable: repaired below
        if existing.get("hash") != snapshot.hash:
            raise DataError(
                f"{storage.url_for(manifest_key)}: holds snapshot {existing.get('hash')}, not {snapshot.hash} "
                "(hash prefix collision); refusing to overwrite"
            )
        try:
            _verify_files(storage, prefix, existing)
            return prefix
        except DataError:
            # Unpublish first: readers must never pair the old manifest with new files.
            storage.delete(manifest_key)
    manifest = snapshot.manifest()
    for name, data in sorted(snapshot.files().items()):
        storage.put_bytes(prefix + name, data)
    storage.put_json(manifest_key, manifest)
    return prefix


def read_snapshot(storage: Storage, prefix: str = "") -> Snapshot:
    """Read a snapshot written by write_snapshot; every file's sha256 is checked (DataError)."""
    prefix = _normalize_prefix(prefix)
    manifest_key = prefix + MANIFEST
    try:
        manifest = storage.get_json(manifest_key)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no snapshot at {storage.url_for(manifest_key)} (missing manifest: never written or unfinished)"
        ) from None
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    where = storage.url_for(manifest_key)
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        raise DataError(f"{where}: not a snapshot manifest (expected format {SNAPSHOT_FORMAT!r})")
    files = _verify_files(storage, prefix, manifest)
    try:
        prep = PrepConfig.from_dict(manifest["prep"])
        image = ImageSpec(**manifest["image"])
        splits = {}
        for name in SPLITS:
            fname = manifest["splits"][name]["file"]
            arrays = _npz_arrays(files[fname], storage.url_for(prefix + fname))
            splits[name] = Split(arrays["x"], arrays["y"], arrays.get("x_binary"))
        snapshot = Snapshot(
            dataset=manifest["dataset"],
            image=image,
            splits=splits,
            class_names=list(manifest["class_names"]),
            prep=prep,
            binarize_seed=manifest["seeds"]["binarize"],
            hash=manifest["hash"],
            source=dict(manifest.get("source", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: inconsistent snapshot manifest or files ({type(exc).__name__}: {exc})") from exc
    for name, split in splits.items():
        if split.x.shape[1:] != image.shape:
            raise DataError(
                f"{where}: split {name!r} holds images {split.x.shape[1:]} but the manifest says {image.shape}"
            )
    actual = _content_hash(snapshot.dataset, snapshot.class_names, prep, snapshot.binarize_seed, splits)
    if actual != snapshot.hash:
        raise DataError(f"{where}: content hash {actual} does not match the manifest's {snapshot.hash}")
    if set(files) == {f"{name}.npz" for name in SPLITS}:
        snapshot._files = files  # verified bytes: rewriting elsewhere needs no re-encoding
    return snapshot
