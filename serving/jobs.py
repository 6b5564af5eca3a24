"""Bulk jobs of the serving API: ``POST/GET/DELETE /v1/jobs`` over :func:`genmodels.bulk.run_job`.

- :func:`jobs_router` (FastAPI, included by :func:`serving.api.create_api` under ``/v1``, so it
  shares its auth and error format): validates a request (pydantic, then
  :class:`genmodels.bulk.JobSpec`'s own checks, both 422 naming the field) and forwards it.
- :class:`JobManager` (plain Python, no Serve): resolves the model's alias to a version and its
  graphs at submission, keeps job records in memory, runs each job in a thread with
  ``run_job(..., use_ray=True)`` (Ray actors write the shards).
- :class:`Jobs`: the Serve deployment holding one ``JobManager``. One replica only: records live
  in its memory, and a job id must always reach the replica that runs it.

A job's id is a hash of its resolved spec (model, version, n, seed, labels, temperature,
shard_size, format, output). Submitting a spec that is queued or running returns that job;
submitting it again after it ended (succeeded, failed, cancelled, or lost with a replica
restart) runs it again, and ``run_job`` resumes: verified shards are skipped, so nothing is
duplicated or lost. Records are not persisted: after a restart, re-submit to see the job again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve

from genmodels import bulk
from genmodels.noise import MAX_SEED

logger = logging.getLogger("ray.serve")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)

Label = Annotated[StrictInt, Field(ge=0)]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    model: str = Field(min_length=1, description="Registered model name; its champion at submission is used.")
    n: Annotated[StrictInt, Field(ge=1, le=bulk.MAX_N)]
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
    labels: Label | list[Label] | None = Field(
        default=None, description="Conditional models only (required there): one class for every sample, or a "
                                  "list: sample i gets labels[i % len(labels)].")
    temperature: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0
    output: str = Field(description="s3://bucket/prefix or file:///abs/path: a fresh prefix, or this job's own "
                                    "(re-submitting resumes)")
    shard_size: Annotated[StrictInt, Field(ge=1, le=bulk.MAX_SHARD_SIZE)] = bulk.DEFAULT_SHARD_SIZE
    format: Literal["npz", "png"] = "npz"


class JobAccepted(BaseModel):
    job_id: str


class JobStatus(BaseModel):
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    done: int = Field(description="Samples written or verified so far.")
    total: int
    model: str
    version: str
    output: str
    cancel_requested: bool
    manifest: dict[str, Any] | None = None
    error: str | None = None


def job_id(spec: bulk.JobSpec) -> str:
    """The id of a resolved spec: equal specs (model version included) share it."""
    canonical = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _error(status: int, error: str, detail: Any) -> dict[str, Any]:
    return {"status": status, "error": error, "detail": detail}


def _field_of(message: str) -> str:
    # JobSpec's messages start with the field they are about ("n must be ...", "labels[3] must ...",
    # "output 's3:/x': ..."); "labels: model ..." names it too.
    head = message.split(" ", 1)[0].rstrip(":")
    return head.split("[", 1)[0] or "body"


@dataclass
class _Job:
    spec: bulk.JobSpec
    status: str = QUEUED
    done: int = 0
    manifest: dict[str, Any] | None = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def to_dict(self, job_id_: str) -> dict[str, Any]:
        out = {"job_id": job_id_, "status": self.status, "done": self.done, "total": self.spec.n,
               "model": self.spec.model, "version": self.spec.version, "output": self.spec.output,
               "cancel_requested": self.cancel.is_set()}
        if self.manifest is not None:
            out["manifest"] = self.manifest
        if self.error is not None:
            out["error"] = self.error
        return out


class JobManager:
    """Job records and their threads; every public method answers a dict (errors as
    ``{status, error, detail}``, like :class:`serving.app.Sampler`), never raises on bad input."""

    def __init__(self, names: Sequence[str] | None, alias: str, tracking_uri: str | None, workers: int = 2,
                 use_ray: bool = True) -> None:
        from genmodels import registry
        from genmodels.config import get_settings

        registry.configure(tracking_uri, get_settings().default_tracking_uri)
        self.names = sorted(names) if names else None  # None: any registered model with the alias
        self.alias, self.workers, self.use_ray = alias, int(workers), use_ray
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        # (name, version) -> (graphs, conditional, num_classes): a version's graphs never change.
        self._models: dict[tuple[str, str], tuple[dict[str, bytes], bool, int]] = {}

    # --- the model -------------------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[str, dict[str, bytes], bool, int] | dict[str, Any]:
        from genmodels import registry

        if self.names is not None and name not in self.names:
            return _error(404, "model_not_found", f"no served model {name!r}; served: {self.names}")
        version = registry.current_version(name, self.alias)
        if version is None:
            return _error(404, "model_not_found", f"no registered model {name!r} with a version holding the "
                                                  f"alias {self.alias!r}")
        cached = self._models.get((name, version))
        if cached is None:
            # The version sampler_files resolves is the one its graphs belong to (the alias may move).
            version, files = registry.sampler_files(name, self.alias)
            cached = self._models.get((name, version))
            if cached is None:
                sampler = bulk.build_sampler(files, 1)
                cached = self._models.setdefault((name, version), (files, sampler.conditional, sampler.num_classes))
        return (version, *cached)

    # --- the routes' work -----------------------------------------------------------------------
    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{model, n, seed, labels, temperature, output, shard_size, format}`` -> ``{job_id, status}``."""
        resolved = self._resolve(request["model"])
        if isinstance(resolved, dict):
            return resolved
        version, files, conditional, num_classes = resolved
        try:
            spec = bulk.JobSpec(version=version, **request)
            spec.check_model(conditional, num_classes)
        except ValueError as exc:
            return _error(422, "invalid_request", [{"loc": ["body", _field_of(str(exc))], "msg": str(exc)}])
        jid = job_id(spec)
        with self._lock:
            job = self._jobs.get(jid)
            if job is not None and job.status in ACTIVE:
                return {"job_id": jid, "status": job.status}
            # Two live jobs writing one prefix would interleave their shards: the second waits its turn.
            busy = [i for i, j in self._jobs.items() if j.status in ACTIVE and j.spec.output == spec.output]
            if busy:
                return _error(409, "output_in_use", f"job {busy[0]} is writing to {spec.output}; cancel it or "
                                                    "wait for it to end")
            job = self._jobs[jid] = _Job(spec)
            job.thread = threading.Thread(target=self._run, args=(jid, job, files), daemon=True,
                                          name=f"genmodels-job-{jid[:8]}")
            job.thread.start()
        logger.info("job %s: %s v%s n=%d -> %s", jid, spec.model, spec.version, spec.n, spec.output)
        return {"job_id": jid, "status": QUEUED}

    def _run(self, jid: str, job: _Job, files: dict[str, bytes]) -> None:
        def progress(done: int, total: int) -> None:
            job.done = done

        job.status = RUNNING
        try:
            manifest = bulk.run_job(job.spec, files, workers=self.workers, on_progress=progress,
                                    should_stop=job.cancel.is_set, use_ray=self.use_ray)
        except bulk.JobCancelled as exc:
            job.status, job.error = CANCELLED, str(exc)
        except Exception as exc:  # the job's failure is its status; the replica keeps serving
            logger.warning("job %s failed", jid, exc_info=True)
            job.status, job.error = FAILED, f"{type(exc).__name__}: {exc}"
        else:
            job.manifest, job.done, job.status = manifest, manifest["totals"]["samples"], SUCCEEDED
        logger.info("job %s: %s", jid, job.status)

    def get(self, jid: str) -> dict[str, Any]:
        job = self._jobs.get(jid)
        if job is None:
            return _error(404, "job_not_found", f"no job {jid!r} in this server's memory (jobs are not kept across "
                                                "restarts: re-submit the same spec to resume it)")
        return job.to_dict(jid)

    def cancel(self, jid: str) -> dict[str, Any]:
        """Ask a queued or running job to stop; its completed shards stay (re-submitting resumes)."""
        job = self._jobs.get(jid)
        if job is None:
            return self.get(jid)
        if job.status in ACTIVE:
            job.cancel.set()
        return job.to_dict(jid)

    def wait(self, jid: str, timeout: float | None = None) -> dict[str, Any]:
        """The job's status once its thread ended (or ``timeout`` passed): for tests and scripts."""
        job = self._jobs.get(jid)
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.get(jid)


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class Jobs:
    """The one replica holding the job records; the shards are written by Ray actors it starts
    (``workers`` per job, one CPU each), so it reserves no CPU itself."""

    def __init__(self, models: Sequence[str] | None = None, alias: str = "champion", tracking_uri: str | None = None,
                 workers: int = 2) -> None:
        self.manager = JobManager(models, alias, tracking_uri, workers=workers)

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        # MLflow look-ups and graph downloads block: keep the replica's event loop free.
        return await asyncio.to_thread(self.manager.submit, request)

    async def get(self, jid: str) -> dict[str, Any]:
        return self.manager.get(jid)

    async def cancel(self, jid: str) -> dict[str, Any]:
        return self.manager.cancel(jid)


# --- HTTP ----------------------------------------------------------------------------------------
JobId = Annotated[str, PathParam(min_length=1, max_length=128, description="As returned by POST /v1/jobs")]


def jobs_router(backend) -> APIRouter:
    """``/jobs`` routes over ``backend.submit_job(request)``, ``job_status(id)``, ``cancel_job(id)``
    (async, answering dicts as :class:`JobManager` does)."""
    from serving.api import error_response

    router = APIRouter(prefix="/jobs", tags=["bulk jobs"])
    enabled = all(hasattr(backend, m) for m in ("submit_job", "job_status", "cancel_job"))

    def answer(result: dict[str, Any], status: int = 200):
        # An error answer's status is an HTTP code; a job's status is a word (its "error" is data).
        if isinstance(result.get("status"), int):
            return error_response(result["status"], result["error"], result["detail"])
        from fastapi.responses import JSONResponse

        return JSONResponse(result, status_code=status)

    def disabled():
        return error_response(501, "not_implemented", "this server runs no bulk job deployment")

    @router.post("", status_code=202, response_model=JobAccepted)
    async def submit(body: JobRequest):
        """Start writing n samples as shards plus manifest.json to ``output``; 202 with the job id.
        The same spec again: the same id (the running job, or a resumed run once it ended)."""
        if not enabled:
            return disabled()
        request = body.model_dump()
        try:
            # The spec's own checks (output URL, shard count...) before any registry look-up.
            bulk.JobSpec(version="?", **request)
        except ValueError as exc:
            return error_response(422, "invalid_request", [{"loc": ["body", _field_of(str(exc))], "msg": str(exc)}])
        return answer(await backend.submit_job(request), status=202)

    @router.get("/{job_id}", response_model=JobStatus)
    async def status(job_id: JobId):
        """The job's status, samples done, and its manifest once it succeeded."""
        if not enabled:
            return disabled()
        return answer(await backend.job_status(job_id))

    @router.delete("/{job_id}", response_model=JobStatus, status_code=202)
    async def cancel(job_id: JobId):
        """Ask the job to stop (202; ``status`` turns ``cancelled`` once it has); completed shards are
        kept. A job already ended is left as it is (200)."""
        if not enabled:
            return disabled()
        result = await backend.cancel_job(job_id)
        return answer(result, status=202 if result.get("status") in ACTIVE else 200)

    return router
