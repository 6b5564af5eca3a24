"""Bulk jobs through the serving API (``/v1/jobs``) on real Ray Serve over HTTP, real MLflow
(sqlite in a temp dir) and S3 over HTTP (moto on 127.0.0.1).

An untrained tiny VAE and CVAE on 8x8 binary images are exported and registered as champions:
what the images look like does not matter here, only that every byte is accounted for.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import time
import uuid

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from s3_objects import s3_objects

from genmodels import bulk, registry

VAE, CVAE = "jobs-vae", "jobs-cvae"
KEY = "jobs-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Slow enough (png encoding, 20 shards over 2 actors) that a cancel lands mid-way.
BIG = {"model": VAE, "n": 10_000, "seed": 3, "shard_size": 500, "format": "png"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, s3_endpoint):
    import torch

    from genmodels.export import export_sampler
    from genmodels.models import build_model
    from genmodels.models.base import ImageSpec

    root = tmp_path_factory.mktemp("jobs")
    image = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("GENMODELS_GIT_COMMIT", "0123456789abcdef")
        mp.delenv("GENMODELS_API_KEY", raising=False)
        registry.configure(None, "sqlite:///must-not-be-used.db")
        for family in ("vae", "cvae"):
            torch.manual_seed(0)
            model = build_model(family, image, latent_dim=3, hidden=(16,)).eval()
            paths = export_sampler(model, root / family, likelihood=False)
            checkpoint = io.BytesIO()
            torch.save({"family": family, "weights": model.state_dict()}, checkpoint)
            reg = registry.register(dataset="jobs", family=family, preset="quick", checkpoint=checkpoint.getvalue(),
                                    onnx_files=paths, metrics={"nll_nats": 30.0}, params={}, snapshot_hash="0" * 64,
                                    artifact_root=(root / "mlflow").as_uri())
            registry.promote(reg.name, reg.version)
        yield {"root": root, "tracking_uri": f"sqlite:///{root}/mlflow.db"}


@pytest.fixture(scope="module")
def server(registered, s3_endpoint):
    """Ray started after the S3 fixture, so the Jobs replica and its actors inherit AWS_*."""
    from ray import serve

    from genmodels.distributed import ensure_ray
    from serving.app import build_app

    ensure_ray(num_cpus=4)  # Sampler 1 + a job's 2 shard writers
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"models": [VAE, CVAE], "tracking_uri": registered["tracking_uri"], "api_key": KEY,
                             "reload_interval_s": 60, "job_workers": 2}), name="genmodels-jobs", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=AUTH) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    import boto3

    name = f"genmodels-jobs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _submit(server, **body) -> str:
    r = server.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _wait(server, jid: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = server.get(f"/v1/jobs/{jid}")
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("queued", "running"):
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"job {jid} still running after {timeout} s")


@pytest.fixture(scope="module")
def reference(server, bucket):
    """The uninterrupted job on S3: its final status and every object read back with boto3."""
    output = f"s3://{bucket}/reference"
    status = _wait(server, _submit(server, **BIG, output=output))
    return status, s3_objects(output)


def test_a_job_to_s3_writes_shards_whose_checksums_match_its_manifest(reference):
    status, objects = reference
    assert (status["status"], status["done"], status["total"], status["version"]) == ("succeeded", 10_000, 10_000, "1")
    manifest = status["manifest"]
    assert json.loads(objects["manifest.json"]) == manifest
    assert manifest["totals"] == {"samples": 10_000, "shards": 20, "bytes": sum(r["bytes"] for r in manifest["shards"])}
    assert sorted(objects) == sorted(["job.json", "manifest.json"] + [f"shards/shard-{k:05d}.{e}" for k in range(20)
                                                                       for e in ("tar", "json")])
    for record in manifest["shards"]:
        assert hashlib.sha256(objects[record["key"]]).hexdigest() == record["sha256"]
        assert len(objects[record["key"]]) == record["bytes"]
    indices = np.concatenate([bulk.decode_shard(objects[r["key"]], "png")["index"] for r in manifest["shards"]])
    assert indices.tolist() == list(range(10_000))


def test_cancelled_then_resubmitted_job_ends_with_the_uninterrupted_bytes(server, bucket, reference):
    _, expected = reference
    output = f"s3://{bucket}/interrupted"
    jid = _submit(server, **BIG, output=output)
    deadline = time.monotonic() + 60
    while server.get(f"/v1/jobs/{jid}").json()["done"] == 0:  # cancel once the first shard is in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Two live jobs on one prefix would interleave their shards: the second is refused.
    r = server.post("/v1/jobs", json={**BIG, "seed": 4, "output": output})
    assert (r.status_code, r.json()["error"]) == (409, "output_in_use"), r.text
    r = server.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
    cut = _wait(server, jid)
    assert cut["status"] == "cancelled" and 0 < cut["done"] < 10_000 and "manifest" not in cut, cut
    partial = s3_objects(output)
    assert "manifest.json" not in partial and 1 <= sum(k.endswith(".tar") for k in partial) < 20

    assert _submit(server, **BIG, output=output) == jid  # same spec, same job: resumed
    resumed = _wait(server, jid)
    assert (resumed["status"], resumed["done"], resumed["cancel_requested"]) == ("succeeded", 10_000, False)
    objects = s3_objects(output)
    assert {k: v for k, v in objects.items() if k.startswith("shards/")} == \
           {k: v for k, v in expected.items() if k.startswith("shards/")}
    assert resumed["manifest"]["shards"] == reference[0]["manifest"]["shards"]
    bulk.verify(output)


def test_resubmitting_a_finished_job_verifies_it_and_rewrites_nothing_and_another_spec_fails_there(server, bucket, reference):
    import boto3

    status, _ = reference
    output = f"s3://{bucket}/reference"
    before = {o["Key"]: o["LastModified"] for o in
              boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="reference/")["Contents"]}
    jid = _submit(server, **BIG, output=output)
    assert jid == status["job_id"]
    again = _wait(server, jid)
    assert again["status"] == "succeeded" and again["manifest"] == status["manifest"]
    after = {o["Key"]: o["LastModified"] for o in
             boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="reference/")["Contents"]}
    assert after == before
    # Another spec on that output (a seed apart) fails before writing anything, saying what differs.
    other = _wait(server, _submit(server, **{**BIG, "seed": 4}, output=output))
    assert other["status"] == "failed" and "holds another job" in other["error"] and "seed" in other["error"]
    assert s3_objects(output) == reference[1]


def test_conditional_job_to_a_file_url_cycles_its_labels(server, tmp_path):
    output = (tmp_path / "cvae").as_uri()
    # One shard: run_job writes it in the Jobs replica itself (no actors to start).
    status = _wait(server, _submit(server, model=CVAE, n=25, seed=1, labels=[2, 0, 1], shard_size=25,
                                   output=output))
    assert status["status"] == "succeeded", status
    manifest = bulk.verify(output)
    assert manifest["model"]["conditional"] and manifest["totals"]["samples"] == 25
    labels = bulk.read_shard(output, 0)["labels"]
    assert labels.tolist() == [[2, 0, 1][i % 3] for i in range(25)]


@pytest.mark.parametrize("body, status, error, field", [
    ({"model": "nope", "n": 5, "seed": 0, "output": "file:///tmp/x"}, 404, "model_not_found", None),
    ({"model": VAE, "n": 0, "seed": 0, "output": "file:///tmp/x"}, 422, "invalid_request", "n"),
    ({"model": VAE, "n": 100_000_001, "seed": 0, "output": "file:///tmp/x"}, 422, "invalid_request", "n"),
    ({"model": VAE, "n": 5, "seed": -1, "output": "file:///tmp/x"}, 422, "invalid_request", "seed"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "http://host/x"}, 422, "invalid_request", "output"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "file:relative"}, 422, "invalid_request", "output"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "s3:///no-bucket"}, 422, "invalid_request", "output"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "file:///tmp/x", "format": "jpg"}, 422, "invalid_request", "format"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "file:///tmp/x", "shard_size": 0}, 422, "invalid_request",
     "shard_size"),
    ({"model": VAE, "n": 100_000_000, "seed": 0, "output": "file:///tmp/x", "shard_size": 10}, 422,
     "invalid_request", "shard_size"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "file:///tmp/x", "labels": 1}, 422, "invalid_request", "labels"),
    ({"model": CVAE, "n": 5, "seed": 0, "output": "file:///tmp/x"}, 422, "invalid_request", "labels"),
    ({"model": CVAE, "n": 5, "seed": 0, "output": "file:///tmp/x", "labels": [0, 3]}, 422, "invalid_request",
     "labels"),
    ({"model": VAE, "n": 5, "seed": 0, "output": "file:///tmp/x", "nn": 1}, 422, "invalid_request", "nn"),
    ({"model": VAE, "n": 5, "output": "file:///tmp/x"}, 422, "invalid_request", "seed"),
])
def test_bad_input_gets_its_status_naming_the_field(server, body, status, error, field):
    r = server.post("/v1/jobs", json=body)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    if field is not None:
        assert field in {e["loc"][-1] for e in r.json()["detail"]}, r.text


def test_unknown_job_404_and_auth_like_every_v1_route(server):
    for method in ("get", "delete"):
        r = getattr(server, method)("/v1/jobs/0123abcd")
        assert (r.status_code, r.json()["error"]) == (404, "job_not_found")
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        r = server.post("/v1/jobs", json={**BIG, "output": "file:///tmp/never"}, headers=headers)
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
        assert server.get("/v1/jobs/0123abcd", headers=headers).status_code == 401
    assert "/v1/jobs" in server.get("/openapi.json").json()["paths"]
