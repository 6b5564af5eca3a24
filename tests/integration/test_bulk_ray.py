"""Bulk generation on real components: a local Ray cluster (2 actors) writing to S3 over HTTP
(moto), and `genmodels generate` through the Prefect flow on a model registered in MLflow."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from registry_fixtures import registry_env
from s3_objects import s3_objects

from genmodels import bulk
from genmodels.export import export_sampler
from genmodels.models import build_model
from genmodels.models.base import ImageSpec

pytestmark = pytest.mark.slow

IMAGE = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    torch.manual_seed(0)
    model = build_model("vae", IMAGE, latent_dim=3, hidden=(16,)).eval()
    directory = tmp_path_factory.mktemp("vae")
    paths = export_sampler(model, directory, likelihood=False)
    return directory, {p.name: p.read_bytes() for p in paths}


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """Started after the S3 fixture so that Ray's workers inherit its AWS_* environment."""
    from genmodels.ray_runtime import ensure_ray, stop_ray

    ensure_ray(num_cpus=2)
    yield
    stop_ray()


def _decode_all(objects: dict[str, bytes], manifest: dict) -> dict[str, np.ndarray]:
    parts = [bulk.decode_shard(objects[r["key"]], "npz") for r in manifest["shards"]]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


def test_two_actors_write_to_s3_what_one_process_writes_and_a_cancel_resumes(graphs, ray_cluster, s3_bucket,
                                                                           tmp_path):
    _, files = graphs
    n, size = 150, 20
    spec = bulk.JobSpec(model="digits-vae", version="1", n=n, output=f"{s3_bucket}/run1", seed=9, shard_size=size)
    progress = []
    manifest = bulk.run_job(spec, files, workers=2, use_ray=True, on_progress=lambda d, t: progress.append(d))
    assert progress[0] == 0 and progress[-1] == n and len(progress) == 1 + 8

    objects = s3_objects(spec.output)
    assert json.loads(objects["manifest.json"]) == manifest
    assert sorted(objects) == sorted(["job.json", "manifest.json"] + [f"shards/shard-{k:05d}.npz" for k in range(8)]
                                     + [f"sidecars/shard-{k:05d}.json" for k in range(8)])
    for record in manifest["shards"]:
        assert hashlib.sha256(objects[record["key"]]).hexdigest() == record["sha256"]
    bulk.verify(spec.output)

    # One worker, in-process, other shard size: the same image for every index.
    local = tmp_path / "local"
    bulk.run_job(bulk.JobSpec(**{**spec.to_dict(), "output": local.as_uri(), "shard_size": 64}), files, use_ray=False)
    on_ray = _decode_all(objects, manifest)
    in_process = {k: np.concatenate(v) for k, v in zip(
        ("images", "index"), zip(*[(s["images"], s["index"]) for s in
                                   (bulk.read_shard(local.as_uri(), k) for k in range(3))]))}
    assert on_ray["index"].tolist() == list(range(n))
    assert np.array_equal(on_ray["images"], in_process["images"])

    # Cancelled on Ray after 3 shards, then resumed on Ray: the uninterrupted job's bytes.
    cut = bulk.JobSpec(**{**spec.to_dict(), "output": f"{s3_bucket}/run2"})
    seen = []
    with pytest.raises(bulk.JobCancelled):
        bulk.run_job(cut, files, workers=2, use_ray=True, on_progress=lambda d, t: seen.append(d),
                     should_stop=lambda: len(seen) > 3)
    partial = s3_objects(cut.output)
    assert "manifest.json" not in partial and 3 <= sum(k.endswith(".npz") for k in partial) < 8
    resumed = bulk.run_job(cut, files, workers=2, use_ray=True)
    again = s3_objects(cut.output)
    assert {k: v for k, v in again.items() if k.startswith(("shards/", "sidecars/"))} == \
           {k: v for k, v in objects.items() if k.startswith(("shards/", "sidecars/"))}
    assert resumed["shards"] == manifest["shards"]
    assert sorted(_decode_all(again, resumed)["index"].tolist()) == list(range(n))


def test_ray_data_reads_a_parquet_job_folder_every_row_once(graphs, ray_cluster, tmp_path):
    import ray.data

    _, files = graphs
    spec = bulk.JobSpec(model="digits-vae", version="1", n=70, output=(tmp_path / "pq").as_uri(), seed=5,
                        shard_size=16, format="parquet")
    bulk.run_job(spec, files, use_ray=False)
    npz = bulk.JobSpec(**{**spec.to_dict(), "output": (tmp_path / "npz").as_uri(), "format": "npz"})
    bulk.run_job(npz, files, use_ray=False)
    want = {}
    for k in range(npz.num_shards):
        shard = bulk.read_shard(npz.output, k)
        want.update(zip(shard["index"].tolist(), shard["images"]))

    rows = ray.data.read_parquet(str(tmp_path / "pq" / bulk.SHARDS_DIR)).take_all()
    assert sorted(r["index"] for r in rows) == list(range(70))
    assert all(np.array_equal(bulk.shards.png_array(r["image"]), want[r["index"]]) for r in rows)
    assert {(r["height"], r["width"], r["channels"]) for r in rows} == {(8, 8, 1)}
    assert all(r["label"] is None for r in rows)


def test_cli_generate_end_to_end_on_a_registered_model(graphs, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness
    from typer.testing import CliRunner

    from genmodels import registry
    from genmodels.cli import app

    directory, _ = graphs
    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path / "work"))
    out = (tmp_path / "generated").as_uri()
    args = ["generate", "--model", "digits-vae", "--n", "40", "--out", out, "--shard-size", "16", "--seed", "2",
            "--no-ray"]
    with registry_env(tmp_path), prefect_test_harness(server_startup_timeout=120):
        checkpoint = io.BytesIO()
        torch.save({"stand-in": torch.zeros(1)}, checkpoint)
        reg = registry.register(dataset="digits", family="vae", preset="quick", checkpoint=checkpoint.getvalue(),
                                onnx_files=sorted(directory.glob("*.onnx")), metrics={"nll_nats": 30.0}, params={},
                                snapshot_hash="0" * 64, artifact_root=(tmp_path / "mlflow").as_uri())
        registry.promote(reg.name, reg.version)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        manifest = bulk.verify(out)
        assert manifest["model"]["version"] == reg.version and manifest["totals"]["samples"] == 40
        assert "40 samples of digits-vae" in result.output
        # Bad input: exit code 2 and the field named, before anything starts.
        bad = CliRunner().invoke(app, ["generate", "--model", "digits-vae", "--n", "0", "--out", out])
        assert bad.exit_code == 2 and "n must be in [1, 100_000_000]" in bad.output
        other = CliRunner().invoke(app, [*args[:-2], "3", "--no-ray"])  # same output, another seed
        assert other.exit_code == 2 and "holds another job" in other.output

    # Both runs are recorded as the serving API records its jobs (same id for the same spec):
    # `genmodels status` and GET /v1/jobs list them.
    from genmodels import records
    from genmodels.config import get_settings

    jobs = {j["job_id"]: j for j in records.list_jobs(get_settings().storage_url)}
    ok = jobs[bulk.job_id(bulk.JobSpec.from_dict(manifest["spec"]))]
    assert (ok["status"], ok["done"], ok["total"], ok["result"]["totals"]) == ("succeeded", 40, 40, manifest["totals"])
    assert sorted(j["status"] for j in jobs.values()) == ["failed", "succeeded"]
    assert "holds another job" in next(j for j in jobs.values() if j["status"] == "failed")["error"]
    status = CliRunner().invoke(app, ["status", "--json"])
    assert json.loads(status.stdout)["job_counts"] == {"failed": 1, "succeeded": 1}, status.output


def _take_every_cpu():
    """A placed group holding every CPU of the test cluster (as Serve replicas or another job's
    writers would): the caller removes it."""
    import ray
    from ray.util.placement_group import placement_group

    hog = placement_group([{"CPU": 1}] * int(ray.cluster_resources()["CPU"]))
    assert hog.wait(timeout_seconds=30)
    return hog


def test_writers_wait_for_a_cpu_freed_within_the_placement_timeout(ray_cluster):
    """A job submitted as another ends finds its CPU still taken for a moment: the writers wait for
    it (up to PLACEMENT_TIMEOUT_S), not fall back to writing in-process at once."""
    import threading

    import ray
    from ray.util.placement_group import remove_placement_group

    from genmodels.bulk.on_ray import PLACEMENT_TIMEOUT_S, _place_writers

    hog = _take_every_cpu()
    threading.Timer(1.5, remove_placement_group, args=(hog,)).start()
    started = time.monotonic()
    group, count = _place_writers(ray, 1, None)
    took = time.monotonic() - started
    try:
        assert count == 1 and group is not None, f"no writer after {took:.2f} s"
        assert 1.4 <= took < PLACEMENT_TIMEOUT_S, took
    finally:
        if group is not None:
            remove_placement_group(group)


def test_a_cancelled_job_stops_waiting_for_writers_within_a_poll(ray_cluster):
    import ray
    from ray.util.placement_group import remove_placement_group

    from genmodels.bulk.on_ray import _POLL_S, _place_writers

    hog = _take_every_cpu()
    try:
        started = time.monotonic()
        cancel_at = started + 1.0
        assert _place_writers(ray, 2, lambda: time.monotonic() >= cancel_at) == (None, 0)
        assert 1.0 <= time.monotonic() - started < 1.0 + 3 * _POLL_S
    finally:
        remove_placement_group(hog)


def test_a_cluster_with_no_free_cpu_gets_the_job_written_in_process_not_hung(graphs, ray_cluster, tmp_path):
    """Every CPU taken (as by Serve replicas): asking for writer actors would wait forever."""
    from ray.util.placement_group import remove_placement_group

    _, files = graphs
    hog = _take_every_cpu()
    try:
        events = []
        spec = bulk.JobSpec(model="digits-vae", version="1", n=60, output=(tmp_path / "o").as_uri(), seed=9,
                            shard_size=20)
        manifest = bulk.run_job(spec, files, workers=2, use_ray=True, on_event=lambda e, d: events.append((e, d)))
    finally:
        remove_placement_group(hog)
    assert events == [("writers", {"count": 0, "wanted": 2})]
    assert manifest["totals"]["samples"] == 60
    bulk.run_job(bulk.JobSpec(**{**spec.to_dict(), "output": (tmp_path / "ref").as_uri()}), files, use_ray=False)
    assert [r["sha256"] for r in manifest["shards"]] == [r["sha256"] for r in bulk.read_manifest(
        (tmp_path / "ref").as_uri())["shards"]]
