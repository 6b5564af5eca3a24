"""A bulk job: :class:`JobSpec` (every field checked on construction), its id, its shard plan
and the keys of its output prefix."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genmodels.checks import MAX_LABEL, check_labels_array, check_temperature
from genmodels.noise import check_seed
from genmodels.storage import open_storage

JOB_FORMAT = "genmodels.bulk/1"
FORMATS = ("npz", "png", "parquet")
MAX_N = 100_000_000
MAX_SHARD_SIZE = 1_000_000
MAX_SHARDS = 100_000
DEFAULT_SHARD_SIZE = 10_000
JOB_KEY, MANIFEST_KEY = "job.json", "manifest.json"
_EXT = {"npz": "npz", "png": "tar", "parquet": "parquet"}
SHARDS_DIR, SIDECARS_DIR = "shards/", "sidecars/"


class JobRefused(ValueError):
    """The job cannot run as submitted: its output holds another job or other objects, or its
    labels do not fit the model. The text names what to change and nothing of the server, so a
    failed job's record shows it to API clients; any other error there is a fault, shown by an
    error id (:func:`genmodels.records.job_error`)."""


class JobCancelled(Exception):
    """``should_stop`` asked the job to stop; completed shards stay in place (re-run resumes)."""

    def __init__(self, done_shards: int, total_shards: int) -> None:
        self.done_shards, self.total_shards = done_shards, total_shards
        super().__init__(f"job cancelled after {done_shards} of {total_shards} shards; "
                         "completed shards are kept and a re-run resumes from them")



def check_int(value: Any, name: str, lo: int, hi: int) -> int:
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
        put("n", check_int(self.n, "n", 1, MAX_N))
        try:
            put("seed", check_seed(self.seed))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        put("labels", self._check_labels(self.labels))
        try:
            if isinstance(self.temperature, bool):
                raise TypeError
            temperature = float(self.temperature)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}") from None
        check_temperature(temperature)
        put("temperature", temperature)
        put("shard_size", check_int(self.shard_size, "shard_size", 1, MAX_SHARD_SIZE))
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
            return tuple(check_int(v, f"labels[{i}]", 0, MAX_LABEL) for i, v in enumerate(items))
        return check_int(labels, "labels", 0, MAX_LABEL)

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
        """Labels must fit the model (:func:`genmodels.checks.check_labels_array`): required by
        conditional models (a job has no default class), refused by the others."""
        table = None if self.labels is None else np.atleast_1d(np.asarray(self.labels))
        try:
            check_labels_array(table, 0 if table is None else len(table), family=f"{self.model} v{self.version}",
                               conditional=conditional, num_classes=num_classes)
        except ValueError as exc:
            raise JobRefused(f"labels: {exc}") from None


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


def sidecar_key(k: int) -> str:
    return f"{SIDECARS_DIR}shard-{k:05d}.json"


def legacy_sidecar_key(k: int) -> str:
    # Where sidecars lived before they moved out of the shard folder: read (then moved), never written.
    return f"{SHARDS_DIR}shard-{k:05d}.json"

