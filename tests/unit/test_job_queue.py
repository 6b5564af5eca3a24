"""The bulk-job queue of the serving API (serving.jobs.JobManager in-process, no Ray, no
registry): how many jobs may wait, and what a submission beyond that gets."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from genmodels import bulk, records
from serving.api import create_api
from serving.errors import RequestError


@pytest.fixture()
def manager(tmp_path, monkeypatch):
    """max_active=1, max_queued=2, over a model resolved without a registry, whose jobs run until
    the test ends."""
    from serving.jobs import JobManager

    release = threading.Event()

    def run_job(spec, files, should_stop, **kw):
        while not release.wait(0.01) and not should_stop():
            pass
        raise bulk.JobCancelled(0, spec.num_shards)

    monkeypatch.setattr(bulk, "run_job", run_job)
    out = tmp_path / "out"
    manager = JobManager(None, "champion", f"sqlite:///{tmp_path}/mlflow.db", workers=1, use_ray=False,
                         storage=(tmp_path / "store").as_uri(), output_roots=[out.as_uri() + "/"],
                         max_active=1, max_queued=2)
    manager._resolve = lambda name: ("1", {"graph.onnx": b""}, False, 0, 4)
    manager.out = out
    yield manager
    release.set()
    manager.shutdown()
    for job in list(manager._jobs.values()):
        if job.thread is not None:
            job.thread.join(5)


def _request(manager, seed: int) -> dict:
    return {"model": "m", "n": 4, "seed": seed, "labels": None, "temperature": 1.0, "shard_size": 4,
            "format": "npz", "output": (manager.out / f"job-{seed}").as_uri()}


def test_a_submission_beyond_the_queue_is_429_and_leaves_no_trace(manager):
    accepted = [manager.submit(_request(manager, seed)) for seed in range(3)]
    assert [a.get("queue_position") for a in accepted] == [None, 1, 2]  # the first runs
    with pytest.raises(RequestError) as err:
        manager.submit(_request(manager, 3))
    assert (err.value.status_code, err.value.error) == (429, "queue_full")
    assert "GENMODELS_MAX_QUEUED_JOBS" in err.value.detail and "2 wait" in err.value.detail
    refused = bulk.job_id(bulk.JobSpec(version="1", **_request(manager, 3)))
    assert refused not in manager._jobs and records.get_job(manager.storage, refused) is None
    assert len(manager._jobs) == 3 and len(manager._queue) == 2
    # The same spec again is the same job, answered as before, full queue or not.
    for seed, answer in enumerate(accepted):
        again = manager.submit(_request(manager, seed))
        assert again["job_id"] == answer["job_id"] and again.get("queue_position") == answer.get("queue_position")
    assert manager.limits()["max_queued"] == 2


def test_a_cancelled_queued_job_makes_room(manager):
    accepted = [manager.submit(_request(manager, seed)) for seed in range(3)]
    manager.cancel(accepted[2]["job_id"])
    assert manager.submit(_request(manager, 3))["queue_position"] == 2


def test_the_api_answers_queue_full_with_retry_after(manager):
    class Backend:
        async def describe(self):
            return []

        async def submit_job(self, request):
            return manager.submit(request)

        async def job_status(self, job_id):
            return manager.get(job_id)

        async def cancel_job(self, job_id):
            return manager.cancel(job_id)

    client = TestClient(create_api(Backend()))
    body = {k: v for k, v in _request(manager, 0).items() if v is not None}
    for seed in range(3):
        assert client.post("/v1/jobs", json={**body, "seed": seed, "output": _request(manager, seed)["output"]}
                           ).status_code == 202
    r = client.post("/v1/jobs", json={**body, "seed": 3, "output": _request(manager, 3)["output"]})
    assert (r.status_code, r.json()["error"]) == (429, "queue_full"), r.text
    assert int(r.headers["Retry-After"]) > 0
