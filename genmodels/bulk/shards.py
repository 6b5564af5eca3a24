"""Shard codecs: a shard's bytes are a pure function of (uint8 images, indices, labels, format)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Mapping

import numpy as np

from genmodels.bulk.spec import FORMATS

# Rows sampled per call inside a shard (and per Parquet row group): bounds memory for million-sample shards.
CHUNK = 4096
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_PNG_LEVEL = 6


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1] -> uint8 grey levels ``round(255 * x)`` (see the module docstring)."""
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    c = image.shape[0]
    if c == 1:
        pil = Image.fromarray(image[0], mode="L")
    elif c == 3:
        pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")
    else:
        raise ValueError(f"png shards need 1 or 3 channels, got {c}")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=_PNG_LEVEL)
    return buf.getvalue()


def png_array(payload: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [C, H, W]."""
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as img:
        arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("index", pa.int64(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
    ])


def _parquet_bytes(images: np.ndarray, index: np.ndarray, labels: np.ndarray | None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    _, c, h, w = images.shape
    order = np.argsort(index, kind="stable")
    sink = pa.BufferOutputStream()
    # Row groups of CHUNK rows: a binary column chunk stays far below Arrow's 2 GiB per-array
    # limit whatever the shard size, and readers (Ray Data) can split a big shard.
    with pq.ParquetWriter(sink, schema, compression="none", write_statistics=True) as writer:
        for s in range(0, len(order), CHUNK):
            rows = order[s:s + CHUNK]
            count = len(rows)
            writer.write_table(pa.table({
                "index": pa.array(index[rows].astype(np.int64), pa.int64()),
                "label": pa.nulls(count, pa.int64()) if labels is None
                else pa.array(labels[rows].astype(np.int64), pa.int64()),
                "image": pa.array([_png_bytes(images[r]) for r in rows], pa.binary()),
                "height": pa.array(np.full(count, h, np.int32)),
                "width": pa.array(np.full(count, w, np.int32)),
                "channels": pa.array(np.full(count, c, np.int32)),
            }, schema=schema))
    return sink.getvalue().to_pybytes()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def encode_shard(images: np.ndarray, index: np.ndarray, labels: np.ndarray | None, fmt: str) -> bytes:
    """One shard's bytes: a pure function of (uint8 images, indices, labels, format)."""
    if fmt == "npz":
        arrays = {"images": images, "index": index.astype(np.int64)}
        if labels is not None:
            arrays["labels"] = labels.astype(np.int64)
        return _npz_bytes(arrays)
    if fmt == "png":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in np.argsort(index, kind="stable"):
                i = int(index[row])
                _tar_add(tar, f"{i:09d}.png", _png_bytes(images[row]))
                if labels is not None:
                    _tar_add(tar, f"{i:09d}.cls", str(int(labels[row])).encode())
        return buf.getvalue()
    if fmt == "parquet":
        return _parquet_bytes(images, index, labels)
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def decode_shard(data: bytes, fmt: str) -> dict[str, np.ndarray]:
    """A shard's bytes -> ``{"images": uint8 [n, C, H, W], "index": int64 [n], "labels"?}``."""
    if fmt == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if fmt == "png":
        images: dict[int, np.ndarray] = {}
        labels: dict[int, int] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                payload = tar.extractfile(member).read()
                if ext == "png":
                    images[int(stem)] = png_array(payload)
                elif ext == "cls":
                    labels[int(stem)] = int(payload)
        order = sorted(images)
        out = {"images": np.stack([images[i] for i in order]).astype(np.uint8),
               "index": np.asarray(order, dtype=np.int64)}
        if labels:
            out["labels"] = np.asarray([labels[i] for i in order], dtype=np.int64)
        return out
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(data))
        out = {"images": np.stack([png_array(b) for b in table.column("image").to_pylist()]).astype(np.uint8),
               "index": table.column("index").to_numpy().astype(np.int64)}
        label = table.column("label")
        if label.null_count < len(label):
            out["labels"] = label.to_numpy().astype(np.int64)
        return out
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")



def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

