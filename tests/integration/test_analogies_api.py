"""POST /v1/models/{name}/analogies on real Ray Serve over HTTP, with real MLflow (sqlite, temp dir).

A tiny CVAE and a tiny VAE are trained on 8x8 digits, exported (the CVAE with its ``analogies``
graph) and registered as champions. The route's images are compared with the registered graphs
run locally (``OnnxSampler.analogies``) and with the registered torch checkpoint's
``CVAE.analogies`` on the same decoded image; bad input gets 404/422, never a 5xx.
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

DATASET = "ana"
CVAE, VAE = f"{DATASET}-cvae", f"{DATASET}-vae"
K = 10  # digits classes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("analogies")
    with registry_env(root) as tracking_uri:
        register_champions(root, DATASET, ["cvae", "vae"],
                           metrics={"cvae": {"nll_nats": 40.0}, "vae": {"nll_nats": 50.0}})
        with serve_on_free_port(tracking_uri, [CVAE, VAE]) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def cvae(served):
    """The champion's registered graphs and torch checkpoint, loaded in the test process."""
    from genmodels import registry
    from genmodels.models import model_from_checkpoint

    sampler = registry.load_sampler(CVAE).sampler
    model = model_from_checkpoint(registry.download_checkpoint(registry.version_by_alias(CVAE, "champion")))
    return sampler, model.eval()


def _png(pixels: np.ndarray) -> str:
    """uint8 [H, W] -> grey, [H, W, 3|4] -> RGB(A), bool [H, W] -> 1-bit."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def digit(cvae) -> np.ndarray:
    """An 8-bit grey 8x8 image: a sample of the CVAE itself, class 3."""
    sampler, _model = cvae
    return np.round(sampler.sample(1, seed=4, labels=3)[0, 0] * 255).astype(np.uint8)


def _ask(served, name=CVAE, **body):
    return served.post(f"/v1/models/{name}/analogies", json=body)


def test_one_image_per_class_equal_to_the_registered_graphs_and_torch(served, cvae, digit):
    import torch

    sampler, model = cvae
    r = _ask(served, image=_png(digit), label=3, format="array")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["label"]) == (CVAE, "1", 3)
    images = np.asarray(body["images"], np.float32)
    assert images.shape == (K, 1, 8, 8)
    x = (digit.astype(np.float32) / np.float32(255))[None, None]  # what the server decoded
    np.testing.assert_array_equal(images, sampler.analogies(x, 3)[0])
    # Torch sees the image as training did: on the model's grid.
    scale = np.float32(sampler.levels - 1)
    on_grid = torch.from_numpy(np.rint(x * scale) / scale)
    want = model.analogies(on_grid, torch.tensor([3]))[0].numpy()
    np.testing.assert_allclose(images, want, rtol=0, atol=1e-4)
    # Column `label` is the image's reconstruction under its own class.
    recon = model.reconstruct(on_grid, torch.tensor([3]))[0].numpy()
    np.testing.assert_allclose(images[3], recon, rtol=0, atol=1e-4)
    assert np.abs(images[0] - images[1]).max() > 1e-4  # the label changes the picture


def test_png_format_is_the_arrays_in_8_bits(served, digit):
    arrays = np.asarray(_ask(served, image=_png(digit), label=3, format="array").json()["images"], np.float32)
    r = _ask(served, image=_png(digit), label=3)
    assert r.status_code == 200, r.text
    pngs = r.json()["images"]
    assert len(pngs) == K
    for png, expected in zip(pngs, arrays):
        pixels = _decode(png)
        assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, np.round(np.clip(expected[0], 0, 1) * np.float32(255)).astype(np.uint8))


def test_a_1_bit_png_is_accepted_as_grey(served, cvae, digit):
    sampler, _model = cvae
    bits = digit >= 128
    r = _ask(served, image=_png(bits), label=0, format="array")
    assert r.status_code == 200, r.text
    want = sampler.analogies(bits.astype(np.float32)[None, None], 0)[0]
    np.testing.assert_array_equal(np.asarray(r.json()["images"], np.float32), want)


@pytest.mark.parametrize("name,body,status,error,detail", [
    ("nope", {"label": 1}, 404, "model_not_found", "no served model 'nope'"),
    (VAE, {"label": 1}, 422, "no_analogies", "need a conditional VAE"),
    (CVAE, {"label": 10}, 422, "invalid_labels", r"label must lie in [0, 10), got 10"),
    (CVAE, {"label": -1}, 422, "invalid_request", None),
    (CVAE, {"label": 1, "image": "not base64!"}, 422, "invalid_image", "not valid base64"),
    (CVAE, {"label": 1, "image": base64.b64encode(b"GIF89a garbage").decode()}, 422, "invalid_image",
     "are not one"),
    (CVAE, {"label": 1, "image": _png(np.zeros((8, 9), np.uint8))}, 422, "invalid_image",
     "must be 8x8 pixels (width x height) for this model, got 9x8"),
    (CVAE, {"label": 1, "image": _png(np.zeros((8, 8, 3), np.uint8))}, 422, "invalid_image",
     "must be grey (8-bit or 1-bit) for this model's 1 channel(s), got RGB (PNG mode 'RGB')"),
    (CVAE, {"label": 1, "image": _png(np.zeros((8, 8, 4), np.uint8))}, 422, "invalid_image", "RGB + alpha"),
    (CVAE, {"label": 1, "format": "gif"}, 422, "invalid_request", None),
    (CVAE, {"image": "", "label": 1, "extra": 0}, 422, "invalid_request", None),
])
def test_bad_input_gets_404_or_422_with_a_json_error(served, digit, name, body, status, error, detail):
    body = {"image": _png(digit), **body}
    r = _ask(served, name, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    if detail is not None:
        assert detail in r.json()["detail"]


def test_a_truncated_png_is_422_not_500(served, digit):
    raw = base64.b64decode(_png(digit))
    assert len(raw) // 2 > 33  # the header (signature + IHDR) stays whole: pixel data is cut
    r = _ask(served, image=base64.b64encode(raw[: len(raw) // 2]).decode(), label=1)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_image"), r.text
    assert "damaged PNG" in r.json()["detail"]


def test_openapi_documents_the_route(served):
    spec = served.get("/openapi.json").json()
    post = spec["paths"]["/v1/models/{name}/analogies"]["post"]
    assert "200" in post["responses"] and "501" not in post["responses"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("AnalogyResponse")
