"""Bulk jobs through the serving API (``/v1/jobs``) on real Ray Serve over HTTP, real MLflow
(sqlite in a temp dir) and S3 over HTTP (moto on 127.0.0.1).

An untrained tiny VAE and CVAE on 8x8 binary images are exported and registered as champions:
what the images look like does not matter here, only that every byte is accounted for.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from registry_fixtures import register_untrained_champion, registry_env
from s3_objects import s3_objects

from genmodels import bulk, registry

VAE, CVAE = "jobs-vae", "jobs-cvae"
KEY = "jobs-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Slow enough (png encoding, 20 shards over 2 actors) that a cancel lands mid-way.
BIG = {"model": VAE, "n": 10_000, "seed": 3, "shard_size": 500, "format": "png"}
BUCKET = f"genmodels-jobs-{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, s3_endpoint):
    from genmodels.models.base import ImageSpec

    root = tmp_path_factory.mktemp("jobs")
    image = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3)
    with registry_env(root) as tracking_uri, pytest.MonkeyPatch.context() as mp:
        # The Jobs replica (started later, inheriting this) records its jobs here.
        mp.setenv("GENMODELS_STORAGE", (root / "store").as_uri())
        # The outputs these tests write: the test bucket and pytest's temporary directories.
        roots = [f"s3://{BUCKET}/", tmp_path_factory.getbasetemp().as_uri() + "/"]
        mp.setenv("GENMODELS_JOB_OUTPUT_ROOTS", ",".join(roots))
        for family in ("vae", "cvae"):
            register_untrained_champion(root, "jobs", family, image, latent_dim=3, hidden=(16,))
        yield {"root": root, "tracking_uri": tracking_uri, "store": root / "store", "roots": roots}


@pytest.fixture(scope="module")
def server(registered, s3_endpoint):
    """Ray started after the S3 fixture, so the Jobs replica and its actors inherit AWS_*."""
    from ray import serve

    from genmodels.ray_runtime import ensure_ray, stop_ray
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
        stop_ray()


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return BUCKET


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
    assert sorted(objects) == sorted(["job.json", "manifest.json"] + [f"shards/shard-{k:05d}.tar" for k in range(20)]
                                     + [f"sidecars/shard-{k:05d}.json" for k in range(20)])
    for record in manifest["shards"]:
        assert hashlib.sha256(objects[record["key"]]).hexdigest() == record["sha256"]
        assert len(objects[record["key"]]) == record["bytes"]
    indices = np.concatenate([bulk.decode_shard(objects[r["key"]], "png")["index"] for r in manifest["shards"]])
    assert indices.tolist() == list(range(10_000))


def test_the_served_jobs_are_recorded_and_listed(server, registered, reference):
    status, _ = reference
    record = json.loads((registered["store"] / "jobs" / f"{status['job_id']}.json").read_text())
    assert (record["status"], record["done"], record["result"]["totals"]) == ("succeeded", 10_000,
                                                                              status["manifest"]["totals"])
    r = server.get("/v1/jobs", params={"status": "succeeded"})
    assert r.status_code == 200, r.text
    assert status["job_id"] in [j["job_id"] for j in r.json()]


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
    assert {k: v for k, v in objects.items() if k.startswith(("shards/", "sidecars/"))} == \
           {k: v for k, v in expected.items() if k.startswith(("shards/", "sidecars/"))}
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


# --- job records: persistence across restarts, listing (JobManager in-process, no Serve) ---------
SMALL = {"model": VAE, "n": 40, "seed": 5, "shard_size": 16}


def _refused(call, *args):
    """The refusal (:class:`serving.errors.RequestError`) a JobManager call raises."""
    from serving.errors import RequestError

    with pytest.raises(RequestError) as refusal:
        call(*args)
    return refusal.value


def _manager(registered, storage, **kw):
    from serving.jobs import JobManager

    kw.setdefault("output_roots", registered["roots"])
    return JobManager(None, "champion", registered["tracking_uri"], workers=1, use_ray=False, storage=storage, **kw)


def _record(storage_root, jid) -> dict:
    return json.loads((storage_root / "jobs" / f"{jid}.json").read_text())


def test_a_new_manager_over_the_same_storage_answers_for_a_finished_job(registered, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    first = _manager(registered, store.as_uri())
    jid = first.submit({**SMALL, "output": out.as_uri()})["job_id"]
    done = first.wait(jid, timeout=60)
    assert done["status"] == "succeeded", done
    record = _record(store, jid)
    assert (record["status"], record["done"], record["total"], record["owner"]) == ("succeeded", 40, 40, first.owner)
    assert record["spec"]["seed"] == 5 and record["result"] == {"manifest": f"{out.as_uri()}/manifest.json",
                                                               "totals": done["manifest"]["totals"]}
    assert "manifest" not in record  # shard lists stay in the output's manifest.json

    restarted = _manager(registered, store.as_uri())  # what a replica restart leaves: storage only
    again = restarted.get(jid)
    assert again == done
    assert [j["job_id"] for j in restarted.list()] == [jid]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert restarted.submit({**SMALL, "output": out.as_uri()})["job_id"] == jid  # re-run: verifies, writes nothing
    assert restarted.wait(jid, timeout=60)["status"] == "succeeded"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert _record(store, jid)["owner"] == restarted.owner


def test_a_job_whose_server_stopped_reads_as_failed_and_resubmitting_resumes_it(registered, tmp_path, monkeypatch):
    import threading

    store, out = tmp_path / "store", tmp_path / "out"
    release = threading.Event()
    real_run_job = bulk.run_job

    def stuck(spec, files, **kw):  # a replica that will never finish this job
        kw["on_progress"](0, spec.n)
        release.wait(30)
        raise RuntimeError("replica killed (test)")

    monkeypatch.setattr(bulk, "run_job", stuck)
    dying = _manager(registered, store.as_uri())
    dying.heartbeat_s = 0.05
    jid = dying.submit({**SMALL, "output": out.as_uri()})["job_id"]
    deadline = time.monotonic() + 10
    while _record(store, jid)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        beat = _record(store, jid)["updated_at"]
        time.sleep(0.3)
        assert _record(store, jid)["updated_at"] > beat  # the heartbeat keeps a running record fresh
        # The server stops: no more heartbeats (its last one lands within one period). Reading the
        # record while they still came would compare two different "last recorded" times below.
        dying.heartbeat_s = 3600.0
        time.sleep(0.2)
        last = _record(store, jid)["updated_at"]

        restarted = _manager(registered, store.as_uri())
        seen = restarted.get(jid)
        assert (seen["status"], seen["done"], seen["total"]) == ("failed", 0, 40)
        assert seen["error"].startswith("interrupted:") and "re-submit the same spec to resume" in seen["error"]
        assert f"last recorded {last}" in seen["error"]
        assert [j["job_id"] for j in restarted.list(status="failed")] == [jid]
        assert restarted.list(status="running") == []
        assert restarted.cancel(jid) == seen  # nothing runs here to cancel
        assert _record(store, jid)["status"] == "running"  # the record stays the last thing known
    finally:
        # Whatever failed above, the stuck job ends here: its thread must not outlive the test
        # (its writes would land in the next test's monkeypatched records).
        release.set()
    assert dying.wait(jid, timeout=10)["status"] == "failed"

    monkeypatch.setattr(bulk, "run_job", real_run_job)
    assert restarted.submit({**SMALL, "output": out.as_uri()})["job_id"] == jid
    resumed = restarted.wait(jid, timeout=60)
    assert (resumed["status"], resumed["done"]) == ("succeeded", 40), resumed
    assert _record(store, jid)["status"] == "succeeded"
    bulk.verify(out.as_uri())


@pytest.mark.parametrize("interval, writes", [
    (3600.0, [("queued", 0), ("running", 0), ("succeeded", 40)]),
    (0.0, [("queued", 0), ("running", 0), ("running", 0), ("running", 16), ("running", 32), ("running", 40),
           ("succeeded", 40)]),
])
def test_progress_is_recorded_at_most_every_interval_and_every_state_change_always(registered, tmp_path, monkeypatch,
                                                                                    interval, writes):
    from genmodels import records

    seen = []
    put_job = records.put_job
    monkeypatch.setattr(records, "put_job", lambda storage, r: (seen.append((r["status"], r["done"])),
                                                                put_job(storage, r)))
    manager = _manager(registered, (tmp_path / "store").as_uri())
    manager.progress_interval_s = interval
    jid = manager.submit({**SMALL, "output": (tmp_path / "out").as_uri()})["job_id"]
    assert manager.wait(jid, timeout=60)["status"] == "succeeded"
    assert seen == writes


def test_an_unknown_or_impossible_job_id_is_404_naming_where_records_live(registered, tmp_path):
    manager = _manager(registered, (tmp_path / "store").as_uri())
    for jid in ("0123abcd", "../../etc/passwd", "a/b"):
        r = _refused(manager.get, jid)
        assert (r.status_code, r.error) == (404, "job_not_found") and "/store/jobs/" in r.detail, r


class _ManagerBackend:
    """create_api's backend over a JobManager, as serving.app.HandleBackend is over the Jobs handle."""

    def __init__(self, manager):
        self.manager = manager

    async def describe(self):
        return []

    async def submit_job(self, request):
        return self.manager.submit(request)

    async def job_status(self, jid):
        return self.manager.get(jid)

    async def cancel_job(self, jid):
        return self.manager.cancel(jid)


class _ListingBackend(_ManagerBackend):
    async def list_jobs(self, status, limit, offset=0):
        return self.manager.page(status, limit, offset)


@pytest.fixture(scope="module")
def listing(registered, tmp_path_factory):
    """Three ended jobs (two succeeded, one failed) through the HTTP routes of create_api."""
    from fastapi.testclient import TestClient

    from serving.api import create_api

    root = tmp_path_factory.mktemp("listing")
    manager = _manager(registered, (root / "store").as_uri())
    client = TestClient(create_api(_ListingBackend(manager), api_key=KEY), headers=AUTH)
    ids = []
    for i, output in enumerate([root / "a", root / "b", root / "a"]):  # the third: another job's output
        r = client.post("/v1/jobs", json={**SMALL, "seed": i, "output": output.as_uri()})
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
        manager.wait(ids[-1], timeout=60)
    return client, ids


def test_listing_jobs_newest_first_filtered_and_bounded(listing):
    client, (a, b, clash) = listing
    r = client.get("/v1/jobs")
    assert r.status_code == 200, r.text
    jobs = r.json()
    assert [j["job_id"] for j in jobs] == [clash, b, a]
    assert [j["status"] for j in jobs] == ["failed", "succeeded", "succeeded"]
    assert "holds another job" in jobs[0]["error"]
    assert all("manifest" not in j for j in jobs) and jobs[1]["result"]["totals"]["samples"] == 40
    assert [j["job_id"] for j in client.get("/v1/jobs", params={"status": "succeeded"}).json()] == [b, a]
    assert client.get("/v1/jobs", params={"status": "running"}).json() == []
    assert [j["job_id"] for j in client.get("/v1/jobs", params={"limit": 2}).json()] == [clash, b]
    assert client.get(f"/v1/jobs/{b}").json()["manifest"]["totals"]["samples"] == 40


@pytest.mark.parametrize("params, field", [
    ({"status": "done"}, "status"), ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
])
def test_listing_jobs_with_bad_parameters_is_422_naming_them(listing, params, field):
    client, _ = listing
    r = client.get("/v1/jobs", params=params)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request"), r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["query", field]]


def test_listing_jobs_needs_the_key_and_a_backend_that_lists(listing):
    from fastapi.testclient import TestClient

    from serving.api import create_api

    client, _ = listing
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")

    r = TestClient(create_api(_ManagerBackend(None))).get("/v1/jobs")
    assert (r.status_code, r.json()["error"]) == (501, "not_implemented")


# --- lanes, limits, queue, memory (JobManager in-process, no Serve) -----------------------------
def test_an_output_outside_the_roots_is_422_naming_no_file(registered, tmp_path):
    root, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "escape").symlink_to(elsewhere, target_is_directory=True)
    manager = _manager(registered, (tmp_path / "store").as_uri(), output_roots=[root.as_uri() + "/"])
    for output in [(tmp_path / "x").as_uri(), root.as_uri() + "/../x", root.as_uri() + "/a/%2e%2e/%2e%2e/x",
                   (root / "escape" / "y").as_uri(), root.as_uri(), "file:///dev/shm/x", f"s3://{BUCKET}/x",
                   root.as_uri() + "/a\nlevel=error msg=forged"]:
        r = _refused(manager.submit, {**SMALL, "output": output})
        assert (r.status_code, r.error) == (422, "invalid_request"), (output, r)
        (detail,) = r.detail
        assert detail["loc"] == ["body", "output"], (output, detail)
        # Names nothing but what the caller sent (quoted: a newline in it stays "\n", not a new log line).
        rest = detail["msg"].replace(repr(output), "").replace(output, "")
        assert str(tmp_path) not in rest and "elsewhere" not in rest and "\n" not in detail["msg"], detail
    assert list(elsewhere.iterdir()) == [] and manager.list() == []
    accepted = manager.submit({**SMALL, "output": (root / "run").as_uri()})
    assert manager.wait(accepted["job_id"], timeout=60)["status"] == "succeeded"


@pytest.mark.parametrize("body, field", [
    ({"n": 101}, "n"),                       # samples
    ({"n": 40, "shard_size": 10}, "shard_size"),  # 4 shards
    ({"n": 60, "shard_size": 30}, "n"),      # 60 images of 8x8 = 3,840 bytes
    ({"n": 40, "shard_size": 21}, "shard_size"),  # a shard of 21 images = 1,344 bytes
    ({"n": 21, "shard_size": 1000}, "shard_size"),  # one shard of all 21
])
def test_limits_per_job_are_422_naming_the_field(registered, tmp_path, body, field):
    manager = _manager(registered, (tmp_path / "store").as_uri(), max_samples=100, max_shards=3, max_bytes=50 * 64,
                       max_shard_bytes=20 * 64)
    r = _refused(manager.submit, {**SMALL, **body, "output": (tmp_path / "out").as_uri()})
    assert (r.status_code, r.error) == (422, "invalid_request"), r
    assert [d["loc"] for d in r.detail] == [["body", field]] and "GENMODELS_JOB_MAX_" in r.detail[0]["msg"]
    assert manager.list() == []


def test_jobs_beyond_the_active_limit_queue_with_their_position_and_a_queued_one_cancels_at_once(
        registered, tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    real_run_job = bulk.run_job

    def gated(spec, files, **kw):
        release.wait(30)
        return real_run_job(spec, files, **kw)

    monkeypatch.setattr(bulk, "run_job", gated)
    store = tmp_path / "store"
    manager = _manager(registered, store.as_uri(), max_active=1)
    manager.heartbeat_s = 0.05
    a, b, c = (manager.submit({**SMALL, "output": (tmp_path / name).as_uri()}) for name in "abc")
    assert (b["status"], b["queue_position"], c["status"], c["queue_position"]) == ("queued", 1, "queued", 2)
    deadline = time.monotonic() + 10
    while manager.get(a["job_id"])["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _record(store, a["job_id"])["heartbeat_at"] is not None
    # A queued job's record stays fresh too: read stale, the generate flow would run it beside us.
    beat = _record(store, c["job_id"])["updated_at"]
    time.sleep(0.3)
    assert _record(store, c["job_id"])["status"] == "queued" and _record(store, c["job_id"])["updated_at"] > beat

    cancelled = manager.cancel(b["job_id"])
    assert (cancelled["status"], cancelled.get("queue_position")) == ("cancelled", None), cancelled
    assert _record(store, b["job_id"])["status"] == "cancelled"
    assert manager.get(c["job_id"])["queue_position"] == 1
    release.set()
    first, third = manager.wait(a["job_id"], timeout=60), None
    deadline = time.monotonic() + 60
    while (third := manager.get(c["job_id"]))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert (first["status"], third["status"]) == ("succeeded", "succeeded")
    assert third["started_at"] >= first["ended_at"]  # one at a time
    assert not (tmp_path / "b").exists()  # never started: nothing written


def test_ended_jobs_leave_memory_and_are_answered_from_their_records(registered, tmp_path):
    manager = _manager(registered, (tmp_path / "store").as_uri(), keep_ended=1)
    ids = []
    for seed in (1, 2):
        ids.append(manager.submit({**SMALL, "seed": seed, "output": (tmp_path / f"o{seed}").as_uri()})["job_id"])
        assert manager.wait(ids[-1], timeout=60)["status"] == "succeeded"
    assert list(manager._jobs) == [ids[1]]
    again = manager.get(ids[0])
    assert (again["status"], again["done"], again["manifest"]["totals"]["samples"]) == ("succeeded", 40, 40)
    assert [j["job_id"] for j in manager.list()] == ids[::-1]


def test_records_without_a_job_id_do_not_break_the_listing(registered, tmp_path):
    store = tmp_path / "store"
    manager = _manager(registered, store.as_uri())
    jid = manager.submit({**SMALL, "output": (tmp_path / "o").as_uri()})["job_id"]
    manager.wait(jid, timeout=60)
    (store / "jobs" / "hand-written.json").write_text(json.dumps({"status": "succeeded", "done": 1}))
    (store / "jobs" / "numeric.json").write_text(json.dumps({"job_id": 5, "status": "failed", "submitted_at": 7}))
    (store / "jobs" / "wrong-status.json").write_text(json.dumps({"job_id": "wrong-status", "status": "done"}))
    restarted = _manager(registered, store.as_uri())
    assert [j["job_id"] for j in restarted.list()] == [jid]


def test_a_job_re_run_by_the_flow_after_this_server_ran_it_is_answered_as_it_is_now(registered, tmp_path):
    from genmodels import records

    store = tmp_path / "store"
    manager = _manager(registered, store.as_uri())
    jid = manager.submit({**SMALL, "output": (tmp_path / "o").as_uri()})["job_id"]
    assert manager.wait(jid, timeout=60)["status"] == "succeeded" and jid in manager._jobs
    manager.ended_record_ttl_s = 0.0
    with records.JobRecorder(store.as_uri(), jid, _record(store, jid)["spec"]):  # `genmodels generate`, again
        assert manager.get(jid)["status"] == "running"
        assert [(j["job_id"], j["status"]) for j in manager.list()] == [(jid, "running")]
    ended = manager.get(jid)
    assert ended["status"] == "failed" and ended["error"] == "ended without a manifest"
    assert [(j["job_id"], j["status"]) for j in manager.list()] == [(jid, "failed")]


def test_a_job_that_fails_on_the_server_side_records_an_error_id_not_the_fault(registered, tmp_path, monkeypatch):
    import logging

    def broken_disk(spec, files, **kw):
        raise OSError("[Errno 28] No space left on device: '/srv/genmodels/outputs/.shard-00000.npz' on 10.0.0.7")

    monkeypatch.setattr(bulk, "run_job", broken_disk)
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    server_log = logging.getLogger("ray.serve")  # the replica's log, whatever its propagation
    server_log.addHandler(handler)
    try:
        manager = _manager(registered, (tmp_path / "store").as_uri())
        jid = manager.submit({**SMALL, "output": (tmp_path / "o").as_uri()})["job_id"]
        failed = manager.wait(jid, timeout=60)
    finally:
        server_log.removeHandler(handler)
    assert failed["status"] == "failed" and "/srv" not in failed["error"] and "10.0.0.7" not in failed["error"]
    error_id = failed["error"].split("error id ")[1][:16]
    assert any(error_id in r.getMessage() and "10.0.0.7" in str(r.exc_info[1]) for r in logged)
    assert _record(tmp_path / "store", jid)["error"] == failed["error"]


@pytest.mark.parametrize("name", ["a/b", "x:y", "..", "nope"])
def test_a_model_name_the_registry_cannot_hold_is_404_not_a_registry_outage(registered, tmp_path, name):
    manager = _manager(registered, (tmp_path / "store").as_uri())
    r = _refused(manager.submit, {**SMALL, "model": name, "output": (tmp_path / "o").as_uri()})
    assert (r.status_code, r.error) == (404, "model_not_found") and repr(name) in r.detail, r


def test_a_registry_that_cannot_be_reached_is_503_without_its_details(registered, tmp_path, monkeypatch):
    manager = _manager(registered, (tmp_path / "store").as_uri())

    def down(*args, **kwargs):
        raise ConnectionError("http://mlflow.internal:5000 refused (token=s3cr3t)")

    monkeypatch.setattr(registry, "current_version", down)
    r = _refused(manager.submit, {**SMALL, "output": (tmp_path / "o").as_uri()})
    assert (r.status_code, r.error) == (503, "registry_unavailable"), r
    assert "mlflow.internal" not in json.dumps(r.to_answer()) and "s3cr3t" not in json.dumps(r.to_answer())


def test_graphs_that_do_not_load_are_this_servers_fault_not_a_registry_outage(registered, tmp_path, monkeypatch):
    manager = _manager(registered, (tmp_path / "store").as_uri())

    def broken(files, threads):
        raise RuntimeError("onnxruntime: invalid graph /srv/models/sampler.onnx")

    monkeypatch.setattr(bulk, "build_sampler", broken)
    # Not a 503 "try again later" (no retry mends the graphs): the API's 500, its details logged.
    with pytest.raises(RuntimeError, match="invalid graph"):
        manager.submit({**SMALL, "output": (tmp_path / "o").as_uri()})
    assert not (tmp_path / "o").exists()


def test_listing_jobs_is_paged_with_a_total_and_a_next_link(listing):
    client, (a, b, clash) = listing
    r = client.get("/v1/jobs", params={"limit": 2})
    assert [j["job_id"] for j in r.json()] == [clash, b] and r.headers["X-Total-Count"] == "3"
    assert "offset=2" in r.headers["Link"] and r.headers["Link"].endswith('rel="next"')
    last = client.get("/v1/jobs", params={"limit": 2, "offset": 2})
    assert [j["job_id"] for j in last.json()] == [a] and "Link" not in last.headers
    assert client.get("/v1/jobs", params={"offset": 3}).json() == []
