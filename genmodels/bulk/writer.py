"""One shard: sampled, encoded, verified or stored; the body of a Ray actor and of local runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from genmodels.bulk.shards import CHUNK, encode_shard, sha256, to_uint8
from genmodels.bulk.spec import JobSpec, legacy_sidecar_key, shard_key, sidecar_key
from genmodels.storage import Storage


def shard_is_complete(storage: Storage, k: int, start: int, end: int, fmt: str) -> dict[str, Any] | None:
    """The sidecar record when the shard is there and its object hashes to it, else None. A sidecar
    of the old layout (in ``shards/``) moves to ``sidecars/`` when it verifies, and goes when not."""
    for sidecar in (sidecar_key(k), legacy_sidecar_key(k)):
        try:
            record = storage.get_json(sidecar)
        except FileNotFoundError:
            continue
        except ValueError:
            record = None  # unreadable: it vouches for nothing
        verified = _verified(storage, record, k, start, end, fmt)
        if sidecar == legacy_sidecar_key(k):
            # Readers given shards/ take every object there for a shard. The new sidecar is placed
            # before the old one goes: a writer killed in between leaves one that still verifies.
            if verified is not None:
                storage.put_json(sidecar_key(k), verified)
            storage.delete(sidecar)
        if verified is not None:
            return verified
    return None


def _verified(storage: Storage, record: Any, k: int, start: int, end: int, fmt: str) -> dict[str, Any] | None:
    try:
        if (record.get("key"), record.get("start"), record.get("end")) != (shard_key(k, fmt), start, end):
            return None  # from another layout
        data = storage.get_bytes(record["key"])
    except (FileNotFoundError, ValueError, AttributeError, KeyError):
        return None
    return record if sha256(data) == record.get("sha256") else None


class ShardWriter:
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
        existing = shard_is_complete(storage, k, start, end, spec.format)
        if existing is not None:
            return {"record": existing, "written": False}
        images = np.empty((end - start, *self.sampler.image_shape), np.uint8)
        for s in range(start, end, CHUNK):
            if should_stop is not None and should_stop():
                return None
            e = min(end, s + CHUNK)
            x = self.sampler.sample(e - s, spec.seed, spec.labels_for(s, e), spec.temperature, start=s)
            images[s - start:e - start] = to_uint8(x)
        data = encode_shard(images, np.arange(start, end, dtype=np.int64), spec.labels_for(start, end), spec.format)
        record = {"shard": k, "key": shard_key(k, spec.format), "start": start, "end": end, "count": end - start,
                  "sha256": sha256(data), "bytes": len(data)}
        return {"record": record, "data": data}

    def store(self, record: dict[str, Any], data: bytes) -> dict[str, Any]:
        # Object first, sidecar second: a sidecar never vouches for an object not yet there.
        self.storage.put_bytes(record["key"], data)
        self.storage.put_json(sidecar_key(record["shard"]), record)
        return {"record": record, "written": True}

    def write_indexed(self, k: int) -> tuple[int, dict[str, Any]]:
        """``(k, write(k))``: Ray's unordered results do not say which shard they are."""
        return k, self.write(k)


def build_sampler(files: Mapping[str, bytes], intra_op_num_threads: int | None):
    from genmodels.sampling import OnnxSampler

    if not files:
        raise ValueError("sampler_files is empty: give the model's ONNX graphs as {file name: bytes}")
    return OnnxSampler.from_bytes(files, intra_op_num_threads)
