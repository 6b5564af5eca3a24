"""HTTP API v1 (FastAPI), all of it: routes of sampling (:mod:`.sampling`) and bulk jobs
(:mod:`.jobs`), their bodies and field types (:mod:`.schemas`), the one error responder
(:mod:`.errors`), auth, body limit and the playground (:mod:`.asgi`). It calls a backend and
knows nothing of Serve: the deployments are in :mod:`serving.app`."""

from serving.api.asgi import PLAYGROUND, BodyLimit, create_api, playground_html
from serving.api.errors import error_response
from serving.api.sampling import encode_images, image_png
from serving.api.schemas import (
    MAX_COMPLETIONS,
    MAX_SAMPLES,
    MAX_STEPS,
    RANDOM_SEED_BOUND,
    Label,
    SampleRequest,
    Seed,
    Temperature,
)

__all__ = [
    "MAX_COMPLETIONS", "MAX_SAMPLES", "MAX_STEPS", "PLAYGROUND", "RANDOM_SEED_BOUND", "BodyLimit", "Label",
    "SampleRequest", "Seed", "Temperature", "create_api", "encode_images", "error_response", "image_png",
    "playground_html",
]
