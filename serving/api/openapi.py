"""``/openapi.json`` as the served models make it: the static schema of HTTP API v1 narrowed to
what this server accepts right now.

The static schema cannot know which models are served, which of them answer a route, their
image size, their classes or where jobs may write; a client generating requests from it (a
fuzzer, a code generator) would mostly get 404s and 422s. Per request, from the sampler's
``describe()`` and the jobs' ``limits()``:
- the ``{name}`` of each model route is an enum of the served models that answer it
  (interpolate: latent families; analogies: CVAEs with the graph; complete: PixelRNN, mixture);
- labels are bounded by the largest class of the conditional models of the route, known rows by
  the tallest completable image; images and masks are base64 PNGs;
- jobs: ``model`` is an enum of the served models, ``output`` a pattern under the output roots
  (the roots being the operator's published contract), ``n`` at most the server's limit;
- every operation has an example request that the server accepts (a blank PNG of the model's
  size where it takes an image).
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from genmodels.images import image_pngs
from serving.api.schemas import max_array_images

MODEL_ROUTE = "/v1/models/{{name}}/{route}"
#: route -> (method, request schema name or None, which served models answer it)
ROUTES: dict[str, tuple[str, str | None, Callable[[Mapping[str, Any]], bool]]] = {
    "samples": ("post", "SampleRequest", lambda m: True),
    "grid.png": ("get", None, lambda m: True),
    "interpolate": ("post", "InterpolateRequest", lambda m: bool(m.get("can_interpolate"))),
    "analogies": ("post", "AnalogyRequest", lambda m: bool(m.get("has_analogies"))),
    "complete": ("post", "CompleteRequest", lambda m: bool(m.get("can_complete"))),
}
#: route -> the request field that sets how many images a route answers (None: the analogies, one
#: per class of the model), for the routes that can answer ``format: "array"``.
ARRAY_COUNTS: dict[str, str | None] = {"samples": "n", "interpolate": "steps", "analogies": None, "complete": "n"}
#: The label fields of each request body, and the grid's query parameter.
LABEL_FIELDS = {"SampleRequest": "labels", "InterpolateRequest": "label", "AnalogyRequest": "label",
                "CompleteRequest": "labels", "JobRequest": "labels"}
BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"
#: A path below an output root without "." / ".." segments, whitespace or other odd characters:
#: a subset of what the server accepts, so every match is accepted.
OUTPUT_TAIL = r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*"
#: The characters special in a regular expression of both Python's ``re`` and ECMA-262 (its
#: SyntaxCharacter): JSON-Schema validators (Ajv) compile patterns as ECMA-262 with the ``u`` flag,
#: where escaping any other character (``re.escape``'s ``\-``, ``\~``, ``\#``) is a syntax error.
_SYNTAX_CHARACTERS = frozenset("\\^$.|?*+()[]{}")


def literal_pattern(text: str) -> str:
    """A regular expression matching ``text`` literally, the same in Python's ``re`` and in
    ECMA-262 with the ``u`` flag."""
    return "".join("\\" + c if c in _SYNTAX_CHARACTERS else c for c in text)


def served_openapi(spec: Mapping[str, Any], models: Sequence[Mapping[str, Any]],
                   job_limits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``spec`` narrowed to ``models`` (``describe()`` entries) and ``job_limits``
    (``JobManager.limits()``; None: no jobs deployment)."""
    out = copy.deepcopy(dict(spec))
    schemas = out.get("components", {}).get("schemas", {})
    for route, (method, body, answers) in ROUTES.items():
        operation = out.get("paths", {}).get(MODEL_ROUTE.format(route=route), {}).get(method)
        eligible = [m for m in models if answers(m)]
        if operation is None or not eligible:
            continue
        names = [m["name"] for m in eligible]
        for parameter in operation.get("parameters", []):
            if parameter.get("in") == "path" and parameter.get("name") == "name":
                parameter["schema"] = {**parameter.get("schema", {}), "enum": names}
                parameter["example"] = names[0]
        top_label = _top_label(eligible)
        if body is None:
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "label" and top_label is not None:
                    _bound_integers(parameter.setdefault("schema", {}), top_label)
            continue
        schema = schemas.get(body, {})
        if top_label is not None:
            _bound_integers(schema.get("properties", {}).get(LABEL_FIELDS[body], {}), top_label)
        for field in ("image", "mask"):
            if field in schema.get("properties", {}):
                _png_field(schema["properties"][field])
        if route == "complete":
            tallest = max(m["image_shape"][1] for m in eligible)
            _bound_integers(schema.get("properties", {}).get("known_rows", {}), tallest - 1)
        if route in ARRAY_COUNTS and "format" in schema.get("properties", {}):
            _array_limits(schema["properties"], ARRAY_COUNTS[route], eligible)
        _example(operation, _request_example(route, eligible[0]))
    if job_limits is not None:
        _narrow_jobs(out, schemas, models, job_limits)
    return out


def _top_label(models: Sequence[Mapping[str, Any]]) -> int | None:
    classes = [int(m["num_classes"]) for m in models if m.get("conditional")]
    return max(classes) - 1 if classes else None


def _bound_integers(schema: dict[str, Any], maximum: int) -> None:
    """``maximum`` on every integer (sub)schema of ``schema``: anyOf branches and array items."""
    if schema.get("type") == "integer":
        schema["maximum"] = min(maximum, schema.get("maximum", maximum))
    for branch in schema.get("anyOf", []):
        _bound_integers(branch, maximum)
    if isinstance(schema.get("items"), dict):
        _bound_integers(schema["items"], maximum)


def _array_limits(properties: dict[str, Any], field: str | None, models: Sequence[Mapping[str, Any]]) -> None:
    """The ``format`` description says, per model, what ``format: "array"`` allows of it: the
    bound depends on each model's image size, which one schema for them all cannot say otherwise."""
    if field is None:
        over = [m["name"] for m in models if int(m.get("num_classes") or 0) > max_array_images(m["image_shape"])]
        note = f"png only for the analogies of {', '.join(over)}" if over else "every model's analogies fit array"
    else:
        cap = properties.get(field, {}).get("maximum")
        limits = [(m["name"], max_array_images(m["image_shape"])) for m in models]
        note = f"the largest {field} with array: " + ", ".join(
            f"{name} {largest if cap is None else min(largest, int(cap))}" for name, largest in limits)
    target = properties["format"]
    target["description"] = f"{target.get('description', '')} On this server, {note}.".lstrip()


def _png_field(schema: dict[str, Any]) -> None:
    for target in [b for b in schema.get("anyOf", []) if b.get("type") == "string"] or [schema]:
        target.update(contentEncoding="base64", contentMediaType="image/png", pattern=BASE64, minLength=1)


def _blank_png(shape: Sequence[int]) -> str:
    return base64.b64encode(image_pngs(np.zeros((1, *shape), np.float32))[0]).decode("ascii")


def _request_example(route: str, model: Mapping[str, Any]) -> dict[str, Any] | None:
    label = 0 if model.get("conditional") else None
    shape = model["image_shape"]
    example: dict[str, Any] | None = {
        "samples": {"n": 4, "seed": 1, "labels": label},
        "interpolate": {"seed_a": 1, "seed_b": 2, "steps": 4, "label": label},
        "analogies": {"image": _blank_png(shape), "label": 0},
        "complete": {"image": _blank_png(shape), "known_rows": max(1, shape[1] // 2), "n": 2, "seed": 1,
                     "labels": label},
    }.get(route)
    return None if example is None else {k: v for k, v in example.items() if v is not None}


def _example(operation: dict[str, Any], example: dict[str, Any] | None) -> None:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None and example is not None:
        content["example"] = example


def _narrow_jobs(spec: dict[str, Any], schemas: dict[str, Any], models: Sequence[Mapping[str, Any]],
                 limits: Mapping[str, Any]) -> None:
    job = schemas.get("JobRequest", {}).get("properties", {})
    if not job:
        return
    if "n" in job and limits.get("max_samples"):
        _bound_integers(job["n"], int(limits["max_samples"]))
    roots = [str(r) for r in limits.get("output_roots") or []]
    if "output" in job and roots:
        job["output"]["pattern"] = "^(?:" + "|".join(literal_pattern(r.rstrip("/") + "/") for r in roots) + ")" \
                                   + OUTPUT_TAIL + "$"
    if not models:
        return
    if "model" in job:
        job["model"] = {**job["model"], "enum": [m["name"] for m in models]}
    top_label = _top_label(models)
    if top_label is not None:
        _bound_integers(job.get("labels", {}), top_label)
    operation = spec.get("paths", {}).get("/v1/jobs", {}).get("post")
    if operation is not None and roots:
        first = models[0]
        example = {"model": first["name"], "n": 16, "seed": 0, "output": roots[0].rstrip("/") + "/example-job",
                   "shard_size": 8}
        if first.get("conditional"):
            example["labels"] = 0
        _example(operation, example)
