"""POST /v1/models/{name}/complete on real Ray Serve over HTTP, with real MLflow (sqlite, temp dir).

A tiny PixelRNN, mixture and VAE are trained on 8x8 binary digits, exported and registered as
champions. Completions from the route equal the registered graphs run locally
(``OnnxSampler.complete``) and the registered torch checkpoint's ``complete`` on the same
decoded image and seed; known pixels come back exactly; every defect gets a 422 naming it.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from registry_fixtures import registry_env
from serving_fixtures import register_champions, serve_on_free_port

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")

DATASET = "cmp"
RNN, MIX, VAE = f"{DATASET}-pixelrnn", f"{DATASET}-mixture", f"{DATASET}-vae"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("complete")
    with registry_env(root) as tracking_uri:
        register_champions(root, DATASET, ["pixelrnn", "mixture", "vae"],
                           metrics={f: {"nll_nats": 40.0} for f in ("pixelrnn", "mixture", "vae")})
        with serve_on_free_port(tracking_uri, [RNN, MIX, VAE]) as url, \
                httpx.Client(base_url=url, timeout=120) as client:
            yield client


@pytest.fixture(scope="module")
def registered(served):
    """name -> (the champion's graphs, its torch model), loaded in the test process."""
    from genmodels import registry
    from genmodels.models import model_from_checkpoint

    out = {}
    for name in (RNN, MIX):
        model = model_from_checkpoint(registry.download_checkpoint(registry.version_by_alias(name, "champion")))
        out[name] = (registry.load_sampler(name).sampler, model.eval())
    return out


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def digit(registered) -> np.ndarray:
    """An 8-bit grey 8x8 binary image: a sample of the registered PixelRNN."""
    sampler, _model = registered[RNN]
    return (sampler.sample(1, seed=4)[0, 0] * 255).astype(np.uint8)


MASK = np.add.outer(np.arange(8), np.arange(8)) % 3 != 0  # True = known


def _ask(served, name, **body):
    return served.post(f"/v1/models/{name}/complete", json=body)


@pytest.mark.parametrize("name,known", [(RNN, {"known_rows": 4}), (MIX, {"known_rows": 5}),
                                        (MIX, {"mask": _png(np.where(MASK, 255, 0).astype(np.uint8))})])
def test_completions_equal_the_registered_graphs_and_torch(served, registered, digit, name, known):
    import torch

    sampler, model = registered[name]
    r = _ask(served, name, image=_png(digit), n=6, seed=123, format="array", **known)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["seed"]) == (name, "1", 123)
    images = np.asarray(body["images"], np.float32)
    assert images.shape == (6, 1, 8, 8)
    x = (digit.astype(np.float32) / np.float32(255))[None]
    k = known.get("known_rows", MASK)
    np.testing.assert_array_equal(images, sampler.complete(x, k, 6, seed=123))
    np.testing.assert_array_equal(images, model.complete(torch.from_numpy(x), k, 6, seed=123).numpy())
    keep = model.completion_mask(k).numpy()
    assert (images[:, 0][:, keep] == x[0][keep]).all()  # known pixels exactly as sent
    assert len({im.tobytes() for im in images}) > 1  # the unknown ones are drawn


def test_png_format_same_seed_same_bytes_and_a_random_seed_is_returned(served, digit):
    a = _ask(served, RNN, image=_png(digit), known_rows=3, n=4, seed=7)
    b = _ask(served, RNN, image=_png(digit), known_rows=3, n=4, seed=7)
    assert a.status_code == 200, a.text
    assert a.json()["images"] == b.json()["images"]
    arrays = np.asarray(_ask(served, RNN, image=_png(digit), known_rows=3, n=4, seed=7, format="array")
                        .json()["images"], np.float32)
    for png, want in zip(a.json()["images"], arrays):
        np.testing.assert_array_equal(_decode(png), (want[0] * 255).astype(np.uint8))
    r = _ask(served, MIX, image=_png(digit), known_rows=2)
    assert r.status_code == 200 and isinstance(r.json()["seed"], int) and len(r.json()["images"]) == 1


ZEROS = _png(np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("name,body,status,error,detail", [
    ("nope", {"known_rows": 2}, 404, "model_not_found", "no served model 'nope'"),
    (VAE, {"known_rows": 2}, 422, "no_completion", "the vae family has no exact completion"),
    (RNN, {}, 422, "invalid_known", "exactly one of known_rows"),
    (MIX, {"known_rows": 2, "mask": ZEROS}, 422, "invalid_known", "got both"),
    (RNN, {"mask": ZEROS}, 422, "invalid_known", "completes after known rows only"),
    (RNN, {"known_rows": 8}, 422, "invalid_known", "known_rows must be in [1, 7]"),
    (MIX, {"known_rows": 0}, 422, "invalid_request", None),
    (RNN, {"known_rows": 2, "n": 65}, 422, "invalid_request", None),
    (RNN, {"known_rows": 2, "n": 0}, 422, "invalid_request", None),
    (RNN, {"known_rows": 2, "labels": 1}, 422, "invalid_labels", "unconditional"),
    (RNN, {"known_rows": 2, "temperature": 0}, 422, "invalid_request", None),
    (RNN, {"known_rows": 2, "image": "not base64!"}, 422, "invalid_image", "not valid base64"),
    (RNN, {"known_rows": 2, "image": base64.b64encode(b"GIF89a garbage").decode()}, 422, "invalid_image",
     "are not one"),
    (MIX, {"known_rows": 2, "image": _png(np.zeros((9, 8), np.uint8))}, 422, "invalid_image",
     "must be 8x8 pixels (width x height) for this model, got 8x9"),
    (MIX, {"known_rows": 2, "image": _png(np.zeros((8, 8, 3), np.uint8))}, 422, "invalid_image",
     "got RGB (PNG mode 'RGB')"),
    (MIX, {"mask": _png(np.zeros((8, 7), np.uint8))}, 422, "invalid_mask", "mask must be 8x8 pixels"),
    (MIX, {"mask": "%%%"}, 422, "invalid_mask", "not valid base64"),
    (RNN, {"known_rows": 2, "extra": 1}, 422, "invalid_request", None),
])
def test_bad_input_gets_404_or_422_naming_the_defect(served, digit, name, body, status, error, detail):
    r = _ask(served, name, **{"image": _png(digit), **body})
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    if detail is not None:
        assert detail in r.json()["detail"]


def test_openapi_documents_the_route(served):
    spec = served.get("/openapi.json").json()
    post = spec["paths"]["/v1/models/{name}/complete"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("CompleteResponse")
    schema = spec["components"]["schemas"]["CompleteRequest"]
    assert {"image", "known_rows", "mask", "n", "seed", "temperature", "labels"} <= set(schema["properties"])
    assert schema["properties"]["n"]["maximum"] == 64


def test_models_list_says_which_models_complete_and_which_take_a_mask(served):
    flags = {m["name"]: (m["can_complete"], m["completes_any_mask"]) for m in served.get("/v1/models").json()}
    assert flags == {RNN: (True, False), MIX: (True, True), VAE: (False, False)}
