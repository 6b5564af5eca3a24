"""Routes of bulk jobs: ``POST/GET/DELETE /v1/jobs`` (the work: :class:`serving.jobs.JobManager`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from serving.api.schemas import ErrorBody, JobAccepted, JobId, JobRequest, JobStatus
from serving.errors import RequestError
from serving.jobs import ACTIVE, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, JobState, check_request


#: The OpenAPI tag of every job route.
TAGS = ["bulk jobs"]
#: What every job route may answer besides the statuses of every operation (ERROR_STATUSES).
NO_JOBS = {501: {"model": ErrorBody, "description": "not_implemented: this server runs no bulk job deployment."}}


def add_job_routes(router: APIRouter, backend) -> None:
    """The ``/jobs`` routes, on ``router`` itself (as :func:`serving.api.sampling.add_sampling_routes`
    adds its own: a nested router's routes would be labelled ``/jobs`` in the request log and
    metrics, without the prefix of ``router``), over ``backend.submit_job(request)``,
    ``job_status(id)``, ``cancel_job(id)`` and ``list_jobs(status, limit, offset)`` (async,
    answering as :class:`serving.jobs.JobManager` does, :meth:`~serving.jobs.JobManager.page` or a
    plain list for ``list_jobs``); a backend without them answers 501."""
    enabled = all(hasattr(backend, m) for m in ("submit_job", "job_status", "cancel_job"))

    def require(method: str = "submit_job") -> None:
        if not enabled or not hasattr(backend, method):
            raise RequestError(501, "not_implemented", "this server runs no bulk job deployment")

    def answer(result: dict[str, Any] | list[dict[str, Any]], status: int = 200) -> JSONResponse:
        return JSONResponse(result, status_code=status)

    @router.post("/jobs", status_code=202, response_model=JobAccepted, tags=TAGS, responses={
        409: {"model": ErrorBody, "description": "output_in_use: another job (or this one, still stopping) "
                                                 "writes to the same output; retry once it has ended."},
        429: {"model": ErrorBody, "description": "queue_full: as many jobs wait as the server queues "
                                                 "(GENMODELS_MAX_QUEUED_JOBS); retry after Retry-After seconds."},
        **NO_JOBS})
    async def submit(body: JobRequest):
        """Start writing n samples as shards plus manifest.json to ``output``; 202 with the job id.
        The same spec again: the same id (the running job, or a resumed run once it ended)."""
        require()
        request = body.model_dump()
        check_request(request)
        return answer(await backend.submit_job(request), status=202)

    @router.get("/jobs", response_model=list[JobStatus], tags=TAGS, responses=NO_JOBS)
    async def list_jobs(
        request: Request,
        status: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description="At most this many jobs.")] =
            DEFAULT_LIST_LIMIT,
        offset: Annotated[int, Query(ge=0, le=10**9, description="Skip this many (the next page: offset + "
                                                                  "limit; see the Link header).")] = 0,
    ):
        """Jobs, the most recently submitted first (running ones and those recorded in the
        platform storage, across restarts); no manifests: GET /v1/jobs/{id} has a job's. One page
        per call: ``X-Total-Count`` says how many match, ``Link: <...>; rel="next"`` where the
        next page is."""
        require("list_jobs")
        result = await backend.list_jobs(status, limit, offset)
        if isinstance(result, dict) and "jobs" in result:
            response = answer(result["jobs"])
            total = int(result["total"])
            response.headers["X-Total-Count"] = str(total)
            if offset + limit < total:
                following = request.url.include_query_params(offset=offset + limit, limit=limit)
                response.headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
            return response
        return answer(result)

    @router.get("/jobs/{job_id}", response_model=JobStatus, tags=TAGS, responses=NO_JOBS)
    async def status(job_id: JobId):
        """The job's status, samples done, and its manifest once it succeeded."""
        require()
        return answer(await backend.job_status(job_id))

    @router.delete("/jobs/{job_id}", response_model=JobStatus, status_code=202, tags=TAGS, responses={
        202: {"description": "Cancellation asked: status turns cancelled once the job has stopped."},
        200: {"model": JobStatus, "description": "The job had already ended: left as it is."},
        409: {"model": ErrorBody, "description": "job_runs_elsewhere: another process (a `genmodels generate` "
                                                 "command, a Prefect run) runs the job; stop it there."},
        **NO_JOBS})
    async def cancel(job_id: JobId):
        """Ask the job to stop (202; ``status`` turns ``cancelled`` once it has); completed shards are
        kept. A job already ended is left as it is (200); one run by another process (a
        `genmodels generate` command, a Prefect run) is refused (409): stop it there."""
        require()
        result = await backend.cancel_job(job_id)
        return answer(result, status=202 if result.get("status") in ACTIVE else 200)
