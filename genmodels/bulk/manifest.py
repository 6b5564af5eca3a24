"""The manifest of a finished job, written last, and reading a job back (manifest, verify, shards)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from genmodels.bulk.shards import decode_shard, sha256
from genmodels.bulk.spec import JOB_FORMAT, MANIFEST_KEY, SHARDS_DIR, JobSpec, shard_key, shard_plan
from genmodels.storage import Storage, open_storage


class ShardMismatch(ValueError):
    """A finished job's output does not match its manifest (missing or altered shard)."""


def build_manifest(spec: JobSpec, job: Mapping[str, Any], sampler, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
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
        _checked_shard(storage, record)
    return manifest


def _checked_shard(storage: Storage, record: Mapping[str, Any]) -> bytes:
    """The bytes of a manifest's shard, or :class:`ShardMismatch` naming its URL when they are
    missing or not the bytes the manifest recorded (size, sha256)."""
    url = storage.url_for(record["key"])
    try:
        data = storage.get_bytes(record["key"])
    except FileNotFoundError:
        raise ShardMismatch(f"{url}: in the manifest but missing") from None
    if len(data) != record["bytes"] or sha256(data) != record["sha256"]:
        raise ShardMismatch(f"{url}: {len(data)} bytes of sha256 {sha256(data)} but the manifest says "
                            f"{record['bytes']} bytes of sha256 {record['sha256']} (corrupted or overwritten)")
    return data


def read_shard(url: str | Storage, record: Mapping[str, Any] | int) -> dict[str, np.ndarray]:
    """Decode one shard of a finished job (by manifest record or shard index), once its bytes
    match the record: :class:`ShardMismatch` naming the shard's URL otherwise."""
    storage = url if isinstance(url, Storage) else open_storage(url)
    manifest = read_manifest(storage)
    if not isinstance(record, Mapping):
        record = manifest["shards"][int(record)]
    data = _checked_shard(storage, record)
    try:
        return decode_shard(data, manifest["spec"]["format"])
    except Exception as exc:  # the codecs' errors (zip, tar, parquet, PNG) name no shard
        raise ShardMismatch(f"{storage.url_for(record['key'])}: matches its manifest record but does not decode "
                            f"as {manifest['spec']['format']} ({type(exc).__name__}: {exc})") from exc
