"""Request and response bodies of HTTP API v1, and the one set of field types they share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from genmodels import bulk
from genmodels.checks import MAX_LABEL, MAX_REQUEST_SAMPLES, MAX_TEMPERATURE, MIN_TEMPERATURE
from genmodels.noise import MAX_SEED
from serving.jobs import JobState

MAX_SAMPLES = MAX_REQUEST_SAMPLES
MAX_STEPS = 64
MAX_COMPLETIONS = 64
#: Values (images x C x H x W) one ``format: "array"`` answer may carry: each leaves as a Python
#: float, then ~19 bytes of JSON text. 256 RGB 128x128 images (12.6M values) made a 243 MB body
#: and +1.1 GB of ingress memory; at this bound 81 MB and +380 MB, while n=256 Fashion-MNIST
#: (200_704 values) and 3x64x64 (3.1M) images still fit. PNGs (~1 byte per value) have no such bound.
MAX_ARRAY_VALUES = 2**22
#: Seeds the server picks stay below 2**53 so that every JSON client (JavaScript included)
#: reads them back exactly; explicit seeds may use the whole [0, 2**63-1].
RANDOM_SEED_BOUND = 2**53


def max_array_images(image_shape: Sequence[int]) -> int:
    """The most images of ``image_shape`` (C, H, W) one ``format: "array"`` answer may carry."""
    return MAX_ARRAY_VALUES // math.prod(int(v) for v in image_shape)


def _format(count: str) -> Any:
    """The ``format`` field of a body answering ``count`` images."""
    return Field(default="png", description=f"png: base64 PNG per image; array: floats in [0, 1] shaped [{count}, "
                                             f"C, H, W], at most {MAX_ARRAY_VALUES:_} values ({count} x C x H x W) "
                                             "per answer: more is refused (422), ask png.")


# --- field types: JSON bodies are strict (a string is not a number) ----------------------------
# `lt`, not `le=MAX_SEED`: FastAPI writes body-schema bounds as floats, and 2**63 - 1 as a float is
# 2**63, a seed the server refuses; 2**63 itself is exact, so an exclusive bound says the truth.
Seed = Annotated[StrictInt, Field(ge=0, lt=MAX_SEED + 1)]
Label = Annotated[StrictInt, Field(ge=0, le=MAX_LABEL)]
# Strict: "0.5" or true is not a number (true would read as 1.0); an integer still is one.
Temperature = Annotated[StrictFloat, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False)]
ImageFormat = Literal["png", "array"]
# The same bounds for query strings, whose values arrive as text.
SeedQuery = Annotated[int | None, Query(ge=0, le=MAX_SEED)]
LabelQuery = Annotated[int | None, Query(ge=0, le=MAX_LABEL)]
TemperatureQuery = Annotated[float, Query(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False)]
ModelName = Annotated[str, Path(description="Registered model name, e.g. fashion-mnist-vae")]
JobId = Annotated[str, Path(min_length=1, max_length=128, description="As returned by POST /v1/jobs")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class ErrorBody(BaseModel):
    error: str
    detail: Any


# --- sampling ------------------------------------------------------------------------------------
class SampleRequest(_Strict):
    n: Annotated[StrictInt, Field(ge=1, le=MAX_SAMPLES)] = 1
    seed: Seed | None = Field(default=None, description="Omitted: a random seed, returned in the response.")
    labels: Label | list[Label] | None = Field(
        default=None, description="One class for every image or one per image (conditional models only; "
                                  "omitted on a conditional model: image i gets class i % num_classes).")
    temperature: Temperature = 1.0
    format: ImageFormat = _format("n")


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
    format: ImageFormat = _format("steps")


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
    format: ImageFormat = _format("num_classes")


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
    format: ImageFormat = _format("n")


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
    can_interpolate: bool = Field(default=False, description="POST /interpolate works: a latent family (VAE, CVAE, GAN).")
    has_analogies: bool = Field(default=False, description="POST /analogies works (a CVAE exported with its graph).")
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


# --- bulk jobs -------------------------------------------------------------------------------------
class JobRequest(_Strict):
    model: str = Field(min_length=1, description="Registered model name; its champion at submission is used.")
    n: Annotated[StrictInt, Field(ge=1, le=bulk.MAX_N)]
    seed: Seed
    labels: Label | list[Label] | None = Field(
        default=None, description="Conditional models only (required there): one class for every sample, or a "
                                  "list: sample i gets labels[i % len(labels)].")
    temperature: Temperature = 1.0
    output: str = Field(description="s3://bucket/prefix or file:///abs/path: a fresh prefix, or this job's own "
                                    "(re-submitting resumes)")
    shard_size: Annotated[StrictInt, Field(ge=1, le=bulk.MAX_SHARD_SIZE)] = bulk.DEFAULT_SHARD_SIZE
    format: Literal["npz", "png", "parquet"] = Field(
        default="npz", description="npz: numpy arrays; png: webdataset-style tars of PNGs; parquet: rows (index, "
                                   "label, image PNG bytes, height, width, channels). Readers take <output>/shards/.")


class JobAccepted(BaseModel):
    job_id: str
    status: JobState
    queue_position: int | None = Field(default=None, description="While queued behind other jobs: 1 runs next.")


class JobStatus(BaseModel):
    job_id: str
    status: JobState
    done: int = Field(description="Samples written or verified so far.")
    total: int
    model: str
    version: str
    output: str
    cancel_requested: bool
    submitted_at: str | None = Field(default=None, description="ISO 8601 UTC time of the latest submission.")
    started_at: str | None = None
    updated_at: str | None = Field(default=None, description="When this state was recorded.")
    ended_at: str | None = None
    heartbeat_at: str | None = Field(default=None, description="Running jobs: the runner's last sign of life "
                                                               "(at least every 30 s).")
    queue_position: int | None = Field(default=None, description="Queued jobs: 1 runs next.")
    writers: int | None = Field(default=None, description="Shard writers the cluster could place (0: written "
                                                          "in the server's process).")
    retries: int = Field(default=0, description="Shards written again because their writer died.")
    result: dict[str, Any] | None = Field(
        default=None, description="Succeeded jobs: {manifest: URL of manifest.json, totals: {samples, shards, bytes}}.")
    manifest: dict[str, Any] | None = Field(default=None, description="GET /v1/jobs/{id} of a succeeded job only.")
    error: str | None = None
