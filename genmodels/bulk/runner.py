"""Running a job: claim its output, write (or verify) every shard in-process or on Ray, write
its manifest last."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from genmodels.bulk.manifest import build_manifest
from genmodels.bulk.on_ray import run_on_ray
from genmodels.bulk.shards import sha256
from genmodels.bulk.spec import (
    JOB_FORMAT, JOB_KEY, MANIFEST_KEY, JobCancelled, JobRefused, JobSpec, check_int, shard_plan,
)
from genmodels.bulk.writer import ShardWriter
from genmodels.storage import FileStorage, Storage, StorageError, json_bytes, open_storage


#: A temporary file of this output untouched this long belongs to a writer that died.
ABANDONED_WRITE_S = 900.0


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
            "graphs": {os.path.basename(k): sha256(v) for k, v in sorted(sampler_files.items())}}


def _claim_output(storage: Storage, job: dict[str, Any]) -> None:
    """Write job.json for a new job; accept the same job again; refuse anything else untouched."""
    if not storage.exists(JOB_KEY):
        if storage.list(""):
            _refuse_not_empty(storage)
        _refuse_if_nested(storage)
        if storage.create_exclusive(JOB_KEY, json_bytes(job)):
            # A job nesting with ours may have claimed its prefix since the checks above. Each
            # claimant checks again only after its own claim is visible, so of two racers at least
            # one sees the other; the one that does withdraws, having written nothing else.
            try:
                if any(k.endswith(f"/{JOB_KEY}") for k in storage.list("")):
                    _refuse_not_empty(storage)
                _refuse_if_nested(storage)
            except BaseException:
                # Kept, an unchecked claim would be accepted as ours by the next submission of this spec.
                storage.delete(JOB_KEY)
                raise
            return
        # Another job claimed this prefix since the checks above: it is compared like any other.
    try:
        existing = storage.get_json(JOB_KEY)
    except ValueError:
        existing = None
    if existing != job:
        old = existing.get("spec") if isinstance(existing, dict) and existing.get("format") == JOB_FORMAT else None
        if isinstance(old, dict) and _differing_fields(old, job["spec"]) == ["version"]:
            # Re-submitting cannot help: the API and the flow resolve an alias, never an older version.
            raise JobRefused(f"output {storage.url} holds this job written by version {old['version']!r} of model "
                             f"{job['spec']['model']!r}; the model is now at version {job['spec']['version']!r} and a "
                             "job cannot ask for an older one, so this output can no longer be resumed; nothing was "
                             "written. Use a new output prefix")
        diff = _describe_difference(existing, job)
        raise JobRefused(f"output {storage.url} holds another job ({diff}); nothing was written. "
                         "Use a new output prefix, or re-submit the same spec to resume")


def _refuse_not_empty(storage: Storage) -> None:
    # Naming no object found there: the caller may not own it (and learns nothing about it).
    raise JobRefused(f"output {storage.url} is not empty and holds no {JOB_KEY}; "
                     "bulk jobs write only into a fresh prefix or their own")


def _refuse_if_nested(storage: Storage) -> None:
    enclosing = _enclosing_job(storage)
    if enclosing is not None:
        # Its readers take every object under it for its own, and its shards could collide with ours.
        raise JobRefused(f"output {storage.url} lies inside the output of another job{enclosing}; "
                         "nothing was written. Use a prefix outside every job's output")


def _refuse_if_object(storage: Storage) -> None:
    """Refuse a file:// output that is (or lies under) an existing file: the client's mistake, not
    a fault of the server, so it gets a text rather than an error id."""
    if not isinstance(storage, FileStorage):
        return  # on S3 an object and a prefix of the same name coexist
    probe = storage.root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.is_dir():
        return
    _refuse_if_nested(storage)  # the finished job's manifest.json, one of its shards...: say whose
    where = "is an existing object" if probe == storage.root else f"lies under an existing object ({probe.as_uri()})"
    raise JobRefused(f"output {storage.url} {where}, not a prefix; nothing was written. "
                     "Give a fresh prefix (a folder that does not exist yet, or is empty)")


def _enclosing_job(storage: Storage) -> str | None:
    """``" (<where>)"`` when a job's output holds ``storage`` (a parent holding a job's job.json),
    else None; ``<where>`` is in the caller's own terms, a prefix of their output URL."""
    real = FileStorage(os.path.realpath(storage.root)) if isinstance(storage, FileStorage) else storage
    above = real.parent()  # resolved: a link must not hide the job above it
    while above is not None:
        try:
            record = above.get_json(JOB_KEY) if above.exists(JOB_KEY) else None
        except (StorageError, OSError, ValueError):
            # Unreadable from here (credentials or permissions scoped below it, not a job's record): no job we can see.
            record = None
        if isinstance(record, dict) and record.get("format") == JOB_FORMAT:
            return _client_view(storage, above) if isinstance(storage, FileStorage) else f" ({above.url})"
        above = above.parent()
    return None


def _client_view(storage: FileStorage, job: FileStorage) -> str:
    # The resolved path would show the server's layout (where a root's link leads): name instead
    # the outermost prefix of the client's output that lies in that job's output.
    inside = lambda p: os.path.commonpath([os.path.realpath(p), job.root]) == str(job.root)
    outermost = next((p for p in reversed([storage.root, *storage.root.parents]) if inside(p)), storage.root)
    if os.path.realpath(outermost) == str(job.root):
        return f" ({outermost.as_uri()})"
    return f" (reached through the link {outermost.as_uri()})"


def _differing_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _describe_difference(existing: Any, job: dict[str, Any]) -> str:
    if not isinstance(existing, dict) or existing.get("format") != JOB_FORMAT:
        return f"an unreadable or foreign {JOB_KEY}"
    old, new = existing.get("spec") or {}, job["spec"]
    fields = _differing_fields(old, new)
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
    workers = check_int(workers, "workers", 1, 10_000)
    local = ShardWriter(spec, sampler_files, _open_output(spec.output), threads)
    sampler, storage = local.sampler, local.storage
    spec.check_model(sampler.conditional, sampler.num_classes)
    try:
        storage.check_reachable()
    except StorageError:
        _refuse_if_object(storage)
        raise
    job = _job_record(spec, sampler_files)
    _claim_output(storage, job)
    # A writer of this job killed mid-shard (a resumed job's earlier run) left its partial file.
    storage.sweep_temporaries(older_than_s=ABANDONED_WRITE_S)

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
        run_on_ray(spec, sampler_files, storage, len(plan), workers, finished, should_stop, on_event, in_process)
    else:
        in_process()

    manifest = build_manifest(spec, job, sampler, [results[k]["record"] for k in range(len(plan))])
    # Written last, and only when it changes: re-running a finished job writes nothing.
    try:
        existing = storage.get_json(MANIFEST_KEY)
    except (FileNotFoundError, ValueError):
        existing = None
    if existing != manifest:
        storage.put_json(MANIFEST_KEY, manifest)
    return manifest


#: Shards encoded and waiting for (or in) upload, at most, in a local run: bounds memory.
_UPLOADS_IN_FLIGHT = 2


def _run_in_process(writer: ShardWriter, num_shards: int, finished: Callable[[int, dict[str, Any]], None],
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

