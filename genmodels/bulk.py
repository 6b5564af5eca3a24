"""Bulk generation: millions of samples written to object storage as shards plus a manifest.

A job is a :class:`JobSpec` (model name and resolved version, ``n``, seed, labels, temperature,
shard size, format, output URL). Its output prefix holds::

    job.json                    the job (spec + sha256 of the model's graphs), written first
    shards/shard-00000.npz      shard k: samples [k*shard_size, min(n, (k+1)*shard_size))
    ...                         (.npz, .tar or .parquet: the folder holds nothing but shards)
    sidecars/shard-00000.json   shard k's sidecar record (key, count, start, end, sha256, bytes),
                                written after the shard object
    manifest.json               written last: the job, the model, every shard record, totals

``shards/`` holds the shard objects only, so a reader given the folder (``pyarrow.dataset``,
``pandas.read_parquet``, ``ray.data.read_parquet``, ``datasets.load_dataset("parquet")``,
``ray.data.read_webdataset``) reads every sample once and nothing else. Outputs written before
sidecars moved out (``shards/shard-00000.json``) still resume: their sidecars are accepted where
they are.

Every object is written with one atomic put. Sample ``i`` is image ``i`` of the seed under
:meth:`genmodels.sampling.OnnxSampler.sample`, so it is the same whatever the shard size, the
number of workers or how often the job was restarted, and a shard's bytes depend only on the
job and the shard index. That makes the job resumable: a shard whose sidecar exists and whose
object still hashes to the sidecar's sha256 is skipped; any other is (re)written. Re-running a
finished job verifies every shard and writes nothing.

Shard formats (bytes are a pure function of the samples):

- ``npz`` (``np.load``-able, stored without compression so that the bytes do not depend on the
  zlib build): ``images`` uint8 [count, C, H, W], ``index`` int64 [count] (sample indices),
  ``labels`` int64 [count] for class-conditional models only.
- ``png``: an uncompressed tar in the webdataset layout: ``<index:09d>.png`` per sample (grey
  for one channel, RGB for three) and ``<index:09d>.cls`` (the label as text) for conditional
  models; members sorted by index, mtime 0, uid/gid 0. PNG bytes come from Pillow's zlib at a
  fixed level: identical on one build, possibly not across zlib builds (resume is unaffected:
  it checks each shard against the sha256 recorded when *that* shard was written).
- ``parquet``: one file, rows sorted by index, columns ``index`` int64, ``label`` int64 (null
  for unconditional models), ``image`` binary (the PNG bytes of the ``png`` format), ``height``,
  ``width``, ``channels`` int32; uncompressed (PNG is compressed already), one row group per
  :data:`_CHUNK` rows. Bytes are identical for one pyarrow and zlib build (the file names its
  writer, ``parquet-cpp-arrow version X``); resume is unaffected, as for ``png``.

Pixel values: ``uint8 = round(255 * intensity)`` for every family. Samplers on the
quantization grid (mixture, PixelRNN) give level ``k`` of ``L`` as ``round(255 * k / (L - 1))``:
binary images hold {0, 255}, 8-bit images their level exactly; VAE/CVAE/GAN intensities
(decoder means, generator outputs in [0, 1]) are rounded to the nearest of 256 grey levels.

:func:`run_job` runs a job in-process or on Ray: one-CPU actors in a placement group sized to
what the cluster can place (in-process when it can place none), each building one sampler from
the graphs' bytes and writing whole shards; a shard whose actor died is retried on a fresh one.
It keeps no global state, reports progress through ``on_progress`` and stops at
``should_stop`` within a fraction of a second, so a long-lived server can run many.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import operator
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genmodels.noise import check_seed
from genmodels.storage import Storage, open_storage

__all__ = [
    "DEFAULT_SHARD_SIZE", "FORMATS", "JOB_FORMAT", "MAX_N", "MAX_SHARDS", "MAX_SHARD_SIZE", "JobCancelled",
    "JobSpec", "SHARDS_DIR", "ShardMismatch", "build_sampler", "check_output_root", "job_id", "decode_shard", "encode_shard", "read_manifest", "read_shard", "run_job",
    "shard_key", "shard_plan", "verify",
]

JOB_FORMAT = "genmodels.bulk/1"
FORMATS = ("npz", "png", "parquet")
MAX_N = 100_000_000
MAX_SHARD_SIZE = 1_000_000
MAX_SHARDS = 100_000
DEFAULT_SHARD_SIZE = 10_000
JOB_KEY, MANIFEST_KEY = "job.json", "manifest.json"
_EXT = {"npz": "npz", "png": "tar", "parquet": "parquet"}
SHARDS_DIR, SIDECARS_DIR = "shards/", "sidecars/"
# Rows sampled per call inside a shard: bounds memory for million-sample shards.
_CHUNK = 4096
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_PNG_LEVEL = 6


class JobCancelled(Exception):
    """``should_stop`` asked the job to stop; completed shards stay in place (re-run resumes)."""

    def __init__(self, done_shards: int, total_shards: int) -> None:
        self.done_shards, self.total_shards = done_shards, total_shards
        super().__init__(f"job cancelled after {done_shards} of {total_shards} shards; "
                         "completed shards are kept and a re-run resumes from them")


class ShardMismatch(ValueError):
    """A finished job's output does not match its manifest (missing or altered shard)."""


# --- the job ---------------------------------------------------------------------------------
def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004 - API maps ValueError to 422
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi:_}], got {value:_}")
    return value


def _check_output(output: Any) -> str:
    if not isinstance(output, str) or not output:
        raise ValueError(f"output must be an s3://bucket/prefix or file:///abs/path URL, got {output!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in output):
        # A newline in a URL that ends up in log lines could forge them; no storage needs one.
        raise ValueError(f"output must not contain control characters (newlines, tabs...), got {output!r}")
    url = output.rstrip("/")
    if url.startswith("s3://"):
        bucket, _, _ = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"output {output!r}: an s3:// URL needs a bucket (s3://bucket/prefix)")
    elif not url.startswith("file://"):
        raise ValueError(f"output {output!r}: unsupported; use s3://bucket/prefix or file:///abs/path")
    try:
        open_storage(url)  # the storage layer's own checks (absolute file URL, key syntax)
    except ValueError as exc:
        raise ValueError(f"output {output!r}: {exc}") from None
    return url


def _under_form(url: str) -> str | None:
    """``url`` as a comparable prefix ending in "/" (file: the real path, symlinks resolved), or
    None when it has "." or ".." segments or is no file:// / s3:// URL."""
    from urllib.parse import unquote, urlsplit

    if url.startswith("s3://"):
        path = url[len("s3://"):]
        if any(part in (".", "..") for part in path.split("/")):
            return None
        return "s3://" + path.rstrip("/") + "/"
    if url.startswith("file:"):
        parts = urlsplit(url)
        path = unquote(parts.path)  # the storage layer unquotes too: %2e%2e is ".." there
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or "\0" in path \
                or any(part in (".", "..") for part in path.split("/")):
            return None
        return "file://" + os.path.realpath(path).rstrip("/") + "/"
    return None


def check_output_root(output: str, roots: Sequence[str]) -> None:
    """``ValueError`` unless ``output`` lies strictly under one of ``roots`` (URL prefixes), compared
    after normalization: no "." or ".." segment, file paths with their symlinks resolved (a link
    under a root pointing elsewhere is outside it). The message names neither the output's
    resolved path nor the roots: a caller learns nothing about the server's files."""
    target = _under_form(output)
    bases = [b for b in (_under_form(r) for r in roots) if b is not None]
    if target is None or not any(target.startswith(b) and target != b for b in bases):
        raise ValueError("output is not under an output root of this server (GENMODELS_JOB_OUTPUT_ROOTS; by "
                         "default <storage>/outputs/): give a fresh prefix below one, without '.' or '..' "
                         "segments or links leading out of it")


@dataclass(frozen=True)
class JobSpec:
    """One bulk job; constructing it validates every field (``ValueError`` naming the field).

    ``labels``: None (unconditional models), one class for every sample, or a list: sample ``i``
    gets ``labels[i % len(labels)]``. Whether labels fit the model is checked by
    :meth:`check_model` (``run_job`` calls it) since it needs the model's graphs.
    """

    model: str
    version: str
    n: int
    output: str
    seed: int = 0
    labels: int | tuple[int, ...] | None = None
    temperature: float = 1.0
    shard_size: int = DEFAULT_SHARD_SIZE
    format: str = "npz"

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a registered model name, got {self.model!r}")
        version = str(self.version) if isinstance(self.version, int) and not isinstance(self.version, bool) \
            else self.version
        if not isinstance(version, str) or not version.strip():
            raise ValueError(f"version must be resolved to a registered version before the job runs, "
                             f"got {self.version!r}")
        put("version", version)
        put("n", _int(self.n, "n", 1, MAX_N))
        try:
            put("seed", check_seed(self.seed))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        put("labels", self._check_labels(self.labels))
        try:
            temperature = float(self.temperature)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}") from None
        if isinstance(self.temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        put("temperature", temperature)
        put("shard_size", _int(self.shard_size, "shard_size", 1, MAX_SHARD_SIZE))
        if self.num_shards > MAX_SHARDS:
            raise ValueError(f"shard_size {self.shard_size:_} makes {self.num_shards:_} shards of n={self.n:_} "
                             f"(at most {MAX_SHARDS:_}); use shard_size >= {-(-self.n // MAX_SHARDS):_}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        put("output", _check_output(self.output))

    @staticmethod
    def _check_labels(labels: Any) -> int | tuple[int, ...] | None:
        if labels is None:
            return None
        if isinstance(labels, (list, tuple, np.ndarray)):
            items = list(np.asarray(labels).tolist()) if isinstance(labels, np.ndarray) else list(labels)
            if not items:
                raise ValueError("labels must be None, one int or a non-empty list of ints, got []")
            return tuple(_int(v, f"labels[{i}]", 0, 2**31 - 1) for i, v in enumerate(items))
        return _int(labels, "labels", 0, 2**31 - 1)

    # --- derived ---------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.labels, tuple):
            d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown job fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def labels_for(self, start: int, end: int) -> np.ndarray | None:
        """The labels of samples [start, end): ``labels[i % len(labels)]``."""
        if self.labels is None:
            return None
        if isinstance(self.labels, int):
            return np.full(end - start, self.labels, dtype=np.int64)
        table = np.asarray(self.labels, dtype=np.int64)
        return table[np.arange(start, end, dtype=np.int64) % len(table)]

    def check_model(self, conditional: bool, num_classes: int) -> None:
        """Labels must fit the model: required by conditional models, refused by the others,
        each in [0, num_classes)."""
        if conditional and self.labels is None:
            raise ValueError(f"labels: model {self.model} v{self.version} is class-conditional; give a class "
                             f"in [0, {num_classes}) or a list of them")
        if not conditional and self.labels is not None:
            raise ValueError(f"labels: model {self.model} v{self.version} is unconditional; it takes no labels")
        if conditional:
            values = [self.labels] if isinstance(self.labels, int) else list(self.labels)
            bad = [v for v in values if not 0 <= v < num_classes]
            if bad:
                raise ValueError(f"labels must lie in [0, {num_classes}) for model {self.model}, got {bad[:10]}")


def job_id(spec: JobSpec) -> str:
    """The id of a resolved spec: equal specs (model version included) share it, whoever runs
    them (the serving API or the generate flow), so both record a job under one id."""
    canonical = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def shard_plan(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Shard k covers sample indices [k*shard_size, min(n, (k+1)*shard_size))."""
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def shard_key(k: int, fmt: str) -> str:
    return f"{SHARDS_DIR}shard-{k:05d}.{_EXT[fmt]}"


def _sidecar_key(k: int) -> str:
    return f"{SIDECARS_DIR}shard-{k:05d}.json"


def _legacy_sidecar_key(k: int) -> str:
    # Where sidecars lived before they moved out of the shard folder: read, never written.
    return f"{SHARDS_DIR}shard-{k:05d}.json"


# --- encoding --------------------------------------------------------------------------------
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


def _png_array(payload: bytes) -> np.ndarray:
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
    # Row groups of _CHUNK rows: a binary column chunk stays far below Arrow's 2 GiB per-array
    # limit whatever the shard size, and readers (Ray Data) can split a big shard.
    with pq.ParquetWriter(sink, schema, compression="none", write_statistics=True) as writer:
        for s in range(0, len(order), _CHUNK):
            rows = order[s:s + _CHUNK]
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
                    images[int(stem)] = _png_array(payload)
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
        out = {"images": np.stack([_png_array(b) for b in table.column("image").to_pylist()]).astype(np.uint8),
               "index": table.column("index").to_numpy().astype(np.int64)}
        label = table.column("label")
        if label.null_count < len(label):
            out["labels"] = label.to_numpy().astype(np.int64)
        return out
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


# --- one shard -------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shard_is_complete(storage: Storage, k: int, start: int, end: int, fmt: str) -> dict[str, Any] | None:
    """The sidecar record when the shard is there and its object hashes to it, else None."""
    for sidecar in (_sidecar_key(k), _legacy_sidecar_key(k)):
        try:
            record = storage.get_json(sidecar)
            if (record.get("key"), record.get("start"), record.get("end")) != (shard_key(k, fmt), start, end):
                continue
            data = storage.get_bytes(record["key"])
        except (FileNotFoundError, ValueError, AttributeError, KeyError):
            continue  # missing, unreadable or from another layout: the other sidecar, or rewrite it
        if _sha256(data) == record.get("sha256"):
            return record
    return None


class _ShardWriter:
    """Writes shards of one job with one sampler; the body of a Ray actor and of local runs."""

    def __init__(self, spec: JobSpec, sampler_files: Mapping[str, bytes], storage: Storage,
                 intra_op_num_threads: int | None = None) -> None:
        self.spec, self.storage = spec, storage
        self.sampler = build_sampler(sampler_files, intra_op_num_threads)

    def write(self, k: int, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Shard k's record and whether it was written (False: verified and skipped); None when
        ``should_stop`` fired before the shard was written."""
        produced = self.produce(k, should_stop)
        if produced is None or "data" not in produced:
            return produced
        return self.store(produced["record"], produced["data"])

    def produce(self, k: int, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Shard k sampled and encoded (``{"record", "data"}``), or ``{"record", "written":
        False}`` when it is already complete and verified, or None when ``should_stop`` fired."""
        spec, storage = self.spec, self.storage
        start = k * spec.shard_size
        end = min(spec.n, start + spec.shard_size)
        existing = _shard_is_complete(storage, k, start, end, spec.format)
        if existing is not None:
            return {"record": existing, "written": False}
        images = np.empty((end - start, *self.sampler.image_shape), np.uint8)
        for s in range(start, end, _CHUNK):
            if should_stop is not None and should_stop():
                return None
            e = min(end, s + _CHUNK)
            x = self.sampler.sample(e - s, spec.seed, spec.labels_for(s, e), spec.temperature, start=s)
            images[s - start:e - start] = to_uint8(x)
        data = encode_shard(images, np.arange(start, end, dtype=np.int64), spec.labels_for(start, end), spec.format)
        record = {"shard": k, "key": shard_key(k, spec.format), "start": start, "end": end, "count": end - start,
                  "sha256": _sha256(data), "bytes": len(data)}
        return {"record": record, "data": data}

    def store(self, record: dict[str, Any], data: bytes) -> dict[str, Any]:
        # Object first, sidecar second: a sidecar never vouches for an object not yet there.
        self.storage.put_bytes(record["key"], data)
        self.storage.put_json(_sidecar_key(record["shard"]), record)
        return {"record": record, "written": True}

    def write_indexed(self, k: int) -> tuple[int, dict[str, Any]]:
        """``(k, write(k))``: Ray's unordered results do not say which shard they are."""
        return k, self.write(k)


def build_sampler(files: Mapping[str, bytes], intra_op_num_threads: int | None):
    from genmodels.sampling import OnnxSampler

    if not files:
        raise ValueError("sampler_files is empty: give the model's ONNX graphs as {file name: bytes}")
    with tempfile.TemporaryDirectory(prefix="genmodels-bulk-") as tmp:
        paths = []
        for name, data in sorted(files.items()):
            path = os.path.join(tmp, os.path.basename(name) or "graph.onnx")
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        # onnxruntime has read the graphs once the sessions exist: the files can go.
        return OnnxSampler(paths, intra_op_num_threads=intra_op_num_threads)


# --- the job ---------------------------------------------------------------------------------
def _open_output(url: str) -> Storage:
    # Pin the endpoint boto3 would resolve from the environment into the storage object, so
    # Ray workers (which get a pickled copy) write to the same endpoint as the driver.
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return open_storage(url, endpoint_url=endpoint)
    return open_storage(url)


def _job_record(spec: JobSpec, sampler_files: Mapping[str, bytes]) -> dict[str, Any]:
    return {"format": JOB_FORMAT, "spec": spec.to_dict(),
            "graphs": {os.path.basename(k): _sha256(v) for k, v in sorted(sampler_files.items())}}


def _claim_output(storage: Storage, job: dict[str, Any]) -> None:
    """Write job.json for a new job; accept the same job again; refuse anything else untouched."""
    if storage.exists(JOB_KEY):
        try:
            existing = storage.get_json(JOB_KEY)
        except ValueError:
            existing = None
        if existing != job:
            diff = _describe_difference(existing, job)
            raise ValueError(f"output {storage.url} holds another job ({diff}); nothing was written. "
                             "Use a new output prefix, or re-submit the same spec to resume")
        return
    others = storage.list("")
    if others:
        # Naming no object found there: the caller may not own it (and learns nothing about it).
        raise ValueError(f"output {storage.url} is not empty and holds no {JOB_KEY}; "
                         "bulk jobs write only into a fresh prefix or their own")
    storage.put_json(JOB_KEY, job)


def _describe_difference(existing: Any, job: dict[str, Any]) -> str:
    if not isinstance(existing, dict) or existing.get("format") != JOB_FORMAT:
        return f"an unreadable or foreign {JOB_KEY}"
    old, new = existing.get("spec") or {}, job["spec"]
    fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if fields:
        return "differs in " + ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in fields)
    return "same spec, but other model graphs (sha256 differ)"


def run_job(
    spec: JobSpec,
    sampler_files: Mapping[str, bytes],
    *,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    use_ray: bool = True,
    threads: int | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or verify) ``spec``; return its manifest.

    ``sampler_files``: the ONNX graphs of ``spec.model`` v``spec.version`` as {file name: bytes}.
    ``workers``: Ray actors (``use_ray``), each writing whole shards, at most as many as the
    cluster can place (one CPU each); none placeable: the shards are written in-process.
    ``threads``: onnxruntime intra-op threads when writing in-process (None: onnxruntime's
    default, every core; a server passes 1); actors always use one.
    ``on_progress(done_samples, total)`` after every shard (verified ones count as done).
    ``should_stop()`` is polled between chunks in-process and every few tenths of a second on
    Ray; when it returns True the job raises :class:`JobCancelled`, keeping every completed shard.
    ``on_event(event, detail)``: ``("writers", {count, wanted})`` once the pool is placed (count 0:
    in-process), ``("retry", {shard, attempt, error})`` when a writer died and its shard is retried.
    """
    if not isinstance(spec, JobSpec):
        raise TypeError(f"spec must be a JobSpec, got {type(spec).__name__}")
    workers = _int(workers, "workers", 1, 10_000)
    local = _ShardWriter(spec, sampler_files, _open_output(spec.output), threads)
    sampler, storage = local.sampler, local.storage
    spec.check_model(sampler.conditional, sampler.num_classes)
    storage.check_reachable()
    job = _job_record(spec, sampler_files)
    _claim_output(storage, job)

    plan = shard_plan(spec.n, spec.shard_size)
    results: dict[int, dict[str, Any]] = {}
    done_samples = 0

    def finished(k: int, result: dict[str, Any]) -> None:
        nonlocal done_samples
        results[k] = result
        done_samples += result["record"]["count"]
        if on_progress is not None:
            on_progress(done_samples, spec.n)

    if on_progress is not None:
        on_progress(0, spec.n)
    in_process = lambda: _run_in_process(local, len(plan), finished, should_stop)
    if use_ray and len(plan) > 1:
        _run_on_ray(spec, sampler_files, storage, len(plan), workers, finished, should_stop, on_event, in_process)
    else:
        in_process()

    manifest = _manifest(spec, job, sampler, [results[k]["record"] for k in range(len(plan))])
    # Written last, and only when it changes: re-running a finished job writes nothing.
    try:
        existing = storage.get_json(MANIFEST_KEY)
    except (FileNotFoundError, ValueError):
        existing = None
    if existing != manifest:
        storage.put_json(MANIFEST_KEY, manifest)
    return manifest


#: How long the cluster gets to place a pool of writers before a job asks for fewer.
PLACEMENT_TIMEOUT_S = 5.0
#: Times a shard is handed to a writer whose actor then died, before the job fails.
SHARD_ATTEMPTS = 3
#: How often a job on Ray wakes to check ``should_stop`` while shards are being written.
_POLL_S = 0.25

#: Shards encoded and waiting for (or in) upload, at most, in a local run: bounds memory.
_UPLOADS_IN_FLIGHT = 2


def _run_in_process(writer: _ShardWriter, num_shards: int, finished: Callable[[int, dict[str, Any]], None],
                    should_stop: Callable[[], bool] | None) -> None:
    """Sample shard k+1 while shard k uploads: the job runs at the pace of the slower of the
    two, not of their sum."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()

    def settle(limit: int) -> None:
        while len(pending) > limit:
            k, future = pending.popleft()
            finished(k, future.result())

    with ThreadPoolExecutor(max_workers=_UPLOADS_IN_FLIGHT, thread_name_prefix="genmodels-upload") as uploads:
        try:
            for k in range(num_shards):
                produced = None if should_stop is not None and should_stop() else writer.produce(k, should_stop)
                if produced is None:
                    settle(0)  # what is uploading completes: it stays valid for a resume
                    raise JobCancelled(k, num_shards)
                if "data" in produced:
                    pending.append((k, uploads.submit(writer.store, produced["record"], produced["data"])))
                else:
                    settle(0)
                    finished(k, produced)
                settle(_UPLOADS_IN_FLIGHT - 1)
            settle(0)
        finally:
            for _, future in pending:
                future.cancel()


def _place_writers(ray, wanted: int, should_stop: Callable[[], bool] | None):
    """A placement group of ``count`` one-CPU bundles, ``count <= wanted``, that the cluster
    placed within :data:`PLACEMENT_TIMEOUT_S`; ``(None, 0)`` when not even one fits.

    An actor asking for a CPU the cluster does not have stays pending forever (and work handed
    to it with it): asking first is what keeps a job on a busy cluster from hanging. The free
    CPUs are a hint (another job may take them meanwhile); the placement group's own wait is
    the answer."""
    from ray.util.placement_group import placement_group, remove_placement_group

    count = min(wanted, int(ray.available_resources().get("CPU", 0)))
    while count >= 1:
        if should_stop is not None and should_stop():
            return None, 0
        group = placement_group([{"CPU": 1}] * count, strategy="PACK")
        if group.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            return group, count
        remove_placement_group(group)
        count //= 2
    return None, 0


def _run_on_ray(spec: JobSpec, sampler_files: Mapping[str, bytes], storage: Storage, num_shards: int,
                workers: int, finished: Callable[[int, dict[str, Any]], None],
                should_stop: Callable[[], bool] | None, on_event: Callable[[str, dict[str, Any]], None] | None,
                fallback: Callable[[], None]) -> None:
    """Shards on one-CPU actors, as many as the cluster can place (``fallback()`` writes them
    in-process when it can place none). A shard whose actor died (OOM killer, lost node, kill)
    is written again by a fresh actor, up to :data:`SHARD_ATTEMPTS` times: its bytes depend only
    on the job and the shard index, and its object and sidecar are each one atomic put, so a
    retry leaves exactly what an uninterrupted run would. ``should_stop`` is polled every
    :data:`_POLL_S` seconds; cancelling kills the actors (the shards they were writing are
    dropped, finished ones kept)."""
    from collections import Counter, deque

    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from genmodels.distributed import ensure_ray

    emit = on_event or (lambda event, detail: None)
    ensure_ray()
    group, count = _place_writers(ray, min(workers, num_shards), should_stop)
    emit("writers", {"count": count, "wanted": min(workers, num_shards)})
    if count == 0:
        if should_stop is not None and should_stop():
            raise JobCancelled(0, num_shards)
        return fallback()
    # One onnxruntime thread each: actors, not threads, give the parallelism.
    actor_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_ShardWriter)
    files_ref = ray.put(dict(sampler_files))

    def start(bundle: int):
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
        return actor_cls.options(scheduling_strategy=strategy).remote(spec, files_ref, storage, 1)

    actors = {b: start(b) for b in range(count)}
    idle, todo = deque(range(count)), deque(range(num_shards))
    running: dict[Any, tuple[int, int]] = {}  # result ref -> (shard, bundle)
    attempts: Counter[int] = Counter()
    done = 0
    try:
        while todo or running:
            if should_stop is not None and should_stop():
                raise JobCancelled(done, num_shards)
            while idle and todo:
                bundle, k = idle.popleft(), todo.popleft()
                running[actors[bundle].write_indexed.remote(k)] = (k, bundle)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                k, bundle = running.pop(ref)
                try:
                    _, result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    attempts[k] += 1
                    if attempts[k] >= SHARD_ATTEMPTS:
                        raise RuntimeError(f"shard {k}: its writer died {attempts[k]} times; giving up "
                                           f"(last: {type(exc).__name__})") from exc
                    emit("retry", {"shard": k, "attempt": attempts[k], "error": type(exc).__name__})
                    ray.kill(actors[bundle], no_restart=True)
                    actors[bundle] = start(bundle)  # its bundle is free again: the new actor fits
                    todo.appendleft(k)
                else:
                    finished(k, result)
                    done += 1
                idle.append(bundle)
    finally:
        # Kill, not drain: an interrupted shard is harmless (its object and sidecar are each
        # written atomically, the sidecar last) and a cancel should not wait for big shards.
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)


def _manifest(spec: JobSpec, job: Mapping[str, Any], sampler, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    # No timestamps: the manifest of a job is a pure function of the job, so a re-run that finds
    # everything in place produces the same document and does not rewrite it.
    c, h, w = sampler.image_shape
    return {
        "format": JOB_FORMAT,
        "spec": spec.to_dict(),
        "model": {"name": spec.model, "version": spec.version, "family": sampler.family,
                  "conditional": sampler.conditional, "num_classes": sampler.num_classes,
                  "image": {"channels": c, "height": h, "width": w, "levels": sampler.levels},
                  "graphs": dict(job["graphs"])},
        "seed": spec.seed,
        "index_range": [0, spec.n],
        "encoding": {
            "format": spec.format,
            "images": "uint8 [count, C, H, W] = round(255 * intensity); grid level k of L -> round(255*k/(L-1))",
            "npz": "arrays images, index (int64 sample indices), labels (int64, conditional models only)",
            "png": "uncompressed tar: <index:09d>.png per sample, <index:09d>.cls label text (conditional only)",
            "parquet": "rows by index: index int64, label int64 (null: unconditional), image PNG bytes, "
                       "height, width, channels int32",
        },
        # Give readers the folder: it holds the shards and nothing else.
        "layout": {"shards": SHARDS_DIR},
        "shards": [dict(r) for r in records],
        "totals": {"samples": sum(r["count"] for r in records), "shards": len(records),
                   "bytes": sum(r["bytes"] for r in records)},
    }


# --- reading a finished job --------------------------------------------------------------------
def read_manifest(url: str | Storage) -> dict[str, Any]:
    """The manifest of the job at ``url`` (FileNotFoundError: unfinished or no job there)."""
    storage = url if isinstance(url, Storage) else open_storage(url)
    try:
        manifest = storage.get_json(MANIFEST_KEY)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_KEY} at {storage.url}: the job never finished "
                                "(re-submit it to resume) or this is not a job output") from None
    if not isinstance(manifest, dict) or manifest.get("format") != JOB_FORMAT:
        raise ValueError(f"{storage.url_for(MANIFEST_KEY)}: not a bulk job manifest (format {JOB_FORMAT!r})")
    return manifest


def verify(url: str | Storage) -> dict[str, Any]:
    """Check every shard of a finished job against its manifest (sha256, byte count, the shards
    tile [0, n) exactly once); return the manifest or raise :class:`ShardMismatch`."""
    storage = url if isinstance(url, Storage) else open_storage(url)
    manifest = read_manifest(storage)
    spec = JobSpec.from_dict(manifest["spec"])
    expected = shard_plan(spec.n, spec.shard_size)
    got = [(r["start"], r["end"]) for r in manifest["shards"]]
    if got != expected:
        raise ShardMismatch(f"{storage.url}: manifest shards do not tile [0, {spec.n}) in shards of {spec.shard_size}")
    for k, record in enumerate(manifest["shards"]):
        if record["key"] != shard_key(k, spec.format):
            raise ShardMismatch(f"{storage.url}: shard {k} is recorded under {record['key']!r}")
        try:
            data = storage.get_bytes(record["key"])
        except FileNotFoundError:
            raise ShardMismatch(f"{storage.url_for(record['key'])}: in the manifest but missing") from None
        if _sha256(data) != record["sha256"] or len(data) != record["bytes"]:
            raise ShardMismatch(f"{storage.url_for(record['key'])}: sha256 {_sha256(data)} but the manifest says "
                                f"{record['sha256']} (corrupted or overwritten)")
    return manifest


def read_shard(url: str | Storage, record: Mapping[str, Any] | int) -> dict[str, np.ndarray]:
    """Decode one shard of a finished job (by manifest record or shard index)."""
    storage = url if isinstance(url, Storage) else open_storage(url)
    manifest = read_manifest(storage)
    if not isinstance(record, Mapping):
        record = manifest["shards"][int(record)]
    return decode_shard(storage.get_bytes(record["key"]), manifest["spec"]["format"])
