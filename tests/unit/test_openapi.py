"""The served ``/openapi.json`` says what the server accepts (serving.api over a stand-in backend,
no Serve): per route the served models that answer it, their classes and sizes, the job limits
and output roots, an example request that validates; the static schema for a client without the
key, and while the models cannot be read."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from fastapi.testclient import TestClient

from genmodels import bulk
from genmodels.checks import MAX_LABEL
from serving.api import create_api
from serving.api.openapi import OUTPUT_TAIL
from serving.api.schemas import AnalogyRequest, CompleteRequest, InterpolateRequest, JobRequest, SampleRequest

ROOT = "file:///srv/gen/outputs/"


def _model(name, family, *, classes=10, shape=(1, 28, 28), **flags):
    return {"name": name, "family": family, "version": "1", "conditional": family == "cvae", "num_classes": classes,
            "image_shape": list(shape), "metrics": {},
            "can_complete": family in ("pixelrnn", "mixture"), "completes_any_mask": family == "mixture",
            "can_interpolate": family in ("vae", "cvae", "gan"), "has_analogies": family == "cvae", **flags}


MODELS = [_model("d-vae", "vae"), _model("d-cvae", "cvae", classes=7), _model("d-rnn", "pixelrnn", shape=(1, 8, 8)),
          _model("d-mix", "mixture", shape=(1, 12, 12))]


class _Backend:
    def __init__(self, models=MODELS, fail=False) -> None:
        self.models, self.fail = models, fail

    async def describe(self):
        if self.fail:
            raise ConnectionError("sampler unreachable")
        return self.models

    async def job_limits(self):
        return {"output_roots": [ROOT, "s3://bucket/gen"], "max_samples": 4096}

    async def submit_job(self, request):  # the jobs routes exist only with all three
        raise AssertionError("not called")

    job_status = cancel_job = submit_job


def _spec(backend=None, headers=None, **api) -> dict:
    client = TestClient(create_api(backend or _Backend(), **api))
    r = client.get("/openapi.json", headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def _name_enum(spec, route, method="post"):
    params = spec["paths"][f"/v1/models/{{name}}/{route}"][method]["parameters"]
    return next(p for p in params if p["name"] == "name")["schema"].get("enum")


def _integers(schema):
    if schema.get("type") == "integer":
        yield schema
    for branch in schema.get("anyOf", []):
        yield from _integers(branch)
    if isinstance(schema.get("items"), dict):
        yield from _integers(schema["items"])


def test_each_model_route_names_exactly_the_served_models_that_answer_it():
    spec = _spec()
    assert _name_enum(spec, "samples") == ["d-vae", "d-cvae", "d-rnn", "d-mix"]
    assert _name_enum(spec, "grid.png", "get") == ["d-vae", "d-cvae", "d-rnn", "d-mix"]
    assert _name_enum(spec, "interpolate") == ["d-vae", "d-cvae"]
    assert _name_enum(spec, "analogies") == ["d-cvae"]
    assert _name_enum(spec, "complete") == ["d-rnn", "d-mix"]


def test_labels_known_rows_images_and_job_fields_are_bounded_as_the_server_checks():
    schemas = _spec()["components"]["schemas"]
    for body, field in [("SampleRequest", "labels"), ("InterpolateRequest", "label"), ("AnalogyRequest", "label"),
                        ("JobRequest", "labels")]:
        bounds = [s["maximum"] for s in _integers(schemas[body]["properties"][field])]
        assert bounds and set(bounds) == {6}, (body, bounds)  # the CVAE's 7 classes
    # No conditional model completes: the completion route's labels keep the static bound, narrowed
    # to no model's classes (null only is useful).
    assert [s.get("maximum") for s in _integers(schemas["CompleteRequest"]["properties"]["labels"])] == [MAX_LABEL]
    assert [s["maximum"] for s in _integers(schemas["CompleteRequest"]["properties"]["known_rows"])] == [11]
    for body, field in [("AnalogyRequest", "image"), ("CompleteRequest", "image"), ("CompleteRequest", "mask")]:
        text = str(schemas[body]["properties"][field])
        assert "'contentMediaType': 'image/png'" in text and "'contentEncoding': 'base64'" in text, (body, field)
    job = schemas["JobRequest"]["properties"]
    assert job["model"]["enum"] == ["d-vae", "d-cvae", "d-rnn", "d-mix"]
    assert [s["maximum"] for s in _integers(job["n"])] == [4096]
    pattern = re.compile(job["output"]["pattern"])
    roots = [ROOT, "s3://bucket/gen"]
    for good in (ROOT + "a", ROOT + "run-1/part.2", "s3://bucket/gen/x_y"):
        assert pattern.match(good), good
        bulk.check_output_root(good, roots)  # every match is accepted by the server's own check
    for bad in (ROOT, ROOT + "../etc", ROOT + "a/./b", ROOT + "a b", "file:///srv/gen/outputsX/a",
                "s3://bucket/general/x", "file:///tmp/a"):
        assert not pattern.match(bad), bad


def test_every_example_request_validates_and_carries_an_image_of_the_models_size():
    from PIL import Image

    spec = _spec()
    examples = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content is not None:
                assert "example" in content, f"{method.upper()} {path} has no example request"
                examples[path] = content["example"]
    SampleRequest.model_validate(examples["/v1/models/{name}/samples"])
    InterpolateRequest.model_validate(examples["/v1/models/{name}/interpolate"])
    assert AnalogyRequest.model_validate(examples["/v1/models/{name}/analogies"]).label == 0
    complete = CompleteRequest.model_validate(examples["/v1/models/{name}/complete"])
    assert complete.known_rows == 4  # half of d-rnn's 8 rows: the first model that completes
    image = Image.open(io.BytesIO(base64.b64decode(complete.image)))
    assert (image.size, image.mode) == ((8, 8), "L")
    job = JobRequest.model_validate(examples["/v1/jobs"])
    bulk.check_output_root(job.output, [ROOT])
    assert job.model == "d-vae" and job.labels is None  # d-vae is unconditional: no labels


def test_without_the_key_or_without_models_the_schema_is_the_static_one():
    static = create_api(_Backend(), api_key="k").openapi()
    assert _spec(api_key="k") == static  # served models are for key holders
    assert _name_enum(_spec(api_key="k", headers={"Authorization": "Bearer k"}), "analogies") == ["d-cvae"]
    assert _spec(_Backend(fail=True)) == create_api(_Backend()).openapi()
    assert _name_enum(static, "samples") is None


@pytest.mark.parametrize("models", [[], [_model("d-vae", "vae")]])
def test_routes_no_served_model_answers_are_left_open(models):
    spec = _spec(_Backend(models))
    assert _name_enum(spec, "analogies") is None and _name_enum(spec, "complete") is None
    if models:
        assert _name_enum(spec, "samples") == ["d-vae"]
    assert np.all([s.get("maximum") == MAX_LABEL
                   for s in _integers(spec["components"]["schemas"]["SampleRequest"]["properties"]["labels"])])


def _admits(schema, value) -> bool:
    """Whether an integer (sub)schema of ``schema`` admits ``value`` by its bounds."""
    return any(s.get("minimum", value) <= value <= s.get("maximum", value)
               and value < s.get("exclusiveMaximum", value + 1) for s in _integers(schema))


@pytest.mark.parametrize("served", [True, False], ids=["served", "static"])
def test_seed_bounds_admit_exactly_the_seeds_the_server_accepts(served):
    from genmodels.noise import MAX_SEED

    spec = _spec() if served else create_api(_Backend()).openapi()
    schemas = spec["components"]["schemas"]
    for body, field in [("SampleRequest", "seed"), ("InterpolateRequest", "seed_a"), ("InterpolateRequest", "seed_b"),
                        ("CompleteRequest", "seed"), ("JobRequest", "seed")]:
        seed = schemas[body]["properties"][field]
        assert _admits(seed, 0) and _admits(seed, MAX_SEED), (body, field, seed)
        assert not _admits(seed, MAX_SEED + 1) and not _admits(seed, -1), (body, field, seed)
    # The server's own check, which the schema must say: MAX_SEED in, MAX_SEED + 1 out.
    assert SampleRequest(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(ValueError):
        SampleRequest(seed=MAX_SEED + 1)


#: What a job route answers beyond the statuses of every operation, and the body it answers with:
#: POST 409 output_in_use (another job writes to that output), DELETE 200 (the job had already
#: ended) and 409 job_runs_elsewhere (a `genmodels generate` process runs it); 501 below.
JOB_STATUSES = {("post", "/v1/jobs"): {"202": "JobAccepted", "409": "ErrorBody", "429": "ErrorBody"},
                ("delete", "/v1/jobs/{job_id}"): {"200": "JobStatus", "202": "JobStatus", "409": "ErrorBody"}}


class _NoJobs:
    """A server without a Jobs deployment: every job route answers 501."""

    async def describe(self):
        return MODELS


def _documented(operation, status):
    body = operation["responses"].get(status, {}).get("content", {}).get("application/json", {})
    return body.get("schema", {}).get("$ref", "").removeprefix("#/components/schemas/")


def test_every_operation_documents_the_error_bodies_it_may_answer():
    """Malformed JSON (400), a fault (500) and an unavailable replica or model (503) answer with
    the same ErrorBody as a refusal: a client generated from the schema must know them all, and
    the job routes' own statuses too."""
    spec = _spec()
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) > 5
    for path, method, operation in operations:
        for status in ("400", "404", "422", "500", "503"):
            assert _documented(operation, status) == "ErrorBody", (method, path, status)
    for (method, path), statuses in JOB_STATUSES.items():
        for status, schema in statuses.items():
            assert _documented(spec["paths"][path][method], status) == schema, (method, path, status)
    # Every job route of a server without the Jobs deployment answers 501: each must say so.
    client = TestClient(create_api(_NoJobs()))
    job_operations = [(path, method, op) for path, method, op in operations if path.startswith("/v1/jobs")]
    assert len(job_operations) == 4
    for path, method, operation in job_operations:
        body = {"model": "d-vae", "n": 1, "seed": 0, "output": ROOT + "a"} if method == "post" else None
        r = client.request(method, path.replace("{job_id}", "j1"), json=body)
        assert (r.status_code, r.json()["error"]) == (501, "not_implemented"), (method, path, r.text)
        assert _documented(operation, "501") == "ErrorBody", (method, path)


#: Output roots with characters ``re.escape`` escapes although neither Python's ``re`` nor ECMA-262
#: needs it (``\-`` outside a class is a syntax error in ECMA-262 with the ``u`` flag).
ODD_ROOTS = ["s3://genmodels-outputs/", "file:///srv/a~b/#1 & 2/", "s3://bucket.eu/c++(x)[y]{z}|a^b$?*\\/"]
#: What a pattern may escape: the syntax characters of both engines, and "/".
ESCAPABLE = set("\\^$.|?*+()[]{}/")


def _output_pattern(roots) -> str:
    class Roots(_Backend):
        async def job_limits(self):
            return {"output_roots": roots, "max_samples": 4096}

    return _spec(Roots())["components"]["schemas"]["JobRequest"]["properties"]["output"]["pattern"]


def test_the_output_pattern_means_the_same_in_python_and_ecma_262():
    pattern = _output_pattern(ODD_ROOTS)
    assert not {m for m in re.findall(r"\\(.)", pattern) if m not in ESCAPABLE}, pattern
    # What re.escape's pattern matched, and only that.
    before = re.compile("^(?:" + "|".join(re.escape(r.rstrip("/") + "/") for r in ODD_ROOTS) + ")"
                        + OUTPUT_TAIL + "$")
    tails = ["a", "run-1/part.2", "", "../x", "a b", "a/./b"]
    near = [r[:-2] + "/" for r in ODD_ROOTS] + [r.replace(".", "x").replace("-", "_") for r in ODD_ROOTS]
    for path in [root + tail for root in ODD_ROOTS + near for tail in tails]:
        assert bool(re.match(pattern, path)) == bool(before.match(path)), path
    assert re.match(pattern, ODD_ROOTS[1] + "a") and not re.match(pattern, "file:///srv/a~b/#1 & 3/a")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_output_pattern_compiles_and_matches_as_json_schema_validators_read_it():
    # Ajv (and other JSON-Schema validators in JavaScript) compile a pattern with the "u" flag.
    pattern = _output_pattern(ODD_ROOTS)
    paths = [ODD_ROOTS[0] + "run-1/x.npz", ODD_ROOTS[1] + "a", ODD_ROOTS[2] + "b", ODD_ROOTS[0] + "../x",
             "s3://genmodels-outputsX/a"]
    script = ("const [p, ...paths] = JSON.parse(process.argv[1]); const r = new RegExp(p, 'u');"
              "console.log(JSON.stringify(paths.map((s) => r.test(s))));")
    out = subprocess.run(["node", "-e", script, json.dumps([pattern, *paths])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [bool(re.match(pattern, s)) for s in paths] == [True, True, True, False, False]


def test_the_format_field_says_the_largest_array_answer_of_each_served_model():
    from serving.api.schemas import MAX_ARRAY_VALUES

    # 3x128x128: 85 images fit in an array answer; 3x256x256 with 22 classes: its analogies do not.
    models = [_model("d-vae", "vae"), _model("rgb", "vae", shape=(3, 128, 128)),
              _model("big-cvae", "cvae", classes=22, shape=(3, 256, 256)), _model("d-rnn", "pixelrnn", shape=(1, 8, 8))]
    schemas = _spec(_Backend(models))["components"]["schemas"]
    described = {body: schemas[body]["properties"]["format"]["description"]
                 for body in ("SampleRequest", "InterpolateRequest", "AnalogyRequest", "CompleteRequest")}
    assert all(f"{MAX_ARRAY_VALUES:_} values" in text for text in described.values()), described
    assert described["SampleRequest"].endswith("the largest n with array: d-vae 256, rgb 85, big-cvae 21, d-rnn 256.")
    assert described["InterpolateRequest"].endswith("the largest steps with array: d-vae 64, rgb 64, big-cvae 21.")
    assert described["AnalogyRequest"].endswith("png only for the analogies of big-cvae.")
    assert described["CompleteRequest"].endswith("the largest n with array: d-rnn 64.")
