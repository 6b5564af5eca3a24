"""Routes of the online sampler: models, samples, grid, interpolations, analogies, completions."""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from genmodels.images import grid_png, image_pngs
from serving.api.openapi import ARRAY_COUNTS, ROUTES
from serving.api.schemas import (
    MAX_ARRAY_VALUES,
    MAX_SAMPLES,
    RANDOM_SEED_BOUND,
    AnalogyRequest,
    AnalogyResponse,
    CompleteRequest,
    CompleteResponse,
    InterpolateRequest,
    InterpolateResponse,
    LabelQuery,
    ModelInfo,
    ModelName,
    SampleRequest,
    SampleResponse,
    SeedQuery,
    TemperatureQuery,
    max_array_images,
)
from serving.errors import RequestError


def image_png(image: np.ndarray) -> bytes:
    """One image [C, H, W] in [0, 1] as a PNG at its own size (no upscaling, no border)."""
    return image_pngs(image[None])[0]


def encode_images(images: np.ndarray, fmt: str) -> list:
    if fmt == "array":
        return images.astype(np.float64).tolist()
    return [base64.b64encode(png).decode("ascii") for png in image_pngs(images)]


async def _encoded(out: dict[str, Any], fmt: str) -> dict[str, Any]:
    # In a thread: PNG encoding (or 200k floats to a list) of n=256 images takes 20-100 ms, which
    # on the event loop would stall every other request of this replica meanwhile.
    return {**out, "images": await asyncio.to_thread(encode_images, out["images"], fmt)}


async def refuse_large_arrays(backend, route: str, name: str, body: Any) -> None:
    """422 ``array_too_large``, before anything is sampled, when ``body`` asks ``route`` of model
    ``name`` for a ``format: "array"`` answer of more than :data:`MAX_ARRAY_VALUES` values."""
    if body.format != "array":
        return
    # One more call to the sampler for array requests only: the image size is the model's, and
    # what its answer would cost must be known before it is drawn.
    model = next((m for m in await backend.describe() if m.get("name") == name), None)
    if model is None or not ROUTES[route][2](model):
        return  # the sampling call's own refusal says more: not served (404, 503), not answering the route
    field = ARRAY_COUNTS[route]
    count = int(model.get("num_classes") or 0) if field is None else getattr(body, field)
    shape = [int(v) for v in model["image_shape"]]
    largest = max_array_images(shape)
    if count <= largest:
        return
    size = "x".join(map(str, shape))
    if field is None:
        advice = "its analogies are one image per class"
    elif largest == 0:
        advice = "not one of its images fits"
    else:
        advice = f"{field} may be at most {largest} with format=array"
    raise RequestError(422, "array_too_large", f"{name}'s format=array answer would carry {count} x {size} = "
                                               f"{count * math.prod(shape):_} values, more than the "
                                               f"{MAX_ARRAY_VALUES:_} one answer may carry: {advice}; ask "
                                               "format=png (base64 PNGs) instead")


def _observed(request: Request, out: dict[str, Any], n: int) -> dict[str, Any]:
    # Read by the request log: which model version answered, with how many images.
    request.state.observed = {"model": out["model"], "version": out["version"], "n": n}
    return out


def _seed(seed: int | None) -> int:
    return secrets.randbelow(RANDOM_SEED_BOUND) if seed is None else seed


def add_sampling_routes(router: APIRouter, backend) -> None:
    """The routes, on ``router`` itself (so that their path, as the request log and metrics name
    it, carries the router's prefix), over ``backend``'s async ``describe()``, ``sample``,
    ``interpolate``, ``analogies`` and ``complete`` (each taking a request dict, raising
    :class:`serving.errors.RequestError` to refuse it)."""

    @router.get("/models", response_model=list[ModelInfo], tags=["models"])
    async def list_models():
        return await backend.describe()

    async def sample(request: Request, name: str, n: int, seed: int | None, labels,
                     temperature: float, label_field: str = "labels") -> dict[str, Any]:
        # label_field: the name the client gave the labels (the grid's query has `label`), which a
        # refusal names.
        out = await backend.sample({"model": name, "n": n, "seed": _seed(seed), label_field: labels,
                                    "temperature": temperature})
        return _observed(request, out, n)

    @router.post("/models/{name}/samples", response_model=SampleResponse, tags=["sampling"])
    async def samples(request: Request, name: ModelName, body: SampleRequest):
        """n images of the model's current version; the same seed gives the same images."""
        await refuse_large_arrays(backend, "samples", name, body)
        out = await sample(request, name, body.n, body.seed, body.labels, body.temperature)
        return await _encoded(out, body.format)

    @router.get("/models/{name}/grid.png", response_class=Response, tags=["sampling"],
                responses={200: {"content": {"image/png": {}}}})
    async def grid(request: Request, name: ModelName, n: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 16,
                   seed: SeedQuery = None, label: LabelQuery = None, temperature: TemperatureQuery = 1.0):
        """A PNG grid of n samples (upscaled); the seed and version are in X-Seed / X-Model-Version."""
        out = await sample(request, name, n, seed, label, temperature, label_field="label")
        png = await asyncio.to_thread(grid_png, out["images"])  # off the event loop, as _encoded
        return Response(png, media_type="image/png",
                        headers={"X-Model-Version": out["version"], "X-Seed": str(out["seed"])})

    @router.post("/models/{name}/interpolate", response_model=InterpolateResponse, tags=["sampling"])
    async def interpolate(request: Request, name: ModelName, body: InterpolateRequest):
        """steps images along the slerp between seed_a's and seed_b's latent points (VAE, CVAE, GAN;
        a latent mixture's walk goes between the two samples' latents, without a jump); the ends
        are the first sample of seed_a and of seed_b."""
        await refuse_large_arrays(backend, "interpolate", name, body)
        out = await backend.interpolate({"model": name, "seed_a": body.seed_a, "seed_b": body.seed_b,
                                         "steps": body.steps, "label": body.label, "temperature": body.temperature})
        _observed(request, out, body.steps)
        return await _encoded(out, body.format)

    @router.post("/models/{name}/analogies", response_model=AnalogyResponse, tags=["sampling"])
    async def analogies(request: Request, name: ModelName, body: AnalogyRequest):
        """The style of a given image (of class ``label``) drawn as every class (CVAE only): the
        image's posterior mean decoded with each label; image ``label`` is its reconstruction."""
        await refuse_large_arrays(backend, "analogies", name, body)
        out = await backend.analogies({"model": name, "image": body.image, "label": body.label})
        _observed(request, out, len(out["images"]))
        return await _encoded(out, body.format)

    @router.post("/models/{name}/complete", response_model=CompleteResponse, tags=["sampling"])
    async def complete(request: Request, name: ModelName, body: CompleteRequest):
        """n completions of a partly known image, drawn exactly from p(unknown | known): PixelRNN
        completes everything below ``known_rows``; a mixture completes any ``mask``. The same
        seed gives the same completions."""
        await refuse_large_arrays(backend, "complete", name, body)
        out = await backend.complete({"model": name, "image": body.image, "known_rows": body.known_rows,
                                      "mask": body.mask, "n": body.n, "seed": _seed(body.seed),
                                      "temperature": body.temperature, "labels": body.labels})
        _observed(request, out, body.n)
        return await _encoded(out, body.format)
