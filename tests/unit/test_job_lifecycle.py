"""A bulk job's life in serving.jobs.JobManager (in-process, no Ray, no registry): its end and
its record, a re-submission racing its end, the server stopping under it, a storage error on its
last write, and what the manager keeps in memory meanwhile."""

from __future__ import annotations

import threading
import time
import types

import pytest

from genmodels import bulk, records
from serving.errors import RequestError
from serving.jobs import JobManager


def _manager(tmp_path, **limits) -> JobManager:
    out = tmp_path / "out"
    manager = JobManager(None, "champion", f"sqlite:///{tmp_path}/mlflow.db", workers=1, use_ray=False,
                         storage=(tmp_path / "store").as_uri(), output_roots=[out.as_uri() + "/"], **limits)
    manager._resolve = lambda name: ("1", {"graph.onnx": b""}, False, 0, 4)
    manager.out = out
    return manager


def _request(manager, seed: int) -> dict:
    return {"model": "m", "n": 4, "seed": seed, "labels": None, "temperature": 1.0, "shard_size": 4,
            "format": "npz", "output": (manager.out / f"job-{seed}").as_uri()}


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture()
def cancellable(monkeypatch):
    """Jobs run until cancelled (or released at the end of the test)."""
    release = threading.Event()

    def run_job(spec, files, should_stop, **kw):
        while not should_stop() and not release.is_set():
            time.sleep(0.01)
        raise bulk.JobCancelled(0, spec.num_shards)

    monkeypatch.setattr(bulk, "run_job", run_job)
    yield release
    release.set()


@pytest.fixture()
def slow_final_write(monkeypatch):
    """The write of a cancelled job's final record takes 300 ms (S3 latency)."""
    real_put = records.put_job

    def slow_put(storage, record):
        if record["status"] == "cancelled" and record.get("ended_at"):
            time.sleep(0.3)
        real_put(storage, record)

    monkeypatch.setattr(records, "put_job", slow_put)


# --- a re-submission while the previous run writes its final record ---------------------------------
def test_a_spec_resubmitted_while_its_run_records_its_end_runs_again_cleanly(tmp_path, cancellable,
                                                                            slow_final_write):
    manager = _manager(tmp_path, max_active=2, max_queued=2)
    a = manager.submit(_request(manager, 0))["job_id"]
    manager.cancel(a)
    _until(lambda: manager.get(a)["status"] == "cancelled")  # the client polls until it reads cancelled...
    again = manager.submit(_request(manager, 0))  # ...and re-submits the spec at once to resume it
    assert again == {"job_id": a, "status": "running"}
    time.sleep(0.5)  # past the previous run's final write
    assert manager._active == {a}
    assert manager.get(a)["status"] == "running"
    assert records.get_job(manager.storage, a)["status"] == "running"
    for seed in (1, 2, 3):
        manager.submit(_request(manager, seed))
    assert sum(job.status == "running" for job in manager._jobs.values()) == manager.max_active
    manager.shutdown()
    assert manager.get(a)["status"] == "cancelled"
    assert records.get_job(manager.storage, a)["status"] == "cancelled"


def test_a_resubmission_waits_for_the_final_write_a_bounded_time(tmp_path, cancellable, slow_final_write):
    manager = _manager(tmp_path)
    manager.end_wait_s = 0.05
    a = manager.submit(_request(manager, 0))["job_id"]
    manager.cancel(a)
    _until(lambda: manager.get(a)["status"] == "cancelled")
    with pytest.raises(RequestError) as err:
        manager.submit(_request(manager, 0))
    assert (err.value.status_code, err.value.error) == (409, "output_in_use")
    manager.wait(a, 5)
    assert records.get_job(manager.storage, a)["status"] == "cancelled" and not manager._active
    assert manager.submit(_request(manager, 0))["status"] == "running"
    manager.shutdown()


# --- the server stopping ----------------------------------------------------------------------------
def test_shutdown_returns_once_running_jobs_recorded_cancelled(tmp_path, monkeypatch):
    def run_job(spec, files, should_stop, **kw):
        while not should_stop():
            time.sleep(0.25)  # run_on_ray's poll interval
        time.sleep(0.25)  # killing the actors, removing the placement group
        raise bulk.JobCancelled(0, spec.num_shards)

    monkeypatch.setattr(bulk, "run_job", run_job)
    manager = _manager(tmp_path)
    a = manager.submit(_request(manager, 0))["job_id"]
    _until(lambda: records.get_job(manager.storage, a)["status"] == "running")
    start = time.monotonic()
    manager.shutdown()
    assert time.monotonic() - start < 2.5  # under graceful_shutdown_timeout_s (3 s)
    # Serve kills the replica right after: what the record says now is what the next server answers.
    assert records.get_job(manager.storage, a)["status"] == "cancelled"
    assert _manager(tmp_path).get(a)["status"] == "cancelled"


def test_shutdown_records_cancelled_for_a_job_too_slow_to_stop(tmp_path, monkeypatch):
    release = threading.Event()

    def run_job(spec, files, should_stop, **kw):
        release.wait(10)  # deaf to the cancel (a shard write stuck on storage)
        raise bulk.JobCancelled(0, spec.num_shards)

    monkeypatch.setattr(bulk, "run_job", run_job)
    manager = _manager(tmp_path)
    manager.shutdown_wait_s = 0.2
    a = manager.submit(_request(manager, 0))["job_id"]
    _until(lambda: records.get_job(manager.storage, a)["status"] == "running")
    start = time.monotonic()
    manager.shutdown()
    assert time.monotonic() - start < 1.0
    record = records.get_job(manager.storage, a)
    assert record["status"] == "cancelled" and "server stopped" in record["error"]
    release.set()
    manager.wait(a, 5)
    assert records.get_job(manager.storage, a)["status"] == "cancelled"


# --- the final record write failing -----------------------------------------------------------------
@pytest.fixture()
def quick_jobs(monkeypatch):
    monkeypatch.setattr(bulk, "run_job", lambda spec, files, should_stop, **kw: {"totals": {"samples": spec.n}})


@pytest.fixture()
def failing_final_write(monkeypatch):
    """``fail[job_id]`` final record writes of that job fail (an S3 error) before one succeeds."""
    real_put = records.put_job
    fail: dict[str, float] = {}

    def flaky_put(storage, record):
        if record.get("ended_at") and fail.get(record["job_id"], 0) > 0:
            fail[record["job_id"]] -= 1
            raise ConnectionError("S3 503 SlowDown")
        real_put(storage, record)

    monkeypatch.setattr(records, "put_job", flaky_put)
    return fail


def test_one_storage_error_on_the_final_write_does_not_turn_success_into_interrupted(tmp_path, quick_jobs,
                                                                                    failing_final_write):
    manager = _manager(tmp_path, keep_ended=1)
    a = bulk.job_id(bulk.JobSpec(version="1", **_request(manager, 0)))
    failing_final_write[a] = 1
    manager.submit(_request(manager, 0))
    manager.wait(a, 5)
    b = manager.submit(_request(manager, 1))["job_id"]  # one more ends: A leaves memory (keep_ended=1)
    manager.wait(b, 5)
    assert a not in manager._jobs
    assert manager.get(a)["status"] == "succeeded"
    assert records.get_job(manager.storage, a)["status"] == "succeeded"


def test_a_job_whose_final_record_cannot_be_written_stays_in_memory_until_it_is(tmp_path, quick_jobs,
                                                                                failing_final_write):
    manager = _manager(tmp_path, keep_ended=1)
    manager.final_write_backoff_s = (0.01,)
    a = bulk.job_id(bulk.JobSpec(version="1", **_request(manager, 0)))
    failing_final_write[a] = float("inf")  # storage down for this record
    manager.submit(_request(manager, 0))
    manager.wait(a, 5)
    for seed in (1, 2):
        manager.wait(manager.submit(_request(manager, seed))["job_id"], 5)
    assert a in manager._jobs and manager._jobs[a].unsaved
    assert manager.get(a)["status"] == "succeeded"  # not "failed: interrupted" from its stale record
    assert records.get_job(manager.storage, a)["status"] == "running"

    failing_final_write[a] = 0  # storage is back: the next job's end writes it again
    manager.wait(manager.submit(_request(manager, 3))["job_id"], 5)
    assert records.get_job(manager.storage, a)["status"] == "succeeded"
    manager.wait(manager.submit(_request(manager, 4))["job_id"], 5)
    assert a not in manager._jobs  # written: it leaves memory as any ended job does


def test_a_get_writes_again_the_record_it_finds_behind(tmp_path, quick_jobs, failing_final_write):
    manager = _manager(tmp_path, keep_ended=0)
    manager.final_write_backoff_s = ()
    a = bulk.job_id(bulk.JobSpec(version="1", **_request(manager, 0)))
    failing_final_write[a] = 2  # the final write and the retry at the end of the job fail
    manager.submit(_request(manager, 0))
    manager._jobs[a].thread.join(5)  # not manager.wait(): it answers with a get()
    assert records.get_job(manager.storage, a)["status"] == "running"
    assert manager.get(a)["status"] == "succeeded"
    assert records.get_job(manager.storage, a)["status"] == "succeeded"


def test_jobs_held_for_an_unwritten_record_are_bounded(tmp_path, quick_jobs, failing_final_write):
    manager = _manager(tmp_path, keep_ended=0)
    manager.final_write_backoff_s, manager.unsaved_kept = (), 2
    for seed in range(5):
        jid = bulk.job_id(bulk.JobSpec(version="1", **_request(manager, seed)))
        failing_final_write[jid] = float("inf")
        manager.wait(manager.submit(_request(manager, seed))["job_id"], 5)
    assert len(manager._jobs) == 2 and len(manager._ended_order) == 2


# --- the graphs kept for submissions ----------------------------------------------------------------
def test_only_the_latest_version_of_each_model_is_kept(tmp_path, monkeypatch):
    from genmodels import registry

    champion = {"m": 1, "other": 1}
    monkeypatch.setattr(registry, "current_version", lambda name, alias="champion": str(champion[name]))
    monkeypatch.setattr(registry, "fetch_graphs", lambda name, alias="champion": (
        types.SimpleNamespace(version=champion[name]), {"sampler.onnx": f"{name} v{champion[name]}".encode()}))
    monkeypatch.setattr(bulk, "build_sampler", lambda files, threads: types.SimpleNamespace(
        conditional=False, num_classes=0, image_shape=(1, 28, 28)))
    manager = JobManager(None, "champion", f"sqlite:///{tmp_path}/mlflow.db", use_ray=False,
                         storage=(tmp_path / "store").as_uri(), output_roots=[(tmp_path / "out").as_uri() + "/"])
    for version in range(1, 31):  # a daily retrain for a month, one submission each
        champion["m"] = version
        assert manager._resolve("m")[:2] == (str(version), {"sampler.onnx": f"m v{version}".encode()})
        manager._resolve("other")
    assert sorted(manager._models) == ["m", "other"]
    assert manager._resolve("m") == ("30", {"sampler.onnx": b"m v30"}, False, 0, 784)


# --- a cancel racing the submission or a re-submission racing the cancel ----------------------------
def test_a_job_cancelled_while_its_submission_records_it_ends_cancelled_not_queued(tmp_path, cancellable,
                                                                                  monkeypatch):
    manager = _manager(tmp_path, max_active=1, max_queued=2)
    manager.submit(_request(manager, 0))  # holds the only slot: the next job waits in the queue
    b = bulk.job_id(bulk.JobSpec(version="1", **_request(manager, 1)))
    writing, answers = threading.Event(), []
    real_put = records.put_job

    def put(storage, record):
        if record["job_id"] == b and record["status"] == "queued" and not writing.is_set():
            writing.set()  # the submission writes B's first record (S3 latency): another client cancels B
            _until(lambda: manager._jobs[b].cancel.is_set())
        real_put(storage, record)

    monkeypatch.setattr(records, "put_job", put)
    canceller = threading.Thread(target=lambda: writing.wait(5) and answers.append(manager.cancel(b)))
    canceller.start()
    manager.submit(_request(manager, 1))
    canceller.join(5)
    assert answers and answers[0]["cancel_requested"]
    _until(lambda: manager.get(b)["status"] == "cancelled", timeout=2)
    assert b not in manager._queue and records.get_job(manager.storage, b)["status"] == "cancelled"
    manager.shutdown()


def test_a_resubmission_while_the_cancelled_run_stops_runs_the_job_again(tmp_path, monkeypatch):
    stopping = threading.Event()

    def run_job(spec, files, should_stop, **kw):
        while not should_stop():
            time.sleep(0.01)
        stopping.wait(5)  # killing the writers, removing the placement group
        raise bulk.JobCancelled(0, spec.num_shards)

    monkeypatch.setattr(bulk, "run_job", run_job)
    manager = _manager(tmp_path)
    a = manager.submit(_request(manager, 0))["job_id"]
    assert manager.cancel(a)["cancel_requested"]
    threading.Timer(0.2, stopping.set).start()
    # Re-submitted at once (a client's "pause" then "resume"): answered for a run that will run.
    again = manager.submit(_request(manager, 0))
    assert again["job_id"] == a
    time.sleep(0.3)
    assert manager.get(a)["status"] == "running" and not manager.get(a)["cancel_requested"]
    manager.shutdown()


# --- the same spec run by the generate flow and submitted to the API ----------------------------------
def test_a_spec_the_generate_flow_is_running_is_answered_as_that_run_not_run_again(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    runs = []
    monkeypatch.setattr(bulk, "run_job", lambda spec, *a, **kw: runs.append(spec))
    request = _request(manager, 0)
    spec = bulk.JobSpec(version="1", **request)
    jid = bulk.job_id(spec)
    with records.JobRecorder(manager.storage, jid, spec.to_dict()):  # `genmodels generate` with the same spec
        assert manager.submit(dict(request)) == {"job_id": jid, "status": "running"}
        time.sleep(0.2)
        assert runs == [] and jid not in manager._jobs  # no second run writing the same shards
        recorded = records.get_job(manager.storage, jid)
        assert (recorded["runner"], recorded["status"]) == ("generate", "running")  # the flow's record stands
        with pytest.raises(RequestError) as refused:
            manager.cancel(jid)
        assert (refused.value.status_code, refused.value.error) == (409, "job_runs_elsewhere")


def test_a_spec_whose_flow_run_died_is_run_by_the_api(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    runs = []
    monkeypatch.setattr(bulk, "run_job", lambda spec, *a, **kw: runs.append(spec) or {"totals": {"samples": 4}})
    request = _request(manager, 0)
    spec = bulk.JobSpec(version="1", **request)
    jid = bulk.job_id(spec)
    recorder = records.JobRecorder(manager.storage, jid, spec.to_dict())
    recorder.record["owner"] = "elsewhere:1:abcd"
    recorder._write()  # its process was killed: the record says running, refreshed long ago
    stale = records.get_job(manager.storage, jid)
    stale["updated_at"] = "2026-01-01T00:00:00+00:00"
    records.put_job(manager.storage, stale)
    assert manager.submit(dict(request))["job_id"] == jid
    _until(lambda: manager.get(jid)["status"] == "succeeded")
    assert len(runs) == 1
