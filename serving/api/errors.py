"""The one error responder of HTTP API v1: every error leaves as ``{"error": <code>, "detail":
<message>}`` with its status, whether the request was refused (:class:`serving.errors.RequestError`),
malformed (FastAPI's validation, Starlette's HTTP errors) or hit a fault (500 with an error id,
503 when a replica is down); bad input never as a 5xx."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serving.errors import RequestError

logger = logging.getLogger("ray.serve")

_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large", 422: "invalid_request", 429: "too_many_requests", 501: "not_implemented"}


def error_response(status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


#: Seconds a refused client is told to wait (Retry-After). 429: what frees room is a bulk job
#: ending, which takes far longer than a retry loop without a pause would. 503: a model that
#: could not be loaded is tried again every reload interval (10 s by default), and the registry or
#: job store that was unreachable is asked again per request.
RETRY_AFTER_S = {429: 30, 503: 10}
#: What every operation may answer, besides its own codes (the jobs' 429): documented so that a
#: client generated from the schema knows each body is an ``ErrorBody``.
ERROR_STATUSES = (400, 401, 404, 413, 422, 500, 503)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        # Decided here, not carried by the error: a RequestError crosses from the Jobs replica as
        # its status, code and detail only.
        retry = RETRY_AFTER_S.get(exc.status_code)
        return error_response(exc.status_code, exc.error, exc.detail,
                              None if retry is None else {"Retry-After": str(retry)})

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, _ERROR_CODES.get(exc.status_code, "error"), exc.detail,
                              getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype and any(tuple(e.get("loc", ())) == ("body",)
                                                                    for e in errors):
            return error_response(400, "invalid_json", f"the request body must be JSON (content-type was "
                                                       f"{ctype or 'missing'!r})")
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in errors]
        return error_response(422, "invalid_request", detail)

    async def unavailable(request: Request, exc: Exception):
        error_id = uuid.uuid4().hex[:16]
        logger.warning("error %s: %s %s: a deployment is unavailable: %r", error_id, request.method,
                       request.url.path, exc)
        return error_response(503, "unavailable", f"the service is restarting or overloaded; try again "
                                                  f"(error id {error_id})", {"Retry-After": "1"})

    # By kind, not inside the Exception handler: Starlette answers that one in its outermost
    # middleware, outside the request log (serving.observability.Observe), which would record a
    # 500 for the 503 the client got. These are answered by the exception middleware inside it.
    for kind in _UNAVAILABLE:
        api.add_exception_handler(kind, unavailable)

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # The details (remote tracebacks, endpoints, paths) go to the server log only, under an id
        # the caller can quote.
        error_id = uuid.uuid4().hex[:16]
        logger.error("error %s: %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", error_id)


def _unavailable_kinds() -> tuple[type[BaseException], ...]:
    """A replica that died, is restarting or sheds load: the request may succeed if retried (503).
    Looked up at import, not on the first fault: importing Ray reconfigures its loggers, which
    must not happen while a request is being answered (and logged)."""
    try:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors
    except ImportError:  # the API without Ray (tests over a plain backend)
        return ()
    return tuple(k for k in (getattr(ray_errors, "RayActorError", None), getattr(ray_errors, "WorkerCrashedError", None),
                             getattr(ray_errors, "NodeDiedError", None),
                             getattr(serve_errors, "BackPressureError", None),
                             getattr(serve_errors, "DeploymentUnavailableError", None),
                             getattr(serve_errors, "ReplicaUnavailableError", None)) if k is not None)


_UNAVAILABLE = _unavailable_kinds()
