"""Errors of the HTTP layer (serving.api over a stand-in backend, no Serve): a server fault is a
500 carrying only an error id, an unavailable replica a 503, and PNG payloads are sized from
their header before any decoding."""

from __future__ import annotations

import base64
import io
import logging
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.api import create_api
from serving.errors import RequestError
from serving.models import decode_png, png_size


class _Failing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def describe(self):
        raise self.exc


def test_a_server_fault_is_a_500_with_an_error_id_and_the_details_only_in_the_log(caplog):
    client = TestClient(create_api(_Failing(RuntimeError("s3://secret-bucket at http://10.0.0.7:9000"))),
                        raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        r = client.get("/v1/models")
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal" and re.fullmatch(r"[0-9a-f]{16}", body["detail"]), body
    assert "secret" not in r.text and "10.0.0.7" not in r.text
    logged = [rec for rec in caplog.records if body["detail"] in rec.getMessage()]
    assert logged and "secret-bucket" in logging.Formatter().formatException(logged[0].exc_info)


def test_a_dead_replica_is_a_503_not_a_500():
    from ray.exceptions import RayActorError

    r = TestClient(create_api(_Failing(RayActorError())), raise_server_exceptions=False).get("/v1/models")
    assert (r.status_code, r.json()["error"]) == (503, "unavailable"), r.text
    assert r.headers["Retry-After"] == "1"


def test_a_refusal_for_a_dependency_that_is_down_says_when_to_retry():
    """A model that could not be loaded (its replica retries it every reload interval), the
    registry or the job store unreachable: 503 with Retry-After, as a dead replica's."""
    refused = RequestError(503, "model_unavailable", "model 'm' is served here but could not be loaded yet")
    r = TestClient(create_api(_Failing(refused)), raise_server_exceptions=False).get("/v1/models")
    assert (r.status_code, r.json()["error"]) == (503, "model_unavailable"), r.text
    assert int(r.headers["Retry-After"]) > 0


def _png(width: int, height: int, claim: tuple[int, int] | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8), mode="L").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    if claim is not None:  # rewrite the IHDR size (its CRC no longer matches: never read)
        data[16:24] = claim[0].to_bytes(4, "big") + claim[1].to_bytes(4, "big")
    return bytes(data)


def test_png_size_reads_the_header_only():
    assert png_size(_png(8, 6)) == (8, 6)
    assert png_size(_png(8, 8, claim=(30000, 30000))) == (30000, 30000)
    assert png_size(b"GIF89a" + bytes(30)) is None and png_size(b"") is None


@pytest.mark.parametrize("claim, message", [((30000, 30000), "got 30000x30000"), ((9, 8), "got 9x8")])
def test_a_png_claiming_another_size_is_422_before_pillow_decodes_it(claim, message):
    payload = base64.b64encode(_png(8, 8, claim=claim)).decode()
    with pytest.raises(RequestError) as err:
        decode_png(payload, (1, 8, 8))
    assert (err.value.status_code, err.value.error) == (422, "invalid_image") and message in err.value.detail
    assert decode_png(base64.b64encode(_png(8, 8)).decode(), (1, 8, 8)).shape == (1, 8, 8)


def test_the_http_layer_encodes_images_without_the_evaluation_package():
    # Serving needs PNG encoding, not the classifier and metrics of genmodels.evaluation.
    import subprocess
    import sys

    code = ("import sys, numpy as np; import serving.api as api; "
            "api.encode_images(np.zeros((2, 1, 4, 4), np.float32), 'png'); "
            "print('genmodels.evaluation' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Conditional:
    """A class-conditional model (10 classes) whose labels go through the sampler's own check, as
    serving.models.ModelSet sends them."""

    async def describe(self):
        return [{"name": "m", "family": "cvae", "version": "1", "conditional": True, "num_classes": 10,
                 "image_shape": [1, 2, 2], "metrics": {}, "can_interpolate": True}]

    def _check(self, labels, n, field="labels"):
        from genmodels.checks import check_labels_array
        from serving.models import _checked_labels

        return _checked_labels(lambda v, k, f: check_labels_array(v, k, family="cvae", conditional=True,
                                                                  num_classes=10, field=f), labels, n, field)

    async def sample(self, request):
        field = "label" if "label" in request else "labels"  # as ModelSet.prepare reads it (the grid: label)
        self._check(request[field], request["n"], field)
        return {"model": "m", "version": "1", "seed": request["seed"],
                "images": np.zeros((request["n"], 1, 2, 2), np.float32)}

    async def interpolate(self, request):
        self._check(request["label"], request["steps"], "label")
        return {"model": "m", "version": "1", "seed_a": request["seed_a"], "seed_b": request["seed_b"],
                "images": np.zeros((request["steps"], 1, 2, 2), np.float32)}


@pytest.mark.parametrize("call", [
    lambda c, big: c.post("/v1/models/m/samples", json={"n": 1, "seed": 0, "labels": big}),
    lambda c, big: c.post("/v1/models/m/samples", json={"n": 2, "seed": 0, "labels": [0, big]}),
    lambda c, big: c.get("/v1/models/m/grid.png", params={"n": 1, "seed": 0, "label": big}),
    lambda c, big: c.post("/v1/models/m/interpolate", json={"seed_a": 0, "seed_b": 1, "steps": 2, "label": big}),
], ids=["samples", "samples-list", "grid", "interpolate"])
@pytest.mark.parametrize("big", [2**64 - 1, 2**63, 10**30])
def test_a_label_beyond_every_class_is_422_naming_the_bound_not_what_a_cast_reads(call, big):
    r = call(TestClient(create_api(_Conditional())), big)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request"), r.text
    assert "2147483647" in r.text and "-1" not in r.text and "dtype" not in r.text, r.text


@pytest.mark.parametrize("call, detail", [
    (lambda c: c.post("/v1/models/m/samples", json={"n": 1, "seed": 0, "labels": 10}), "labels must lie in"),
    (lambda c: c.get("/v1/models/m/grid.png", params={"n": 1, "seed": 0, "label": 10}), "label must lie in"),
    (lambda c: c.post("/v1/models/m/interpolate", json={"seed_a": 0, "seed_b": 1, "steps": 2, "label": 10}),
     "label must lie in"),
], ids=["samples", "grid", "interpolate"])
def test_a_label_beyond_the_models_classes_is_422_naming_the_requests_field(call, detail):
    r = call(TestClient(create_api(_Conditional())))
    assert (r.status_code, r.json()["error"]) == (422, "invalid_labels"), r.text
    assert r.json()["detail"] == f"{detail} [0, 10), got 10", r.text


@pytest.mark.parametrize("call", [
    lambda c, t: c.post("/v1/models/m/samples", json={"n": 1, "seed": 0, "labels": 0, "temperature": t}),
    lambda c, t: c.post("/v1/models/m/interpolate", json={"seed_a": 0, "seed_b": 1, "label": 0, "temperature": t}),
], ids=["samples", "interpolate"])
@pytest.mark.parametrize("temperature", ["0.5", True, False])
def test_a_temperature_that_is_not_a_json_number_is_422_naming_it(call, temperature):
    # As for n, seeds and labels: a string or a boolean is not silently read as a number (true as 1.0).
    r = call(TestClient(create_api(_Conditional())), temperature)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request"), r.text
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "temperature"]], r.text
    assert call(TestClient(create_api(_Conditional())), 1).status_code == 200  # an integer still is a number


class _Images:
    """Every sampling route's backend call, answering 4 blank 2x2 images."""

    async def describe(self):
        return []

    async def sample(self, request):
        return {"model": "m", "version": "1", "seed": request["seed"], "images": np.zeros((4, 1, 2, 2), np.float32)}

    async def interpolate(self, request):
        return {"model": "m", "version": "1", "seed_a": 0, "seed_b": 1, "images": np.zeros((4, 1, 2, 2), np.float32)}

    async def analogies(self, request):
        return {"model": "m", "version": "1", "label": 0, "images": np.zeros((4, 1, 2, 2), np.float32)}

    async def complete(self, request):
        return {"model": "m", "version": "1", "seed": 0, "images": np.zeros((4, 1, 2, 2), np.float32)}


_IMAGE = base64.b64encode(_png(2, 2)).decode()


@pytest.mark.parametrize("call", [
    lambda c: c.post("/v1/models/m/samples", json={"n": 4, "seed": 0}),
    lambda c: c.post("/v1/models/m/samples", json={"n": 4, "seed": 0, "format": "array"}),
    lambda c: c.get("/v1/models/m/grid.png", params={"n": 4, "seed": 0}),
    lambda c: c.post("/v1/models/m/interpolate", json={"seed_a": 0, "seed_b": 1, "steps": 4}),
    lambda c: c.post("/v1/models/m/analogies", json={"image": _IMAGE, "label": 0}),
    lambda c: c.post("/v1/models/m/complete", json={"image": _IMAGE, "known_rows": 1, "n": 4, "seed": 0}),
], ids=["samples-png", "samples-array", "grid", "interpolate", "analogies", "complete"])
def test_images_are_encoded_off_the_event_loop(monkeypatch, call):
    # The encoder blocks until released: on the event loop, no other request could be answered
    # meanwhile (n=256 images take 20-100 ms to encode).
    import asyncio
    import threading

    import httpx

    from serving.api import sampling

    encoding, release, released = threading.Event(), threading.Event(), []

    def blocking(encode):
        def encoder(*args, **kwargs):
            encoding.set()
            released.append(release.wait(10))  # False: waited in vain, the loop stood still
            return encode(*args, **kwargs)
        return encoder

    monkeypatch.setattr(sampling, "encode_images", blocking(sampling.encode_images))
    monkeypatch.setattr(sampling, "grid_png", blocking(sampling.grid_png))

    async def main():
        transport = httpx.ASGITransport(app=create_api(_Images()))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            encoded = asyncio.create_task(call(client))
            assert await asyncio.to_thread(encoding.wait, 10)
            other = await client.get("/v1/models")
            release.set()
            return other, await encoded

    other, encoded = asyncio.run(main())
    assert other.status_code == 200 and encoded.status_code == 200, encoded.text
    assert released == [True]


@pytest.mark.parametrize("body, ctype", [(b"{", "application/json"), (b'{"n": 1}', "text/plain")],
                         ids=["malformed-json", "not-json"])
def test_with_an_api_key_a_request_without_it_is_401_whatever_its_body(body, ctype):
    # Checked after the body was parsed, a malformed one was answered 400 to a client without the key.
    records: list[dict] = []
    client = TestClient(create_api(_Images(), api_key="k", request_log=records.append))
    r = client.post("/v1/models/m/samples", content=body, headers={"content-type": ctype})
    assert (r.status_code, r.json()["error"], r.headers["WWW-Authenticate"]) == (401, "unauthorized", "Bearer")
    assert records[0]["route"] == "/v1/models/{name}/samples"  # refused by the route: still labelled by it
    r = client.post("/v1/models/m/samples", content=body, headers={"content-type": ctype,
                                                                    "authorization": "Bearer k"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_json"), r.text


class _Sized:
    """Models of several image sizes, each route recording what it was asked to draw."""

    MODELS = {"big": ([3, 256, 256], 22), "fashion": ([1, 28, 28], 10), "rgb64": ([3, 64, 64], 10),
              "rgb128": ([3, 128, 128], 10)}

    def __init__(self) -> None:
        self.drawn: list[str] = []

    async def describe(self):
        return [{"name": name, "family": "cvae", "version": "1", "conditional": True, "num_classes": classes,
                 "image_shape": shape, "metrics": {}, "can_interpolate": True, "has_analogies": True,
                 "can_complete": True} for name, (shape, classes) in self.MODELS.items()]

    def _answer(self, route, request, **out):
        # One image whatever the count: the bound is checked before anything is drawn, and this
        # keeps a test of a 3.1M-value request from encoding one.
        self.drawn.append(route)
        shape = self.MODELS[request["model"]][0]
        return {"model": request["model"], "version": "1", **out, "images": np.zeros((1, *shape), np.float32)}

    async def sample(self, request):
        return self._answer("samples", request, seed=request["seed"])

    async def interpolate(self, request):
        return self._answer("interpolate", request, seed_a=0, seed_b=1)

    async def analogies(self, request):
        return self._answer("analogies", request, label=0)

    async def complete(self, request):
        return self._answer("complete", request, seed=0)


_ARRAY_ROUTES = {
    "samples": lambda c, name, count, fmt: c.post(f"/v1/models/{name}/samples",
                                                  json={"n": count, "seed": 0, "format": fmt}),
    "interpolate": lambda c, name, count, fmt: c.post(f"/v1/models/{name}/interpolate",
                                                      json={"seed_a": 0, "seed_b": 1, "steps": count, "format": fmt}),
    "analogies": lambda c, name, count, fmt: c.post(f"/v1/models/{name}/analogies",
                                                    json={"image": _IMAGE, "label": 0, "format": fmt}),
    "complete": lambda c, name, count, fmt: c.post(f"/v1/models/{name}/complete",
                                                   json={"image": _IMAGE, "known_rows": 1, "n": count, "format": fmt}),
}


@pytest.mark.parametrize("route, field", [("samples", "n"), ("interpolate", "steps"), ("analogies", None),
                                          ("complete", "n")])
def test_an_array_answer_over_the_value_bound_is_422_naming_the_largest_count_before_sampling(route, field):
    # big: 3x256x256 = 196_608 values an image, 21 of them fit in 2**22; 22 classes do not.
    backend = _Sized()
    client = TestClient(create_api(backend))
    r = _ARRAY_ROUTES[route](client, "big", 22, "array")
    assert (r.status_code, r.json()["error"]) == (422, "array_too_large"), r.text
    detail = r.json()["detail"]
    assert "22 x 3x256x256 = 4_325_376 values" in detail and "format=png" in detail, detail
    assert (f"{field} may be at most 21 with format=array" if field else "one image per class") in detail, detail
    assert backend.drawn == []  # refused before anything was drawn
    assert _ARRAY_ROUTES[route](client, "big", 22, "png").status_code == 200  # PNGs have no such bound
    if field is not None:
        assert _ARRAY_ROUTES[route](client, "big", 21, "array").status_code == 200
    assert backend.drawn == [route] * (1 if field is None else 2)


@pytest.mark.parametrize("name, n", [("fashion", 256), ("rgb64", 256), ("rgb128", 85)])
def test_array_answers_within_the_value_bound_are_served(name, n):
    # 256 Fashion-MNIST images are 200_704 values, 256 of 3x64x64 3.1M; of 3x128x128, 85 fit (86 do not).
    client = TestClient(create_api(_Sized()))
    assert _ARRAY_ROUTES["samples"](client, name, n, "array").status_code == 200
    if name == "rgb128":
        r = _ARRAY_ROUTES["samples"](client, name, n + 1, "array")
        assert (r.status_code, r.json()["error"]) == (422, "array_too_large"), r.text
        assert "n may be at most 85 with format=array" in r.json()["detail"]
