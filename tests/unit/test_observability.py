"""The request log of the HTTP API: one record per request, with the route template (a bounded
label set), the status the client got, the latency, and which model version produced how many
images. Runs the FastAPI app in-process over a fake backend (no Ray)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.api import create_api
from serving.errors import RequestError
from serving.observability import logfmt


class FakeBackend:
    async def describe(self):
        return [{"name": "m", "family": "vae", "version": "7", "conditional": False, "num_classes": 0,
                 "image_shape": [1, 2, 2], "metrics": {}}]

    async def sample(self, request):
        if request["model"] != "m":
            raise RequestError(404, "model_not_found", f"no served model {request['model']!r}")
        return {"model": "m", "version": "7", "seed": request["seed"],
                "images": np.full((request["n"], 1, 2, 2), 0.5, np.float32)}


@pytest.fixture()
def client_and_records():
    records: list[dict] = []
    app = create_api(FakeBackend(), max_body_bytes=256, request_log=records.append)
    with TestClient(app) as client:
        yield client, records


def test_sampling_request_names_model_version_and_n(client_and_records):
    client, records = client_and_records
    r = client.post("/v1/models/m/samples", json={"n": 3, "seed": 1})
    assert r.status_code == 200
    (rec,) = records
    assert rec["method"] == "POST" and rec["route"] == "/v1/models/{name}/samples" and rec["status"] == 200
    assert (rec["model"], rec["version"], rec["n"]) == ("m", "7", 3)
    assert 0 < rec["latency_ms"] < 10_000


def test_errors_are_recorded_with_the_status_the_client_got(client_and_records):
    client, records = client_and_records
    assert client.post("/v1/models/nope/samples", json={"n": 1}).status_code == 404
    assert client.post("/v1/models/m/samples", json={"n": 0}).status_code == 422
    assert client.post("/v1/models/m/samples", content=b"x" * 1000,
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/no/such/path").status_code == 404
    assert [(r["route"], r["status"]) for r in records] == [
        ("/v1/models/{name}/samples", 404), ("/v1/models/{name}/samples", 422),
        # BodyLimit answers before routing: no route template yet, one shared label.
        ("<unmatched>", 413), ("<unmatched>", 404)]
    assert not any("model" in r for r in records)  # no images returned: no model label


class FailingBackend:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def sample(self, request):
        raise self.exc


@pytest.mark.parametrize("fault, status", [("replica-died", 503), ("bug", 500)])
def test_faults_are_recorded_with_the_status_the_client_got(fault, status):
    # A fault answered outside the request log (as Starlette answers Exception's handler) would be
    # recorded as the 500 the log assumes, whatever the client got.
    from ray.exceptions import ActorDiedError

    exc = ActorDiedError() if fault == "replica-died" else RuntimeError("boom")
    records: list[dict] = []
    client = TestClient(create_api(FailingBackend(exc), request_log=records.append), raise_server_exceptions=False)
    assert client.post("/v1/models/m/samples", json={"n": 1}).status_code == status
    assert [(r["route"], r["status"]) for r in records] == [("/v1/models/{name}/samples", status)]


def test_default_request_log_writes_one_logfmt_line():
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ray.serve")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with TestClient(create_api(FakeBackend())) as client:
            client.get("/v1/models/m/grid.png", params={"n": 2, "seed": 0})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    (line,) = [line for line in lines if line.startswith("request ")]
    assert "route=/v1/models/{name}/grid.png status=200" in line
    assert "model=m version=7 n=2" in line


def test_logfmt_quotes_what_would_break_a_line():
    assert logfmt({"a": 1, "b": 2.345, "c": 'x y="z"', "d": ""}) == 'a=1 b=2.3 c="x y=\\"z\\"" d=""'


class FakeJobsBackend(FakeBackend):
    async def submit_job(self, request):
        return {"job_id": "j1", "status": "queued"}

    async def job_status(self, job_id):
        if job_id != "j1":
            raise RequestError(404, "job_not_found", f"no job {job_id!r}")
        return {"job_id": "j1", "status": "queued", "done": 0, "total": 1, "model": "m", "version": "7",
                "output": "file:///o/", "cancel_requested": False}

    async def cancel_job(self, job_id):
        return {**await self.job_status(job_id), "status": "cancelled"}

    async def list_jobs(self, status, limit, offset=0):
        return {"jobs": [], "total": 0}


def test_job_routes_are_labelled_with_their_full_template():
    # Labelled "/jobs" they would read as another route than the one clients call, and the
    # metrics of /v1/jobs would not be found under its path.
    records: list[dict] = []
    with TestClient(create_api(FakeJobsBackend(), request_log=records.append)) as client:
        assert client.post("/v1/jobs", json={"model": "m", "n": 1, "seed": 0,
                                             "output": "file:///o/"}).status_code == 202
        assert client.get("/v1/jobs").status_code == 200
        assert client.get("/v1/jobs/j1").status_code == 200
        assert client.get("/v1/jobs/nope").status_code == 404
        assert client.delete("/v1/jobs/j1").status_code == 200
    assert [(r["method"], r["route"], r["status"]) for r in records] == [
        ("POST", "/v1/jobs", 202), ("GET", "/v1/jobs", 200), ("GET", "/v1/jobs/{job_id}", 200),
        ("GET", "/v1/jobs/{job_id}", 404), ("DELETE", "/v1/jobs/{job_id}", 200)]


def test_methods_a_client_invents_share_one_metrics_label(monkeypatch):
    # h11 (uvicorn without httptools) takes any token as a method: each would be a new time series.
    import ray.serve.metrics

    from serving.observability import RequestLog

    labels: set[tuple[str, str, str]] = set()

    class FakeMetric:
        def __init__(self, *args, **kwargs):
            pass

        def inc(self, value, tags):
            labels.add((tags["route"], tags["method"], tags["status"]))

        def observe(self, value, tags):
            labels.add((tags["route"], tags["method"], tags["status"]))

    monkeypatch.setattr(ray.serve.metrics, "Counter", FakeMetric)
    monkeypatch.setattr(ray.serve.metrics, "Histogram", FakeMetric)
    with TestClient(create_api(FakeBackend(), request_log=RequestLog(metrics=True))) as client:
        for i in range(100):
            client.request(f"X{i}", "/v1/models")
        assert {m for _, m, _ in labels} == {"other"}
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            client.request(method, "/v1/models")
    assert {m for _, m, _ in labels} == {"other", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
