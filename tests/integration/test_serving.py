"""The online sampling API on real Ray Serve over HTTP, with real MLflow (sqlite in a temp dir).

Tiny VAEs (two versions, to move ``champion`` between) and a tiny CVAE are trained on 8x8
digits once per module, exported to ONNX and registered under ``srv-vae`` / ``srv-cvae``.
Served images are compared with what the same registered graphs sample locally
(``registry.load_sampler``): equal arrays, and PNGs equal to the arrays rounded to 8 bits.
"""

from __future__ import annotations

import base64
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from genmodels import registry, runs
from genmodels.data import PrepConfig
from genmodels.storage import open_storage
from registry_fixtures import registry_env
from serving_fixtures import free_port

TINY = {"latent_dim": 3, "hidden": (16,)}
VAE, CVAE = "srv-vae", "srv-cvae"
APP = "genmodels"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MLflow in a temp dir; VAE v1 and the CVAE registered as champions, VAE v2 trained only."""
    root = tmp_path_factory.mktemp("serving")
    with registry_env(root):
        store = open_storage(root / "store")
        snap = runs.snapshot_for(store, "digits", None, PrepConfig(seed=0))

        def train(key: str, family: str, seed: int):
            outcome = runs.train_family(store.child(key), snap, family, "quick",
                                        overrides={"epochs": 1, "max_train_examples": 128, "seed": seed},
                                        model_overrides=TINY)
            runs.export_run(outcome.run)
            return outcome.run

        runs_ = {"vae1": train("vae1", "vae", 0), "vae2": train("vae2", "vae", 1), "cvae": train("cvae", "cvae", 0)}

        def register(key: str, family: str, nll: float, dataset: str = "srv") -> str:
            run = runs_[key]
            _, meta = runs.load_model(run)
            with tempfile.TemporaryDirectory() as tmp:
                reg = registry.register(dataset=dataset, family=family, preset="quick",
                                        checkpoint=run.get_bytes("model.pt"), onnx_files=runs.fetch_onnx(run, tmp),
                                        metrics={"nll_nats": nll}, params={"family": family},
                                        snapshot_hash=meta["snapshot_hash"], artifact_root=(root / "mlflow").as_uri())
            return reg.version

        def champion(name: str, version: str) -> None:
            from mlflow import MlflowClient

            MlflowClient().set_registered_model_alias(name, "champion", version)

        assert register("vae1", "vae", 50.0) == "1"
        assert register("cvae", "cvae", 40.0) == "1"
        champion(VAE, "1")
        champion(CVAE, "1")
        yield {"root": root, "register": register, "champion": champion,
               "tracking_uri": f"sqlite:///{root}/mlflow.db"}


def _deploy(trained, **args):
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({"models": [VAE, CVAE], "tracking_uri": trained["tracking_uri"], "reload_interval_s": 0.3,
                         "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_body_bytes": 4096, **args}),
              name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def server(trained):
    from ray import serve

    from genmodels.ray_runtime import ensure_ray, stop_ray

    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # Ray's processes read it at start: metrics reach the Prometheus endpoint within a second.
        mp.setenv("RAY_metrics_report_interval_ms", "500")
        from serving.app import SERVE_ENV

        for key, value in SERVE_ENV.items():  # the Ray Serve settings `genmodels serve` runs with
            mp.setenv(key, value)
        ensure_ray(num_cpus=4, metrics_export_port=metrics_port)  # logical CPUs: the Sampler replica reserves one
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        _deploy(trained)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            client.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            yield client
    finally:
        serve.shutdown()
        stop_ray()


@pytest.fixture(scope="module")
def local(trained):
    """The champions' graphs loaded in the test process: what the server must reproduce."""
    return {name: registry.load_sampler(name).sampler for name in (VAE, CVAE)}


def serve_deployments() -> set[str]:
    from ray import serve

    return set(serve.status().applications[APP].deployments)


def _stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Api", app_name=APP).stats.remote().result()


def _png_array(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _to_8bit(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * np.float32(255)).astype(np.uint8)


def _samples(server, name=VAE, headers=None, **body):
    r = server.post(f"/v1/models/{name}/samples", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# --- routes ----------------------------------------------------------------------------------------
def test_healthz_and_openapi(server):
    r = server.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    spec = server.get("/openapi.json").json()
    assert {"/healthz", "/v1/models", "/v1/models/{name}/samples", "/v1/models/{name}/grid.png",
            "/v1/models/{name}/interpolate", "/v1/models/{name}/analogies"} <= set(spec["paths"])
    assert server.get("/docs").status_code == 200


def test_models_lists_each_champion_with_its_metadata(server):
    import datetime

    r = server.get("/v1/models")
    assert r.status_code == 200
    models = r.json()
    for m in models:  # registered moments ago, as an ISO 8601 UTC time
        registered = datetime.datetime.fromisoformat(m.pop("registered_at"))
        assert abs(datetime.datetime.now(datetime.timezone.utc) - registered) < datetime.timedelta(hours=1)
        assert len(m.pop("snapshot_hash")) == 64
    assert models == [
        {"name": CVAE, "family": "cvae", "version": "1", "conditional": True, "num_classes": 10,
         "image_shape": [1, 8, 8], "can_complete": False, "completes_any_mask": False, "can_interpolate": True,
         "has_analogies": True, "dataset": "srv", "preset": "quick", "metrics": {"nll_nats": 40.0}},
        {"name": VAE, "family": "vae", "version": "1", "conditional": False, "num_classes": 10,
         "image_shape": [1, 8, 8], "can_complete": False, "completes_any_mask": False, "can_interpolate": True,
         "has_analogies": False, "dataset": "srv", "preset": "quick", "metrics": {"nll_nats": 50.0}},
    ]


def test_samples_are_the_registered_graphs_samples_as_png_and_array(server, local):
    want = local[VAE].sample(5, seed=7, temperature=0.8)
    arr = _samples(server, n=5, seed=7, temperature=0.8, format="array")
    assert (arr["model"], arr["version"], arr["seed"]) == (VAE, "1", 7)
    assert np.array_equal(np.asarray(arr["images"], dtype=np.float32), want)
    png = _samples(server, n=5, seed=7, temperature=0.8)
    assert len(png["images"]) == 5
    for image, expected in zip(png["images"], want):
        pixels = _png_array(image)
        assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, _to_8bit(expected[0]))


def test_same_seed_same_bytes_and_omitted_seed_is_returned(server):
    a, b = _samples(server, n=3, seed=11), _samples(server, n=3, seed=11)
    assert a == b
    assert _samples(server, n=3, seed=12)["images"] != a["images"]
    drawn = _samples(server, n=3)
    assert isinstance(drawn["seed"], int) and 0 <= drawn["seed"] < 2**53
    assert _samples(server, n=3, seed=drawn["seed"])["images"] == drawn["images"]


def test_concurrent_requests_are_batched_without_changing_any_image(server):
    asks = [{"n": 1 + i % 3, "seed": 100 + i, "temperature": 1.0 if i % 2 else 0.5, "format": "array"}
            for i in range(8)]
    alone = [_samples(server, **ask) for ask in asks]  # sequential: one request per batch
    before = _stats()
    barrier = threading.Barrier(len(asks))

    def ask(body):
        barrier.wait()
        return _samples(server, **body)

    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    after = _stats()
    assert together == alone
    assert after["requests_sampled"] - before["requests_sampled"] == len(asks)
    # Two temperatures -> at least two onnxruntime calls; fewer than one per request means
    # requests were merged (batch_wait_timeout_s=0.05 gives the 8 threads time to meet).
    assert 2 <= after["onnx_calls"] - before["onnx_calls"] < len(asks)


def test_conditional_labels_one_per_image_one_for_all_or_cycling(server, local):
    s = local[CVAE]
    per_image = _samples(server, CVAE, n=4, seed=3, labels=[0, 3, 3, 9], format="array")
    assert np.array_equal(np.asarray(per_image["images"], np.float32), s.sample(4, seed=3, labels=[0, 3, 3, 9]))
    one = _samples(server, CVAE, n=4, seed=3, labels=5, format="array")
    assert np.array_equal(np.asarray(one["images"], np.float32), s.sample(4, seed=3, labels=5))
    cycling = _samples(server, CVAE, n=12, seed=3, format="array")
    assert np.array_equal(np.asarray(cycling["images"], np.float32), s.sample(12, seed=3, labels=np.arange(12) % 10))


def test_grid_png(server, local):
    from PIL import Image

    r = server.get(f"/v1/models/{VAE}/grid.png", params={"n": 4, "seed": 5, "temperature": 0.7})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-seed"], r.headers["x-model-version"]) == ("5", "1")
    picture = Image.open(io.BytesIO(r.content))
    assert picture.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 2x2 tiles of 8px upscaled x8, 2px borders
    from genmodels.evaluation.pictures import grid_png

    assert r.content == grid_png(local[VAE].sample(4, seed=5, temperature=0.7), nrow=2)
    labelled = server.get(f"/v1/models/{CVAE}/grid.png", params={"n": 3, "seed": 5, "label": 2})
    assert labelled.status_code == 200
    assert labelled.content == grid_png(local[CVAE].sample(3, seed=5, labels=2), nrow=2)


def test_interpolate_walks_from_seed_a_sample_to_seed_b_sample(server, local):
    r = server.post(f"/v1/models/{VAE}/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 5, "format": "array"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["seed_a"], body["seed_b"]) == (VAE, "1", 1, 2)
    images = np.asarray(body["images"], np.float32)
    assert images.shape == (5, 1, 8, 8)
    assert np.array_equal(images[0], local[VAE].sample(1, seed=1)[0])
    assert np.array_equal(images[-1], local[VAE].sample(1, seed=2)[0])
    cond = server.post(f"/v1/models/{CVAE}/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 3, "label": 4})
    assert cond.status_code == 200 and len(cond.json()["images"]) == 3
    assert np.array_equal(_png_array(cond.json()["images"][0]), _to_8bit(local[CVAE].sample(1, seed=1, labels=4)[0, 0]))


def test_analogies_refuse_an_empty_image(server):
    # The route itself is tested in test_analogies_api.py; here: bad input is a 422, never a 5xx.
    r = server.post(f"/v1/models/{CVAE}/analogies", json={"image": "", "label": 1})
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_image"


@pytest.mark.parametrize("method,path,body,status,error", [
    ("post", "/v1/models/nope/samples", {"n": 1}, 404, "model_not_found"),
    ("get", "/v1/models/nope/grid.png", None, 404, "model_not_found"),
    ("post", "/v1/models/nope/interpolate", {"seed_a": 1, "seed_b": 2}, 404, "model_not_found"),
    ("get", "/v1/nothing-here", None, 404, "not_found"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 0}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 257}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 2.5}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 1, "temperature": 0}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 1, "temperature": 1e-40}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 1, "seed": -1}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 1, "format": "jpeg"}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 1, "colour": "red"}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/samples", {"n": 1, "labels": 3}, 422, "invalid_labels"),
    ("post", f"/v1/models/{CVAE}/samples", {"n": 1, "labels": 10}, 422, "invalid_labels"),
    ("post", f"/v1/models/{CVAE}/samples", {"n": 3, "labels": [1, 2]}, 422, "invalid_labels"),
    ("get", f"/v1/models/{VAE}/grid.png?n=0", None, 422, "invalid_request"),
    ("get", f"/v1/models/{VAE}/grid.png?label=1", None, 422, "invalid_labels"),
    ("post", f"/v1/models/{VAE}/interpolate", {"seed_a": 1, "seed_b": 2, "steps": 1}, 422, "invalid_request"),
    ("post", f"/v1/models/{VAE}/interpolate", {"seed_a": 1, "seed_b": 2, "steps": 65}, 422, "invalid_request"),
    ("post", f"/v1/models/{CVAE}/interpolate", {"seed_a": 1, "seed_b": 2}, 422, "invalid_labels"),
])
def test_bad_input_gets_its_status_and_a_json_error(server, method, path, body, status, error):
    r = server.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["detail"]


def test_a_label_refusal_names_the_field_the_request_has(server):
    path = f"/v1/models/{CVAE}/interpolate"
    missing = server.post(path, json={"seed_a": 1, "seed_b": 2}).json()
    assert missing["detail"].endswith("class-conditional: label is required")
    beyond = server.post(path, json={"seed_a": 1, "seed_b": 2, "label": 10}).json()
    assert beyond["detail"] == "label must lie in [0, 10), got 10"
    samples = server.post(f"/v1/models/{CVAE}/samples", json={"n": 3, "labels": [1, 2]}).json()
    assert samples["detail"] == "labels must be one int or 3 ints, got shape (2,)"
    grid = server.get(f"/v1/models/{CVAE}/grid.png?label=10")
    assert (grid.status_code, grid.json()["detail"]) == (422, "label must lie in [0, 10), got 10")
    unconditional = server.get(f"/v1/models/{VAE}/grid.png?label=1").json()
    assert unconditional["detail"].endswith("unconditional: it takes no label")


def test_non_json_400_and_oversized_body_413(server):
    path = f"/v1/models/{VAE}/samples"
    broken = server.post(path, content=b'{"n": 1', headers={"content-type": "application/json"})
    assert (broken.status_code, broken.json()["error"]) == (400, "invalid_json")
    text = server.post(path, content=b"n=1", headers={"content-type": "text/plain"})
    assert (text.status_code, text.json()["error"]) == (400, "invalid_json")
    big = server.post(path, json={"n": 1, "labels": [0] * 5000})  # over the test's 4096-byte limit
    assert (big.status_code, big.json()["error"]) == (413, "payload_too_large")


def _metric(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none yet)."""
    text = httpx.get(metrics_url, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _settled(read, timeout: float = 30.0) -> float:
    """A metric's value once two reads a report interval apart agree (earlier traffic has landed)."""
    deadline, last = time.monotonic() + timeout, read()
    while time.monotonic() < deadline:
        time.sleep(1.2)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"metric still moving after {timeout} s: {last}")


def test_prometheus_metrics_and_request_logs_name_model_version_and_n(server):
    from ray._private.worker import global_worker

    images = lambda: _metric(server.metrics_url, "ray_genmodels_images_total", model=CVAE, version="1")  # noqa: E731
    not_found = lambda: _metric(server.metrics_url, "ray_genmodels_http_requests_total",  # noqa: E731
                                route="/v1/models/{name}/samples", status="404")
    images_before, not_found_before = _settled(images), _settled(not_found)
    for seed in range(3):
        _samples(server, CVAE, n=5, seed=seed)
    assert server.post("/v1/models/nope/samples", json={"n": 1}).status_code == 404

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (images() < images_before + 15 or not_found() < not_found_before + 1):
        time.sleep(0.5)
    assert images() == images_before + 15
    assert not_found() == not_found_before + 1
    assert _metric(server.metrics_url, "ray_genmodels_http_request_latency_ms_count",
                   route="/v1/models/{name}/samples", status="200") >= 3
    assert _metric(server.metrics_url, "ray_serve_num_http_requests_total") > 0  # Serve's own, same endpoint

    # The ingress replica's log file has one line per request with model, version and n.
    logs = Path(global_worker.node.get_session_dir_path()) / "logs" / "serve"
    deadline, lines = time.monotonic() + 10, []
    while time.monotonic() < deadline and len(lines) < 3:
        lines = [line for f in logs.glob("replica_genmodels_Api_*.log") for line in f.read_text().splitlines()
                 if "route=/v1/models/{name}/samples status=200" in line and f"model={CVAE} version=1 n=5" in line]
        time.sleep(0.5)
    assert len(lines) >= 3


def test_config_yaml_is_a_valid_serve_config_for_build_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import DEFAULTS, resolve_args

    config = ServeDeploySchema.model_validate(yaml.safe_load(Path("serving/config.yaml").read_text()))
    (app,) = config.applications
    assert (app.import_path, app.route_prefix) == ("serving.app:build_app", "/")
    deployments = {d.name: d for d in app.deployments}
    assert app.args["sample_in_ingress"] is False  # the nodes do not set HAProxy: a Sampler deployment
    assert set(deployments) == {"Sampler", "Api", "Jobs"}
    assert deployments["Sampler"].max_ongoing_requests >= 4 * app.args["max_batch_size"]
    assert deployments["Sampler"].autoscaling_config["max_replicas"] > 1
    assert set(app.args) <= set(DEFAULTS)
    assert resolve_args(app.args)["models"] is None
    with pytest.raises(ValueError, match="unknown serving args"):
        resolve_args({"max_batchsize": 3})
    with pytest.raises(ValueError, match="reload_interval_s"):
        resolve_args({"reload_interval_s": 0})  # the reload thread would poll the registry without a pause


# --- auth, then hot reload under auth (each redeploy costs seconds: keep these last) -------------------
# Redeployed with the ingress replicas sampling (sample_in_ingress=True, what `genmodels serve
# --haproxy` runs): the tests above ran a Sampler deployment (the default behind Serve's proxy),
# these run the other topology.
def test_api_key_guards_v1_but_not_healthz(server, trained):
    assert serve_deployments() == {"Api", "Sampler", "Jobs"}
    _deploy(trained, api_key=KEY, sample_in_ingress=True)
    assert serve_deployments() == {"Api", "Jobs"}
    assert server.get("/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = server.get("/v1/models", headers=headers)
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
        assert server.post(f"/v1/models/{VAE}/samples", json={"n": 1}, headers=headers).status_code == 401
    ok = server.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and len(ok.json()) == 2


def test_hot_reload_switches_version_without_failing_requests(server, trained, local):
    auth = {"Authorization": f"Bearer {KEY}"}
    v1_images = _samples(server, headers=auth, n=4, seed=21, format="array")["images"]
    seen: list[tuple[int, str]] = []
    failures: list[str] = []

    def loop():
        deadline = time.monotonic() + 60
        after_switch = 0
        while time.monotonic() < deadline and after_switch < 5:
            r = server.post(f"/v1/models/{VAE}/samples", json={"n": 4, "seed": 21, "format": "array"}, headers=auth)
            if r.status_code != 200:
                failures.append(r.text)
                continue
            body = r.json()
            seen.append((r.status_code, body["version"]))
            if body["version"] == "1":
                if body["images"] != v1_images:  # an assert here would only end the thread
                    failures.append("v1 answered with other images")
            else:
                after_switch += 1

    worker = threading.Thread(target=loop)
    worker.start()
    time.sleep(0.5)
    assert trained["register"]("vae2", "vae", 45.0) == "2"
    trained["champion"](VAE, "2")
    worker.join()
    assert failures == []
    versions = [v for _, v in seen]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions)  # one replica: once switched, never back
    models = {m["name"]: m for m in server.get("/v1/models", headers=auth).json()}
    assert (models[VAE]["version"], models[VAE]["metrics"]) == ("2", {"nll_nats": 45.0})
    v2 = registry.load_sampler(VAE).sampler
    now = _samples(server, headers=auth, n=4, seed=21, format="array")
    assert now["version"] == "2"
    assert np.array_equal(np.asarray(now["images"], np.float32), v2.sample(4, seed=21))


def test_unpinned_models_include_those_promoted_later_and_pinned_ones_do_not(trained, monkeypatch):
    from genmodels import registry
    from serving.models import ModelSet

    unpinned = ModelSet(None, "champion", trained["tracking_uri"])
    pinned = ModelSet([VAE], "champion", trained["tracking_uri"])
    try:
        assert {VAE, CVAE} <= set(unpinned.names)
        from mlflow import MlflowClient

        search = MlflowClient.search_registered_models

        def one_a_page(client, *args, max_results=None, **kwargs):  # a registry that answers 1 model a search
            return search(client, *args, max_results=1, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(MlflowClient, "search_registered_models", one_a_page)
            assert registry.served_models() == unpinned.names
        assert "later-vae" not in unpinned.names
        assert unpinned.poll_once() == []  # nothing moved yet
        version = trained["register"]("vae1", "vae", 48.0, dataset="later")
        assert unpinned.poll_once() == []  # registered, but no champion yet: not served
        trained["champion"]("later-vae", version)
        assert unpinned.poll_once() == ["later-vae"]
        assert "later-vae" in unpinned.names and unpinned.get("later-vae").version == version
        assert pinned.poll_once() == [] and pinned.names == [VAE]
    finally:
        unpinned.close()
        pinned.close()
