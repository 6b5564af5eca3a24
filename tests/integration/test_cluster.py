"""The scaled-out setup on one machine: a real two-node Ray cluster (``ray start --head`` and
``ray start --address``), an MLflow tracking server and S3 over HTTP (moto), all on this host.

``genmodels retrain`` runs as users run it, in a subprocess with ``RAY_ADDRESS`` pointing at the
cluster, from a driver work directory that is deleted afterwards; then the Serve application is
deployed on the same cluster and answers from what the registry and S3 hold. One cheap family
(the mixture, EM on 8x8 digits) on two Train workers of one CPU each: one per node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster_fixtures import mlflow_server, ray_cluster
from serving_fixtures import free_port

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

FAMILY = "mixture"
MODEL = f"digits-{FAMILY}"
BUCKET = "genmodels-cluster"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_endpoint):
    """MLflow server + two-node Ray cluster; the test process is a driver connected to it."""
    import boto3
    import mlflow

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    # os.environ carries the session's AWS_* settings (s3_endpoint): the cluster's processes and
    # the MLflow server get them as a deployment's Secret would give them.
    from serving.app import SERVE_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "GENMODELS_"))}
    db_dir = tmp_path_factory.mktemp("mlflow-db")
    with mlflow_server(db_dir, f"s3://{BUCKET}/mlflow-default", env) as tracking_uri, \
            ray_cluster({**env, **SERVE_ENV}, num_nodes=2, cpus_per_node=1) as cluster, pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            deadline = time.monotonic() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                assert time.monotonic() < deadline, f"worker node never joined: {ray.nodes()}"
                time.sleep(0.5)
            yield {"env": env, "tracking_uri": tracking_uri, "ray_address": cluster.address,
                   "storage": f"s3://{BUCKET}/store"}
        finally:
            ray.shutdown()
            # registry.configure pinned the (now stopped) server globally: later modules must not inherit it.
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def retrained(stack, tmp_path_factory):
    """``genmodels retrain`` against the cluster from a scratch work dir, deleted once it is done."""
    work = tmp_path_factory.mktemp("driver")
    env = {**stack["env"], "RAY_ADDRESS": stack["ray_address"], "RAY_AUTH_MODE": "disabled",
           "MLFLOW_TRACKING_URI": stack["tracking_uri"], "GENMODELS_STORAGE": stack["storage"],
           "GENMODELS_WORK_DIR": str(work / ".genmodels"), "PREFECT_HOME": str(work / "prefect")}
    cmd = [str(Path(sys.executable).parent / "genmodels"), "retrain", "--family", FAMILY, "--dataset", "digits",
           "--preset", "quick", "--workers", "2", "--epochs", "1", "--max-train-examples", "256"]
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"retrain failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    # What the run left on the driver's disk: Prefect's own local state, and nothing else.
    left = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()
                  and not p.is_relative_to(work / "prefect"))
    shutil.rmtree(work)
    return {"left_on_driver": left}


def test_retrain_left_nothing_on_the_driver_and_registered_the_champion(stack, retrained):
    from mlflow import MlflowClient

    assert retrained["left_on_driver"] == []
    client = MlflowClient(stack["tracking_uri"])
    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert str(mv.version) == "1"
    run = client.get_run(mv.run_id)
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/store/mlflow/digits/")
    assert json.loads(run.data.params["train.epochs"]) == 1
    assert {"model.pt", "metrics.json", "onnx"} <= {a.path for a in client.list_artifacts(mv.run_id)}


def test_everything_the_run_made_is_on_s3(stack, retrained):
    import boto3

    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.startswith("store/snapshots/digits/") and k.endswith("manifest.json") for k in keys)
    assert {f"store/runs/digits/{FAMILY}-quick/{name}" for name in ("model.pt", "history.json", "metrics.json")} \
        <= set(keys)
    # Ray Train's checkpoints went to the bucket, not to a node's disk.
    assert any(k.startswith(f"store/ray/digits/{FAMILY}-quick-") and k.endswith("/checkpoint.pt") for k in keys)
    assert any(k.startswith(f"store/runs/digits/{FAMILY}-quick/onnx/") and k.endswith(".onnx") for k in keys)


def test_training_used_both_nodes(stack, retrained):
    from ray.util.state import list_actors

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    # Loopback only: the joins never depend on the host's own external address being reachable.
    assert sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]) == ["127.0.0.2", "127.0.0.3"]
    workers = list_actors(address=stack["ray_address"], filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, raise_on_missing_output=False)
    # One Train run of two workers (no restart): one worker per node, one CPU each.
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == alive


def test_serve_on_the_cluster_answers_from_the_registry(stack, retrained, tmp_path):
    """`genmodels serve` as users run it, from a fresh work dir: a driver joining the cluster."""
    import httpx

    from genmodels import registry

    registry.configure(stack["tracking_uri"], "sqlite:///must-not-be-used.db")
    want = registry.load_sampler(MODEL).sampler.sample(3, seed=5, temperature=1.0)
    port = free_port()
    env = {**stack["env"], "RAY_ADDRESS": stack["ray_address"], "RAY_AUTH_MODE": "disabled",
           "MLFLOW_TRACKING_URI": stack["tracking_uri"], "GENMODELS_STORAGE": stack["storage"],
           "GENMODELS_WORK_DIR": str(tmp_path / ".genmodels")}
    # HeadOnly: both nodes run on this host and a proxy binds --host, so a proxy per node would fight over the port.
    cmd = [str(Path(sys.executable).parent / "genmodels"), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--proxy-location", "HeadOnly", "--reload-interval", "60"]
    server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, f"genmodels serve exited:\n{server.stdout.read()[-4000:]}"
                assert time.monotonic() < deadline, "genmodels serve did not answer /healthz in 180 s"
                try:
                    r = http.get("/healthz")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            assert r.json() == {"status": "ok"}
            models = http.get("/v1/models").json()
            assert [(m["name"], m["family"], m["version"], m["image_shape"]) for m in models] == \
                [(MODEL, FAMILY, "1", [1, 8, 8])]
            r = http.post(f"/v1/models/{MODEL}/samples", json={"n": 3, "seed": 5, "format": "array"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["model"], body["version"], body["seed"]) == (MODEL, "1", 5)
            assert np.array_equal(np.asarray(body["images"], dtype=np.float32), want)
            png = http.post(f"/v1/models/{MODEL}/samples", json={"n": 2, "seed": 5}).json()
            assert len(png["images"]) == 2 and all(isinstance(i, str) and i for i in png["images"])
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: the command shuts Serve down on its way out
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
