"""The FastAPI application of HTTP API v1: auth, body limit, request log, the playground page,
the sampling and job routes and the one error responder."""

from __future__ import annotations

import hmac
import logging
import pathlib
from typing import Any, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from serving.api.errors import ERROR_STATUSES, error_response, install_error_handlers
from serving.api.jobs import add_job_routes
from serving.api.openapi import served_openapi
from serving.api.sampling import add_sampling_routes
from serving.api.schemas import ErrorBody
from serving.observability import Observe, RequestLog

#: The web playground (GET /), shipped as package data (pyproject: ``serving = ["static/*.html"]``).
PLAYGROUND = pathlib.Path(__file__).parent.parent / "static" / "playground.html"
#: The page's auth flag; the server flips it to "bearer" when an API key guards /v1.
_AUTH_FLAG = 'data-auth="none"'
logger = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or as they stream in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"request body over {self.limit} bytes"
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(413, "payload_too_large", too_large)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPException from body reading (any other error becomes its
                    # own 400); the error responder makes it JSON.
                    raise HTTPException(413, too_large)
            return message

        return await self.app(scope, limited, send)


def create_api(backend, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               request_log: Callable[[dict[str, Any]], None] | None = None) -> FastAPI:
    """The app over ``backend`` (see :func:`serving.api.sampling.add_sampling_routes` and
    :func:`serving.api.jobs.add_job_routes`; ``serving.app.HandleBackend`` in Serve); ``request_log``
    gets one record per request (default: a :class:`serving.observability.RequestLog` without
    metrics)."""
    api = FastAPI(title="genmodels sampling API", version="1",
                  description="Online sampling from the champion version of each registered generative model. "
                              "Same model version, seed, labels and temperature -> the same images, whether "
                              "asked alone or batched with other requests.",
                  responses={k: {"model": ErrorBody} for k in ERROR_STATUSES},
                  # Served below, narrowed to the models served at the time of the request.
                  openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(api)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    class Authorized(APIRoute):
        """A route that checks the key before FastAPI reads the request: as a dependency, the
        check ran after the body was parsed, so a keyless request with a malformed body got 400."""

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def authorize(request: Request):
                if not authorized(request):
                    raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        headers={"WWW-Authenticate": "Bearer"})
                return await handler(request)

            return authorize

    @api.get("/healthz", tags=["health"])
    async def healthz():
        """200 once the sampler replicas have loaded their models (they answer only then)."""
        await backend.describe()
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        """The schema with the served models' names, classes and sizes and the jobs' limits
        (:func:`serving.api.openapi.served_openapi`) for a client that may call /v1; the static
        one for others (with auth on, what is served is for key holders) and while they cannot
        be read."""
        if not authorized(request):
            return api.openapi()
        try:
            limits = await backend.job_limits() if hasattr(backend, "job_limits") else None
            return served_openapi(api.openapi(), await backend.describe(), limits)
        except Exception:  # noqa: BLE001 - a looser schema beats no schema; the log has why
            logger.warning("serving the static OpenAPI: the served models or job limits cannot be read",
                           exc_info=True)
            return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} - docs")

    playground = playground_html(auth=bool(api_key))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        """The web playground. Open without a key: it holds no data, and the API calls it makes
        carry the key the user types."""
        return HTMLResponse(playground, headers={
            "Cache-Control": "no-cache",
            # Everything the page needs is inline or on this origin (grids as blob:, frames as data:).
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "style-src 'unsafe-inline'; script-src 'unsafe-inline'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff"})

    # One key check and one error format for sampling and bulk jobs alike.
    v1 = APIRouter(prefix="/v1", route_class=Authorized)
    add_sampling_routes(v1, backend)
    add_job_routes(v1, backend)
    api.include_router(v1)
    api.add_middleware(BodyLimit, limit=int(max_body_bytes))
    # Added last, so outermost: it also times (and logs) what BodyLimit refuses.
    api.add_middleware(Observe, sink=request_log or RequestLog())
    return api


def playground_html(auth: bool) -> str:
    """The playground page, flagged to ask for an API key when ``auth``."""
    try:
        html = PLAYGROUND.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"the web playground {PLAYGROUND} is missing: the serving package was installed "
                                "without its package data (pyproject: [tool.setuptools.package-data] "
                                'serving = ["static/*.html"])') from None
    if html.count(_AUTH_FLAG) != 1:
        raise ValueError(f"{PLAYGROUND} must carry exactly one {_AUTH_FLAG} (the server's auth flag)")
    return html.replace(_AUTH_FLAG, 'data-auth="bearer"') if auth else html
