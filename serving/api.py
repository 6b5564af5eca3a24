"""HTTP API v1 of the online sampler (FastAPI): routes, request schemas, JSON errors.

``create_api(backend, ...)`` builds the app over any object with async ``describe()``,
``sample(request)``, ``interpolate(request)``, ``analogies(request)`` and ``complete(request)``
(``serving.app.HandleBackend`` in Serve).
A backend answers a bad request with a dict ``{status, error, detail}`` instead of raising;
every error leaves as ``{"error": <code>, "detail": <message>}`` and bad input never as a 5xx.
"""

from __future__ import annotations

import base64
import hmac
import logging
import math
import pathlib
import secrets
import uuid
from typing import Annotated, Any, Callable, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from genmodels.images import grid_png, image_pngs
from genmodels.noise import MAX_SEED
from serving.observability import Observe, RequestLog

logger = logging.getLogger("ray.serve")

#: The web playground (GET /), shipped as package data (pyproject: ``serving = ["static/*.html"]``).
PLAYGROUND = pathlib.Path(__file__).with_name("static") / "playground.html"
#: The page's auth flag; the server flips it to "bearer" when an API key guards /v1.
_AUTH_FLAG = 'data-auth="none"'

MAX_SAMPLES = 256
MAX_STEPS = 64
MAX_COMPLETIONS = 64
#: Seeds the server picks stay below 2**53 so that every JSON client (JavaScript included)
#: reads them back exactly; explicit seeds may use the whole [0, 2**63-1].
RANDOM_SEED_BOUND = 2**53

Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Label = Annotated[StrictInt, Field(ge=0)]
Temperature = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
ModelName = Annotated[str, Path(description="Registered model name, e.g. fashion-mnist-vae")]

_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large", 422: "invalid_request", 501: "not_implemented"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class SampleRequest(_Strict):
    n: Annotated[StrictInt, Field(ge=1, le=MAX_SAMPLES)] = 1
    seed: Seed | None = Field(default=None, description="Omitted: a random seed, returned in the response.")
    labels: Label | list[Label] | None = Field(
        default=None, description="One class for every image or one per image (conditional models only; "
                                  "omitted on a conditional model: image i gets class i % num_classes).")
    temperature: Temperature = 1.0
    format: Literal["png", "array"] = Field(default="png", description="png: base64 PNG per image; array: "
                                                                         "floats in [0, 1] shaped [n, C, H, W].")


class SampleResponse(BaseModel):
    model: str
    version: str
    seed: int
    images: list[str] | list[Any]


class InterpolateRequest(_Strict):
    seed_a: Seed
    seed_b: Seed
    steps: Annotated[StrictInt, Field(ge=2, le=MAX_STEPS)] = 10
    label: Label | None = None
    temperature: Temperature = 1.0
    format: Literal["png", "array"] = "png"


class InterpolateResponse(BaseModel):
    model: str
    version: str
    seed_a: int
    seed_b: int
    images: list[str] | list[Any]


class AnalogyRequest(_Strict):
    image: str = Field(description="base64 PNG of the model's size: 8-bit (or 1-bit) grey for 1-channel models, "
                                   "8-bit RGB for 3-channel ones; values / 255 are rounded onto the model's grid.")
    label: Label = Field(description="The class the image shows.")
    format: Literal["png", "array"] = Field(default="png", description="png: base64 PNG per image; array: floats "
                                                                         "in [0, 1] shaped [num_classes, C, H, W].")


class AnalogyResponse(BaseModel):
    model: str
    version: str
    label: int
    images: list[str] | list[Any] = Field(description="One per class, in class order: the given image's style "
                                                      "drawn as that class.")


class CompleteRequest(_Strict):
    image: str = Field(description="base64 PNG of the model's size and mode (as for analogies); its known pixels "
                                   "come back exactly (rounded onto the model's grid).")
    known_rows: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="Rows known from the top, 1..H-1 (PixelRNN and mixture). Exactly one of "
                                  "known_rows and mask.")
    mask: str | None = Field(default=None, description="Mixture only: base64 grey PNG of the model's size, "
                                                       "white (>= 128) = known pixel.")
    n: Annotated[StrictInt, Field(ge=1, le=MAX_COMPLETIONS)] = 1
    seed: Seed | None = Field(default=None, description="Omitted: a random seed, returned in the response.")
    temperature: Temperature = 1.0
    labels: Label | None = Field(default=None, description="The image's class (conditional models only).")
    format: Literal["png", "array"] = Field(default="png", description="png: base64 PNG per completion; array: "
                                                                         "floats in [0, 1] shaped [n, C, H, W].")


class CompleteResponse(BaseModel):
    model: str
    version: str
    seed: int
    images: list[str] | list[Any] = Field(description="n completions: the known pixels as given, the others "
                                                      "drawn from p(unknown | known).")


class ModelInfo(BaseModel):
    name: str
    family: str
    version: str
    conditional: bool
    num_classes: int
    image_shape: list[int]
    can_complete: bool = Field(default=False, description="POST /complete works for this version (PixelRNN; mixture).")
    completes_any_mask: bool = Field(default=False, description="/complete takes a mask, not only known_rows (mixture).")
    dataset: str | None = Field(default=None, description="The dataset it was trained on.")
    preset: str | None = Field(default=None, description="The training preset (quick, cpu, full).")
    snapshot_hash: str | None = Field(default=None, description="Content hash of the data snapshot trained "
                                                                 "and evaluated on.")
    registered_at: str | None = Field(default=None, description="When this version was registered (ISO 8601 "
                                                                 "UTC), right after its training and evaluation.")
    metrics: dict[str, float] = Field(description="The MLflow run's metrics as logged: likelihood metrics "
                                                  "named *_nats/*bits_per_dim are NLLs (lower is better) "
                                                  "except elbo_nats, iwae_k*_nats and epoch_*_elbo/_recon, "
                                                  "which are log-likelihoods (higher is better).")


class ErrorBody(BaseModel):
    error: str
    detail: Any


def error_response(status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def image_png(image: np.ndarray) -> bytes:
    """One image [C, H, W] in [0, 1] as a PNG at its own size (no upscaling, no border)."""
    return image_pngs(image[None])[0]


def encode_images(images: np.ndarray, fmt: str) -> list:
    if fmt == "array":
        return images.astype(np.float64).tolist()
    return [base64.b64encode(png).decode("ascii") for png in image_pngs(images)]


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
                    # FastAPI re-raises HTTPException from body reading; the handler makes it JSON.
                    raise HTTPException(413, too_large)
            return message

        return await self.app(scope, limited, send)


def create_api(backend, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               request_log: Callable[[dict[str, Any]], None] | None = None) -> FastAPI:
    """The app over ``backend``; ``request_log`` gets one record per request (default: a
    :class:`serving.observability.RequestLog` without metrics)."""
    api = FastAPI(title="genmodels sampling API", version="1",
                  description="Online sampling from the champion version of each registered generative model. "
                              "Same model version, seed, labels and temperature -> the same images, whether "
                              "asked alone or batched with other requests.",
                  responses={k: {"model": ErrorBody} for k in (401, 404, 413, 422)})

    # --- errors: always {"error", "detail"} ---------------------------------------------------------
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

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # The details (remote tracebacks, endpoints, paths) go to the server log only, under an id
        # the caller can quote.
        error_id = uuid.uuid4().hex[:16]
        if _unavailable(exc):
            logger.warning("error %s: %s %s: a deployment is unavailable: %r", error_id, request.method,
                           request.url.path, exc)
            return error_response(503, "unavailable", f"the service is restarting or overloaded; try again "
                                                      f"(error id {error_id})", {"Retry-After": "1"})
        logger.error("error %s: %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", error_id)

    def answer(result: dict[str, Any]) -> dict[str, Any]:
        if "error" in result:
            raise _Answered(result)
        return result

    @api.exception_handler(_Answered)
    async def answered(request: Request, exc: _Answered):
        r = exc.result
        return error_response(r["status"], r["error"], r["detail"])

    # --- auth ----------------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    # --- routes ----------------------------------------------------------------------------------------
    @api.get("/healthz", tags=["health"])
    async def healthz():
        """200 once the sampler replicas have loaded their models (they answer only then)."""
        await backend.describe()
        return {"status": "ok"}

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

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models", response_model=list[ModelInfo], tags=["models"])
    async def list_models():
        return await backend.describe()

    def observed(request: Request, out: dict[str, Any], n: int) -> dict[str, Any]:
        # Read by the request log: which model version answered, with how many images.
        request.state.observed = {"model": out["model"], "version": out["version"], "n": n}
        return out

    async def sample(request: Request, name: str, n: int, seed: int | None, labels,
                     temperature: float) -> dict[str, Any]:
        seed = secrets.randbelow(RANDOM_SEED_BOUND) if seed is None else seed
        out = answer(await backend.sample({"model": name, "n": n, "seed": seed, "labels": labels,
                                           "temperature": temperature}))
        return observed(request, out, n)

    @v1.post("/models/{name}/samples", response_model=SampleResponse, tags=["sampling"])
    async def samples(request: Request, name: ModelName, body: SampleRequest):
        """n images of the model's current version; the same seed gives the same images."""
        out = await sample(request, name, body.n, body.seed, body.labels, body.temperature)
        return {**out, "images": encode_images(out["images"], body.format)}

    @v1.get("/models/{name}/grid.png", response_class=Response, tags=["sampling"],
            responses={200: {"content": {"image/png": {}}}})
    async def grid(request: Request, name: ModelName, n: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 16,
                   seed: Annotated[int | None, Query(ge=0, le=MAX_SEED)] = None,
                   label: Annotated[int | None, Query(ge=0)] = None,
                   temperature: Annotated[float, Query(gt=0, le=100, allow_inf_nan=False)] = 1.0):
        """A PNG grid of n samples (upscaled); the seed and version are in X-Seed / X-Model-Version."""
        out = await sample(request, name, n, seed, label, temperature)
        png = grid_png(out["images"], nrow=max(1, math.ceil(math.sqrt(n))))
        return Response(png, media_type="image/png",
                        headers={"X-Model-Version": out["version"], "X-Seed": str(out["seed"])})

    @v1.post("/models/{name}/interpolate", response_model=InterpolateResponse, tags=["sampling"])
    async def interpolate(request: Request, name: ModelName, body: InterpolateRequest):
        """steps images along the slerp between seed_a's and seed_b's latent points (VAE, CVAE, GAN);
        the ends are the first sample of seed_a and of seed_b."""
        out = answer(await backend.interpolate({"model": name, "seed_a": body.seed_a, "seed_b": body.seed_b,
                                                "steps": body.steps, "label": body.label,
                                                "temperature": body.temperature}))
        observed(request, out, body.steps)
        return {**out, "images": encode_images(out["images"], body.format)}

    @v1.post("/models/{name}/analogies", response_model=AnalogyResponse, tags=["sampling"])
    async def analogies(request: Request, name: ModelName, body: AnalogyRequest):
        """The style of a given image (of class ``label``) drawn as every class (CVAE only): the
        image's posterior mean decoded with each label; image ``label`` is its reconstruction."""
        out = answer(await backend.analogies({"model": name, "image": body.image, "label": body.label}))
        observed(request, out, len(out["images"]))
        return {**out, "images": encode_images(out["images"], body.format)}

    @v1.post("/models/{name}/complete", response_model=CompleteResponse, tags=["sampling"])
    async def complete(request: Request, name: ModelName, body: CompleteRequest):
        """n completions of a partly known image, drawn exactly from p(unknown | known): PixelRNN
        completes everything below ``known_rows``; a mixture completes any ``mask``. The same
        seed gives the same completions."""
        seed = secrets.randbelow(RANDOM_SEED_BOUND) if body.seed is None else body.seed
        out = answer(await backend.complete({"model": name, "image": body.image, "known_rows": body.known_rows,
                                             "mask": body.mask, "n": body.n, "seed": seed,
                                             "temperature": body.temperature, "labels": body.labels}))
        observed(request, out, body.n)
        return {**out, "images": encode_images(out["images"], body.format)}

    # Bulk jobs (`/v1/jobs`, over genmodels/bulk/): same auth dependency, same error format.
    from serving.jobs import jobs_router

    v1.include_router(jobs_router(backend))

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


def _unavailable(exc: BaseException) -> bool:
    """A replica that died, is restarting or sheds load: the request may succeed if retried (503)."""
    try:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors
    except ImportError:  # the API without Ray (tests over a plain backend)
        return False
    kinds = tuple(k for k in (getattr(ray_errors, "RayActorError", None), getattr(ray_errors, "WorkerCrashedError", None),
                              getattr(ray_errors, "NodeDiedError", None),
                              getattr(serve_errors, "BackPressureError", None),
                              getattr(serve_errors, "DeploymentUnavailableError", None),
                              getattr(serve_errors, "ReplicaUnavailableError", None)) if k is not None)
    return isinstance(exc, kinds)


class _Answered(Exception):
    """A backend's error dict on its way to the JSON error handler."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result.get("detail"))
        self.result = result
