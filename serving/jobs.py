"""Bulk jobs of the serving API (``/v1/jobs``, routes in :mod:`serving.api.jobs`) over
:func:`genmodels.bulk.run_job`.

- :class:`JobManager` (plain Python, no Serve, no HTTP): resolves the model's alias to a version and its
  graphs at submission, runs each job in a thread with ``run_job(..., use_ray=True)`` (Ray
  actors write the shards), and keeps each job's record in the platform storage
  (``<storage>/jobs/<job id>.json``, :mod:`genmodels.records`): written on every state change,
  on progress (at most every :attr:`JobManager.progress_interval_s`) and every
  :data:`genmodels.records.HEARTBEAT_S` while queued or running.
- ``serving.app.Jobs``: the Serve deployment holding one ``JobManager``.

A job's id is a hash of its resolved spec (model, version, n, seed, labels, temperature,
shard_size, format, output). Submitting a spec that is queued or running returns that job;
submitting it again after it ended (succeeded, failed, cancelled) runs it again, and
``run_job`` resumes: verified shards are skipped, so nothing is duplicated or lost.

After a restart, ``GET /v1/jobs/{id}`` answers from the record. A record left ``queued`` or
``running`` by a replica that stopped reads as ``failed``, its error saying the job was
interrupted and that re-submitting the same spec resumes it (the record itself is left as
written: it is the last thing known about the job).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from genmodels import bulk, records
from serving.errors import RequestError

logger = logging.getLogger("ray.serve")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 100, 1000
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

#: The id of a resolved spec; the generate flow records its jobs under the same ids.
job_id = bulk.job_id


def invalid(field_: str, msg: str) -> RequestError:
    """A 422 about one body field, shaped as the API's validation errors are."""
    return RequestError(422, "invalid_request", [{"loc": ["body", field_], "msg": msg}])


def _spec_error(exc: ValueError) -> RequestError:
    # JobSpec's messages start with the field they are about ("n must be ...", "labels[3] must ...",
    # "output 's3:/x': ..."); "labels: model ..." names it too.
    message = str(exc)
    head = message.split(" ", 1)[0].rstrip(":")
    return invalid(head.split("[", 1)[0] or "body", message)


def check_request(request: dict[str, Any]) -> None:
    """The spec's own checks (output URL, shard count...), before any registry look-up."""
    try:
        bulk.JobSpec(version="?", **request)
    except ValueError as exc:
        raise _spec_error(exc) from None


#: The fields of a record that the API answers with (the rest: spec, owner, format);
#: ``serving.api.schemas.JobStatus`` has exactly these.
PUBLIC_FIELDS = ("job_id", "status", "done", "total", "model", "version", "output", "cancel_requested",
                 "submitted_at", "started_at", "updated_at", "ended_at", "heartbeat_at", "queue_position",
                 "writers", "retries", "result", "manifest", "error")


@dataclass
class _Job:
    spec: bulk.JobSpec
    submitted_at: str
    status: str = QUEUED
    done: int = 0
    manifest: dict[str, Any] | None = None
    error: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    ended_at: str | None = None
    heartbeat_at: str | None = None
    position: int | None = None  # in the queue, while queued
    writers: int | None = None
    retries: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    # Set once the run is over, its final record written (or the write given up) and the
    # manager's bookkeeping done: stops the heartbeat. Until then a submission of the same spec
    # waits for it (or is refused): this run's last write must never land on the next run's record.
    ended: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # the graphs, until the job ends
    # One record write at a time, each of the state at that moment: an older state can never
    # overwrite a newer one.
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_write: float = 0.0  # time.monotonic() of the last record write
    # The last record write failed: the stored record is behind this state. An ended job stays in
    # memory while it is (its stored "running" would read as interrupted) and is written again.
    unsaved: bool = False

    def to_dict(self, job_id_: str, manifest: bool = True) -> dict[str, Any]:
        out = {"job_id": job_id_, "status": self.status, "done": self.done, "total": self.spec.n,
               "model": self.spec.model, "version": self.spec.version, "output": self.spec.output,
               "cancel_requested": self.cancel.is_set(), "submitted_at": self.submitted_at,
               "started_at": self.started_at, "updated_at": self.updated_at, "ended_at": self.ended_at,
               "retries": self.retries}
        for key, value in (("heartbeat_at", self.heartbeat_at), ("writers", self.writers),
                           ("queue_position", self.position if self.status == QUEUED else None)):
            if value is not None:
                out[key] = value
        if self.manifest is not None:
            out["result"] = {"manifest": f"{self.spec.output.rstrip('/')}/{bulk.MANIFEST_KEY}",
                             "totals": self.manifest["totals"]}
            if manifest:
                out["manifest"] = self.manifest
        if self.error is not None:
            out["error"] = self.error
        return out


class JobManager:
    """Jobs, their threads and their records; every public method answers a dict, or raises
    :class:`serving.errors.RequestError` for a request it refuses (never another error for bad
    input). In a job's dict ``status`` is always the job's state.

    ``storage``: the platform storage URL holding ``jobs/`` (default ``Settings().storage_url``).
    ``output_roots``: URL prefixes a job may write under (default ``Settings().output_roots``).
    Limits (default: ``Settings``): ``max_active`` jobs run at once, later ones queue in
    submission order, at most ``max_queued`` of them (a submission beyond is refused, 429);
    ``max_samples`` / ``max_shards`` / ``max_bytes`` per job, ``max_shard_bytes`` per shard;
    ``keep_ended`` ended jobs stay in memory (older ones are answered from their records).
    """

    #: Progress is recorded at most this often (seconds); state changes always are.
    progress_interval_s: float = 5.0
    heartbeat_s: float = records.HEARTBEAT_S
    #: Pauses between the tries of a job's final record write (one storage error must not leave
    #: a finished job recorded as running): short, the job's thread waits them out.
    final_write_backoff_s: tuple[float, ...] = (0.1, 0.3)
    #: Ended jobs whose final record could not be written, kept in memory beyond ``keep_ended``
    #: at most (storage down for long: the oldest are let go, their records reading interrupted).
    unsaved_kept: int = 100
    #: How long :meth:`shutdown` waits for running jobs to stop and record it themselves: less than
    #: the Jobs deployment's graceful_shutdown_timeout_s (3 s) and `genmodels serve`'s 4 s, after
    #: which the process is killed.
    shutdown_wait_s: float = 2.0
    #: How long a submission of a spec whose previous run is writing its final record waits for
    #: that write before it is refused (409).
    end_wait_s: float = 5.0

    def __init__(self, names: Sequence[str] | None, alias: str, tracking_uri: str | None, workers: int = 2,
                 use_ray: bool = True, storage: str | None = None, output_roots: Sequence[str] | None = None,
                 max_active: int | None = None, max_samples: int | None = None, max_shards: int | None = None,
                 max_bytes: int | None = None, max_shard_bytes: int | None = None,
                 keep_ended: int | None = None, max_queued: int | None = None) -> None:
        from genmodels import registry
        from genmodels.config import get_settings
        from genmodels.storage import open_storage

        settings = get_settings()
        registry.configure(tracking_uri)
        self.names = sorted(names) if names else None  # None: any registered model with the alias
        self.alias, self.workers, self.use_ray = alias, int(workers), use_ray
        self.storage = open_storage(storage or settings.storage_url)
        self.output_roots = list(output_roots) if output_roots else settings.output_roots
        pick = lambda value, default: int(default if value is None else value)
        self.max_active = max(1, pick(max_active, settings.max_active_jobs))
        self.max_queued = max(0, pick(max_queued, settings.max_queued_jobs))
        self.max_samples = pick(max_samples, settings.job_max_samples)
        self.max_shards = pick(max_shards, settings.job_max_shards)
        self.max_bytes = pick(max_bytes, settings.job_max_bytes)
        self.max_shard_bytes = pick(max_shard_bytes, settings.job_max_shard_bytes)
        self.keep_ended = max(0, pick(keep_ended, settings.jobs_kept_in_memory))
        # Written into every record this manager writes: which process ran the job.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[str] = collections.deque()  # queued job ids, next first
        self._active: set[str] = set()  # admitted: their thread runs
        self._ended_order: collections.deque[str] = collections.deque()  # ended jobs still in _jobs, oldest first
        # Records of jobs that ended, read from storage, with when they were read (time.monotonic()):
        # a page answers from them for ended_record_ttl_s. Not for ever: the generate flow (CLI,
        # Prefect) re-runs a job under its id and rewrites its record. Bounded, the oldest read
        # dropped first.
        self._ended: collections.OrderedDict[str, tuple[dict[str, Any], float]] = collections.OrderedDict()
        # name -> (version, graphs, conditional, num_classes, pixels per image) of the version last
        # resolved: a version's graphs never change, and only the champion's are submitted (a job
        # holds its own graphs until it ends); every version ever promoted would pile up here.
        self._models: dict[str, tuple[str, dict[str, bytes], bool, int, int]] = {}

    # --- the model -------------------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[str, dict[str, bytes], bool, int, int]:
        from genmodels import registry

        if self.names is not None and name not in self.names:
            raise RequestError(404, "model_not_found", f"no served model {name!r}; served: {self.names}")
        files = None
        try:
            version = registry.current_version(name, self.alias)
            if version is None:
                raise RequestError(404, "model_not_found", f"no registered model {name!r} with a version "
                                                           f"holding the alias {self.alias!r}")
            cached = self._models.get(name)
            if cached is None or cached[0] != version:
                # The version fetch_graphs resolves is the one its graphs belong to (the alias may move).
                mv, files = registry.fetch_graphs(name, self.alias)
                version = str(mv.version)
                cached = self._models.get(name)
        except RequestError:
            raise
        except LookupError as exc:  # a name MLflow refuses ("a/b"), an alias gone since it was read
            raise RequestError(404, "model_not_found", f"no registered model {name!r}: {exc}") from None
        except Exception:  # noqa: BLE001 - the registry (MLflow, its database or artifact store) is down
            logger.warning("job submission: cannot resolve %r@%s in the registry", name, self.alias, exc_info=True)
            raise RequestError(503, "registry_unavailable", "the model registry cannot be reached right now; try again "
                                                            "later") from None
        if files is not None and (cached is None or cached[0] != version):
            # Outside the registry's try: graphs that were fetched but do not load are this
            # server's fault (a 500, logged), not a registry to try again later.
            sampler = bulk.build_sampler(files, 1)
            cached = (version, files, sampler.conditional, sampler.num_classes, math.prod(sampler.image_shape))
            self._models[name] = cached
        return cached

    # --- records --------------------------------------------------------------------------------
    def _persist(self, jid: str, job: _Job, final: bool = False) -> None:
        """Write the job's record as it is now; ``final`` (the job ended): tried again after each
        pause of :attr:`final_write_backoff_s`. A failure leaves ``job.unsaved`` set."""
        with job.lock:
            if self._jobs.get(jid) is not job:
                return  # a later run of the same spec owns the record now
            job.updated_at, job.last_write = records.utc_now(), time.monotonic()
            if job.status == RUNNING:
                job.heartbeat_at = job.updated_at
            record = {**job.to_dict(jid, manifest=False), "spec": job.spec.to_dict(), "owner": self.owner}
            pauses = list(self.final_write_backoff_s if final else ())
            while True:
                try:
                    records.put_job(self.storage, record)
                except Exception as exc:  # noqa: BLE001 - the job runs on; its state is still served from memory
                    if pauses:
                        time.sleep(pauses.pop(0))
                        continue
                    job.unsaved = True
                    logger.warning("job %s: cannot record its state (%s) in %s: %r%s", jid, job.status,
                                   records.prefix_url(self.storage, records.JOBS), exc,
                                   "; kept in memory, written again later" if job.status not in ACTIVE else "")
                else:
                    job.unsaved = False
                return

    def _heartbeat(self, jid: str, job: _Job) -> None:
        # A long shard reports no progress for a while: the record still shows the job alive.
        while not job.ended.wait(self.heartbeat_s) and job.status in ACTIVE:
            self._persist(jid, job)

    def _rewrite_unsaved(self) -> None:
        """Write again the records of ended jobs whose final write failed, oldest first, stopping
        at the first that fails again (storage still down): one failed write per call at most."""
        with self._lock:
            pending = [(jid, self._jobs[jid]) for jid in self._ended_order
                       if jid in self._jobs and self._jobs[jid].unsaved]
        for jid, job in pending:
            self._persist(jid, job)
            if job.unsaved:
                return

    def _from_record(self, record: dict[str, Any], manifest: bool = False) -> dict[str, Any]:
        """A stored record as the API answers it. Called for jobs not running in this process:
        one a server recorded as queued/running was interrupted (its server stopped before it
        ended); one the generate flow (CLI, Prefect) is running is answered as recorded until its
        heartbeat stops."""
        out = {k: record[k] for k in PUBLIC_FIELDS if record.get(k) is not None and k != "manifest"}
        out.setdefault("cancel_requested", False)
        elsewhere = record.get("runner") is not None and not records.is_stale(record)
        if out.get("status") in ACTIVE and not elsewhere:
            out["status"] = FAILED
            out["error"] = (f"interrupted: the server running this job stopped before it ended (last recorded "
                            f"{record.get('updated_at')} at {record.get('done', 0)} of {record.get('total')} "
                            "samples); re-submit the same spec to resume it: its completed shards are kept")
        elif manifest and out.get("status") == SUCCEEDED:
            try:
                out["manifest"] = bulk.read_manifest(out["output"])
            except Exception as exc:  # noqa: BLE001 - the status stands; result still says where and how much
                logger.warning("job %s: cannot read its manifest at %s: %s", out.get("job_id"), out.get("output"), exc)
        return out

    #: Ended records read from storage kept in memory, at most.
    ended_records_cached: int = 1000
    #: Seconds a listing answers an ended job from the record read before, not from storage.
    ended_record_ttl_s: float = 30.0

    def _remember(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._ended[record["job_id"]] = (record, time.monotonic())
            self._ended.move_to_end(record["job_id"])
            while len(self._ended) > self.ended_records_cached:
                self._ended.popitem(last=False)

    def _recent_ended(self) -> dict[str, dict[str, Any]]:
        """The ended records read less than ``ended_record_ttl_s`` ago."""
        since = time.monotonic() - self.ended_record_ttl_s
        with self._lock:
            return {jid: record for jid, (record, read_at) in self._ended.items() if read_at > since}

    def _record(self, jid: str) -> dict[str, Any] | None:
        # One job's status is read from storage every time: it is one small object, and the
        # answer a client polls for must not lag a re-run.
        record = records.get_job(self.storage, jid)
        if record is not None and record.get("status") not in ACTIVE:
            self._remember(record)
        return record

    # --- the routes' work -----------------------------------------------------------------------
    def _check_limits(self, spec: bulk.JobSpec, pixels: int) -> None:
        if spec.n > self.max_samples:
            raise invalid("n", f"n must be at most {self.max_samples:_} on this server (GENMODELS_JOB_MAX_SAMPLES), "
                               f"got {spec.n:_}")
        if spec.num_shards > self.max_shards:
            raise invalid("shard_size", f"n={spec.n:_} in shards of {spec.shard_size:_} makes {spec.num_shards:_} "
                                        f"shards, at most {self.max_shards:_} on this server "
                                        f"(GENMODELS_JOB_MAX_SHARDS); use shard_size >= "
                                        f"{-(-spec.n // self.max_shards):_}")
        if spec.n * pixels > self.max_bytes:
            raise invalid("n", f"n={spec.n:_} images of {pixels:_} bytes make {spec.n * pixels:_} bytes, at most "
                               f"{self.max_bytes:_} on this server (GENMODELS_JOB_MAX_BYTES)")
        shard = min(spec.shard_size, spec.n)
        if shard * pixels > self.max_shard_bytes:
            # A writer holds a whole shard in memory: one huge shard could take the replica down.
            raise invalid("shard_size", f"shards of {shard:_} images of {pixels:_} bytes make {shard * pixels:_} "
                                        f"bytes, at most {self.max_shard_bytes:_} on this server "
                                        f"(GENMODELS_JOB_MAX_SHARD_BYTES); use shard_size <= "
                                        f"{max(1, self.max_shard_bytes // pixels):_}")
        try:
            bulk.check_output_root(spec.output, self.output_roots)
        except ValueError as exc:
            raise invalid("output", str(exc)) from None

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{model, n, seed, labels, temperature, output, shard_size, format}`` -> ``{job_id, status}``
        (and ``queue_position`` while it waits for a free slot)."""
        version, files, conditional, num_classes, pixels = self._resolve(request["model"])
        try:
            spec = bulk.JobSpec(version=version, **request)
            spec.check_model(conditional, num_classes)
        except ValueError as exc:
            raise _spec_error(exc) from None
        self._check_limits(spec, pixels)
        jid = job_id(spec)
        running_here = jid in self._jobs and self._jobs[jid].status in ACTIVE
        if not running_here:
            elsewhere = self._run_by_flow(jid)
            if elsewhere is not None:
                # The same spec is already being written: that run answers for it (and a DELETE is 409).
                return {"job_id": jid, "status": elsewhere["status"]}
        previous = self._jobs.get(jid)
        if previous is not None and (previous.status not in ACTIVE or previous.cancel.is_set()):
            # Its run reads ended but may still be writing its final record: a client that saw it
            # end and re-submits at once waits for that (briefly) rather than being refused. A run
            # asked to stop is waited for too: answered as the new run, it would end cancelled.
            previous.ended.wait(self.end_wait_s)
        with self._lock:
            previous = self._jobs.get(jid)
            if previous is not None and previous.status in ACTIVE and not previous.cancel.is_set():
                return self._accepted(jid, previous)
            # Two live jobs writing one prefix would interleave their shards: the second waits its turn.
            # A run whose status reads ended may still be writing its final record (the same spec's
            # included): a new run now would have its record overwritten by that one.
            busy = [i for i, j in self._jobs.items() if self._unfinished(i, j) and j.spec.output == spec.output]
            if jid in busy:
                raise RequestError(409, "output_in_use", f"job {jid} is still stopping or recording its end; submit "
                                                         "it again in a few seconds to run it again")
            if busy:
                raise RequestError(409, "output_in_use", f"job {busy[0]} is writing to {spec.output}; cancel it or "
                                                    "wait for it to end")
            self._check_room()
            job = self._jobs[jid] = _Job(spec, submitted_at=records.utc_now())
            job.files = files
            self._ended.pop(jid, None)
            if jid in self._ended_order:
                self._ended_order.remove(jid)
        if previous is not None:
            # A write of the previous run that began before the swap (its heartbeat's) lands before
            # this run's first; any later one finds itself replaced and writes nothing.
            with previous.lock:
                pass
        self._persist(jid, job)  # "queued" first: the thread's "running" must not be overwritten by it
        # From now on, queued too: a record left unrefreshed in the queue reads stale to the generate
        # flow, which would then run the same job beside this server.
        threading.Thread(target=self._heartbeat, args=(jid, job), daemon=True,
                         name=f"genmodels-job-{jid[:8]}-heartbeat").start()
        # %r: the output is the caller's text; quoted, a newline in it cannot start a log line of its own.
        logger.info("job %s: %s v%s n=%d -> %r", jid, spec.model, spec.version, spec.n, spec.output)
        with self._lock:
            if not job.cancel.is_set():
                self._queue.append(jid)
                self._admit()
                return self._accepted(jid, job)
        # Cancelled while its first record was written (cancel() found it in no queue): it never
        # joins one, or it would wait there, and then run, for a cancel already answered.
        self._cancel_queued(jid, job)
        return self._accepted(jid, job)

    def _run_by_flow(self, jid: str) -> dict[str, Any] | None:
        """The record of ``jid`` if the generate flow (CLI, Prefect) is running it now, else None.
        Records that cannot be read are no run: the job's own writes meet the storage's trouble."""
        try:
            record = records.get_job(self.storage, jid)
        except Exception:  # noqa: BLE001
            logger.warning("job %s: cannot read its record before running it", jid, exc_info=True)
            return None
        if record is not None and record.get("runner") is not None and records.run_elsewhere(record, self.owner):
            return record
        return None

    def _unfinished(self, jid: str, job: _Job) -> bool:
        """Whether ``job``'s run is not over: queued, running, or still writing its final record
        (holds ``_lock``)."""
        return job.status in ACTIVE or jid in self._active or not job.ended.is_set()

    def _check_room(self) -> None:
        """Refuse a new job that would wait beyond ``max_queued`` (holds ``_lock``): every job kept
        waiting holds its record, its graphs and a place in memory, and nothing else bounds how
        many distinct specs a client submits."""
        # Counted from _jobs, not _queue: a job accepted by a concurrent submit joins the queue
        # only after its record is written, outside the lock.
        waiting = sum(1 for jid, job in self._jobs.items() if job.status == QUEUED and jid not in self._active)
        free = max(0, self.max_active - len(self._active))
        if waiting >= self.max_queued + free:
            raise RequestError(429, "queue_full", f"{len(self._active)} jobs run and {waiting} wait on this server, "
                               f"at most {self.max_active} running (GENMODELS_MAX_ACTIVE_JOBS) and {self.max_queued} "
                               "waiting (GENMODELS_MAX_QUEUED_JOBS); submit again once one has ended")

    @staticmethod
    def _accepted(jid: str, job: _Job) -> dict[str, Any]:
        out = {"job_id": jid, "status": job.status}
        if job.status == QUEUED and job.position is not None:
            out["queue_position"] = job.position
        return out

    def _admit(self) -> None:
        """Start queued jobs while fewer than ``max_active`` run; renumber the queue (holds ``_lock``)."""
        while self._queue and len(self._active) < self.max_active:
            jid = self._queue.popleft()
            job = self._jobs[jid]
            job.position = None
            self._active.add(jid)
            job.thread = threading.Thread(target=self._run, args=(jid, job, job.files), daemon=True,
                                          name=f"genmodels-job-{jid[:8]}")
            job.thread.start()
        for position, jid in enumerate(self._queue, 1):
            self._jobs[jid].position = position

    def _run(self, jid: str, job: _Job, files: dict[str, bytes]) -> None:
        def progress(done: int, total: int) -> None:
            job.done = done
            if time.monotonic() - job.last_write >= self.progress_interval_s:
                self._persist(jid, job)

        def event(kind: str, detail: dict[str, Any]) -> None:
            if kind == "writers":
                job.writers = detail["count"]
            elif kind == "retry":
                job.retries += 1
                logger.warning("job %s: the writer of shard %d died (%s); writing it again (attempt %d)", jid,
                               detail["shard"], detail["error"], detail["attempt"] + 1)
            self._persist(jid, job)

        job.status, job.started_at = RUNNING, records.utc_now()
        self._persist(jid, job)
        try:
            # One onnxruntime thread when writing in this process: the replica shares its node with
            # the sampler and the proxy.
            manifest = bulk.run_job(job.spec, files, workers=self.workers, on_progress=progress,
                                    should_stop=job.cancel.is_set, use_ray=self.use_ray, threads=1, on_event=event)
        except bulk.JobCancelled as exc:
            with job.lock:
                job.status, job.error = CANCELLED, str(exc)
        except Exception as exc:  # the job's failure is its status; the replica keeps serving
            error = records.job_error(exc, jid, logger)
            with job.lock:
                job.status, job.error = FAILED, error
        else:
            with job.lock:
                job.manifest, job.done, job.status = manifest, manifest["totals"]["samples"], SUCCEEDED
        finally:
            self._end(jid, job)
        logger.info("job %s: %s", jid, job.status)

    def _end(self, jid: str, job: _Job) -> None:
        job.ended_at = records.utc_now()
        job.files = {}
        self._persist(jid, job, final=True)
        with self._lock:
            if self._jobs.get(jid) is job:  # else a new run of the spec replaced it (one cancelled while queued)
                self._active.discard(jid)
                self._ended_order.append(jid)
            # With the bookkeeping above, under _lock: a submission deciding under _lock sees this
            # run either unfinished or entirely out of _active, never half done.
            job.ended.set()
            self._evict()
            self._admit()
        self._rewrite_unsaved()

    def _evict(self) -> None:
        """Ended jobs leave memory, oldest first, beyond the newest ``keep_ended``; their records
        stay in storage and answer for them. One whose record could not be written stays, up to
        :attr:`unsaved_kept` such (holds ``_lock``)."""
        order = list(self._ended_order)
        recent = order[max(0, len(order) - self.keep_ended):] if self.keep_ended else []
        older = order[:len(order) - len(recent)]
        held = [jid for jid in older if jid in self._jobs and self._jobs[jid].unsaved]
        held = held[max(0, len(held) - self.unsaved_kept):] if self.unsaved_kept else []
        for old in older:
            if old not in held and self._jobs.get(old) is not None and self._jobs[old].status not in ACTIVE:
                del self._jobs[old]
        self._ended_order = collections.deque([*held, *recent])

    def shutdown(self) -> None:
        """Cancel every job (the server is stopping): queued ones end now; running ones are waited
        for up to :attr:`shutdown_wait_s`, and any still running then is recorded ``cancelled``:
        the process is killed right after, and a record left ``running`` would read ``failed``."""
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
            running = [(j, self._jobs[j]) for j in self._active]
        deadline = time.monotonic() + self.shutdown_wait_s
        # Running jobs first: they stop while the queued ones' records are written.
        for _, job in running:
            job.cancel.set()
        for jid in queued:
            self._cancel_queued(jid, self._jobs[jid])
        for _, job in running:
            job.thread.join(max(0.0, deadline - time.monotonic()))
        for jid, job in running:
            if not job.thread.is_alive():
                continue
            with job.lock:
                if job.status not in ACTIVE:
                    continue  # it ended meanwhile: its own final write is under way
                job.status, job.ended_at = CANCELLED, records.utc_now()
                job.error = (f"job cancelled: the server stopped while it ran ({job.done} of {job.spec.n} samples "
                             "done); re-submit the same spec to resume it: its completed shards are kept")
            self._persist(jid, job)

    def _cancel_queued(self, jid: str, job: _Job) -> None:
        job.cancel.set()
        with job.lock:
            job.status, job.position = CANCELLED, None
            job.error = f"job cancelled before it started; 0 of {job.spec.num_shards} shards written"
        self._end(jid, job)

    def limits(self) -> dict[str, Any]:
        """What a job request must fit on this server (published in the served OpenAPI)."""
        return {"output_roots": list(self.output_roots), "max_samples": self.max_samples,
                "max_shards": self.max_shards, "max_bytes": self.max_bytes, "max_shard_bytes": self.max_shard_bytes,
                "max_active": self.max_active, "max_queued": self.max_queued}

    def _rerun_elsewhere(self, record: dict[str, Any] | None) -> bool:
        """A record of a job that ended here, rewritten since by another process (a re-run by the
        generate flow): it, not this process's memory, is the job's state now."""
        return record is not None and record.get("owner") != self.owner

    def get(self, jid: str) -> dict[str, Any]:
        job = self._jobs.get(jid)
        if job is not None and not job.ended.is_set():
            return job.to_dict(jid)
        if job is not None and job.unsaved:
            # Its stored record is behind (the final write failed): asked about it, try again.
            self._persist(jid, job)
            if job.unsaved:
                return job.to_dict(jid)
        try:
            record = self._record(jid)
        except Exception:  # noqa: BLE001 - storage trouble is the answer's error, not a crash
            if job is not None:
                return job.to_dict(jid)
            logger.warning("cannot read the record of job %r", jid, exc_info=True)
            raise RequestError(503, "storage_unavailable", "the job records cannot be read right now; try again "
                                                           "later") from None
        if job is not None and not self._rerun_elsewhere(record):
            return job.to_dict(jid)
        if record is None:
            raise RequestError(404, "job_not_found", f"no job {jid!r}: not running here and not recorded under "
                                                f"{records.prefix_url(self.storage, records.JOBS)}")
        return self._from_record(record, manifest=True)

    def cancel(self, jid: str) -> dict[str, Any]:
        """Ask a queued or running job to stop; its completed shards stay (re-submitting resumes).
        A job not running here (ended, or interrupted) is answered as it is; one that another
        process runs (the generate flow) is refused (409): only that process can stop it."""
        with self._lock:
            job = self._jobs.get(jid)
            queued = job is not None and jid in self._queue
            if queued:
                self._queue.remove(jid)
                for position, other in enumerate(self._queue, 1):
                    self._jobs[other].position = position
            elif job is not None and job.status in ACTIVE:
                # Under _lock: a submission still writing this job's first record sees it before queueing it.
                job.cancel.set()
        if job is None or job.ended.is_set():
            found = self.get(jid)
            if found["status"] in ACTIVE:
                # The generate flow (CLI, Prefect) runs it: this server cannot reach its process.
                raise RequestError(409, "job_runs_elsewhere", f"job {jid} is run by another process (the generate "
                                   "flow: a `genmodels generate` command or a Prefect run), not by this server; "
                                   "stop it there: its completed shards are kept")
            return found
        if queued:
            self._cancel_queued(jid, job)
        elif job.status in ACTIVE:
            job.cancel.set()
            self._persist(jid, job)
        return job.to_dict(jid)

    def list(self, status: str | None = None, limit: int = DEFAULT_LIST_LIMIT, offset: int = 0) -> list[dict[str, Any]]:
        """Job statuses (no manifests), the most recently submitted first: this process's jobs
        and every recorded one; ``status`` filters, ``offset`` skips that many, ``limit`` bounds
        the page. Use :meth:`page` for the total too."""
        return self.page(status, limit, offset)["jobs"]

    def page(self, status: str | None = None, limit: int = DEFAULT_LIST_LIMIT, offset: int = 0) -> dict[str, Any]:
        """``{"jobs": [...], "total": jobs matching ``status``}`` (see :meth:`list`)."""
        def refuse(name: str, msg: str) -> RequestError:
            return RequestError(422, "invalid_request", [{"loc": ["query", name], "msg": msg}])

        if status is not None and status not in STATUSES:
            raise refuse("status", f"status must be one of {list(STATUSES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise refuse("limit", f"limit must be an integer in [1, {MAX_LIST_LIMIT}]")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise refuse("offset", "offset must be an integer >= 0")
        with self._lock:
            live = {jid: job.to_dict(jid, manifest=False) for jid, job in self._jobs.items()
                    if not job.ended.is_set()}
            ended_here = {jid: job.to_dict(jid, manifest=False) for jid, job in self._jobs.items()
                          if job.ended.is_set()}
        cached = self._recent_ended()
        try:
            fresh = records.list_jobs(self.storage, skip_ids=set(live) | set(cached))
        except Exception:  # noqa: BLE001 - see get()
            logger.warning("cannot list the job records in %s", records.prefix_url(self.storage, records.JOBS),
                           exc_info=True)
            raise RequestError(503, "storage_unavailable", "the job records cannot be read right now; try again "
                                                           "later") from None
        for record in fresh:
            if record.get("status") not in ACTIVE:
                self._remember(record)
        recorded = {r["job_id"]: r for r in [*cached.values(), *fresh] if r.get("job_id") not in live}
        # A job that ended here is answered from memory unless another process has re-run it since.
        for jid, answer in ended_here.items():
            if not self._rerun_elsewhere(recorded.get(jid)):
                live[jid] = answer
                recorded.pop(jid, None)
        jobs = [*live.values(), *(self._from_record(r) for r in recorded.values())]
        if status is not None:
            jobs = [j for j in jobs if j["status"] == status]
        ordered = records.sort_jobs(jobs)
        return {"jobs": ordered[offset:offset + limit], "total": len(ordered)}

    def wait(self, jid: str, timeout: float | None = None) -> dict[str, Any]:
        """The job's status once its thread ended (or ``timeout`` passed): for tests and scripts."""
        job = self._jobs.get(jid)
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.get(jid)
