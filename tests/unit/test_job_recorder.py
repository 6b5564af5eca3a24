"""Job records of the generate flow (CLI, Prefect): genmodels.records.JobRecorder writes them in
the form the serving API writes its own, so `GET /v1/jobs` (JobManager, in-process here) and
`genmodels status` list every job, however it was run."""

from __future__ import annotations

import re
import time

import pytest

from prefect.exceptions import TerminationSignal

from genmodels import bulk, records
from genmodels.storage import FileStorage


def _spec(tmp_path, **kw) -> bulk.JobSpec:
    return bulk.JobSpec(**{"model": "digits-vae", "version": "3", "n": 40, "seed": 2, "shard_size": 16,
                           "output": (tmp_path / "out").as_uri(), "format": "parquet", **kw})


def _manager(tmp_path, store):
    from serving.jobs import JobManager

    return JobManager(None, "champion", f"sqlite:///{tmp_path}/mlflow.db", workers=1, use_ray=False,
                      storage=store.url)


def test_a_flow_job_is_recorded_running_then_succeeded_and_the_api_lists_it(tmp_path):
    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)
    jid = bulk.job_id(spec)
    manager = _manager(tmp_path, store)
    with records.JobRecorder(store, jid, spec.to_dict()) as recorder:
        recorder.progress(16, 40)  # within progress_interval_s of the first write: not written yet
        running = records.get_job(store, jid)
        assert (running["status"], running["done"], running["total"], running["runner"]) == ("running", 0, 40,
                                                                                             "generate")
        assert not records.is_stale(running)
        # Another process is running it: the API answers "running", not "interrupted".
        listed = manager.page()["jobs"]
        assert [(j["job_id"], j["status"]) for j in listed] == [(jid, "running")]
        recorder.event("writers", {"count": 2, "wanted": 2})
        assert records.get_job(store, jid)["done"] == 16  # the state at that moment is written
        recorder.succeeded("file:///x/manifest.json", {"samples": 40, "shards": 3, "bytes": 1234})

    record = records.get_job(store, jid)
    assert (record["status"], record["done"], record["writers"], record["version"]) == ("succeeded", 40, 2, "3")
    assert record["spec"] == spec.to_dict() and record["output"] == spec.output and record["ended_at"]
    assert record["result"] == {"manifest": "file:///x/manifest.json",
                                "totals": {"samples": 40, "shards": 3, "bytes": 1234}}
    page = manager.page(status="succeeded")
    assert page["total"] == 1 and page["jobs"][0]["job_id"] == jid and page["jobs"][0]["done"] == 40
    from serving.api.schemas import JobStatus

    JobStatus.model_validate(page["jobs"][0])  # the API's response model takes it as it is
    assert manager.get(jid)["status"] == "succeeded"


def test_the_api_and_the_flow_give_one_spec_one_id(tmp_path):
    from serving.jobs import job_id

    assert job_id(_spec(tmp_path)) == bulk.job_id(_spec(tmp_path)) != bulk.job_id(_spec(tmp_path, seed=3))


@pytest.mark.parametrize("error, status", [(RuntimeError("disk full at 10.0.0.7 in /srv/genmodels/x.py"), "failed"),
                                           (bulk.JobRefused("output file:///o holds another job (differs in seed)"),
                                            "failed"),
                                           # not a refusal: numpy's, from a bug, or a graph that does not load
                                           (ValueError("operands could not be broadcast together with shapes (3,) "
                                                       "(4,)"), "failed"),
                                           (KeyboardInterrupt(), "cancelled"),
                                           (TerminationSignal(signal=15), "cancelled"),  # SIGTERM in a flow
                                           (SystemExit(1), "cancelled"),
                                           (bulk.JobCancelled(1, 3), "cancelled")])
def test_a_job_that_raises_is_recorded_ended_and_the_error_propagates(tmp_path, caplog, error, status):
    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)
    with pytest.raises(type(error)):
        with records.JobRecorder(store, bulk.job_id(spec), spec.to_dict()):
            raise error
    record = records.get_job(store, bulk.job_id(spec))
    assert record["status"] == status and record["ended_at"] and record["error"]
    if isinstance(error, bulk.JobRefused):  # a refusal the client can act on: its message as it is
        assert record["error"] == str(error)
    elif not isinstance(error, Exception):  # stopped, not failed: no error id, and a way on
        assert record["error"] == (f"interrupted ({type(error).__name__}); "
                                   "re-running the same command resumes the job")
    elif status == "failed":
        # API clients read records: a fault's text (hosts, paths) stays in the log, under an error id.
        error_id = re.fullmatch(rf"{type(error).__name__}: the job failed on the server side \(error id "
                                r"([0-9a-f]{16}); the log has its details\)", record["error"]).group(1)
        (logged,) = [r for r in caplog.records if error_id in r.getMessage()]
        assert logged.exc_info[1] is error
    assert records.list_jobs(store)[0]["job_id"] == bulk.job_id(spec)


def test_a_remote_error_is_recorded_by_its_cause(tmp_path):
    """A Ray task's error wraps the writer's own (``cause``) in a text with the remote traceback."""
    class RemoteError(RuntimeError):
        def __init__(self, cause):
            super().__init__(f"ray::Writer.write() (pid=4242, ip=10.0.0.7)\nTraceback ... {cause}")
            self.cause = cause

    refusal = bulk.JobRefused("labels: model has 3 classes")
    assert records.job_error(RemoteError(refusal), "j") == str(refusal)
    bug = records.job_error(RemoteError(ValueError("cannot reshape array of size 12 into shape (5,)")), "j")
    assert bug.startswith("ValueError: the job failed on the server side") and "reshape" not in bug
    fault = records.job_error(RemoteError(OSError("No space left on /srv/data")), "j")
    assert fault.startswith("OSError: the job failed on the server side") and "10.0.0.7" not in fault


def test_a_job_re_run_by_the_flow_is_answered_as_it_is_now_and_cannot_be_cancelled_by_the_api(tmp_path):
    from serving.errors import RequestError

    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)
    jid = bulk.job_id(spec)
    manager = _manager(tmp_path, store)
    with pytest.raises(bulk.JobCancelled):
        with records.JobRecorder(store, jid, spec.to_dict()):
            raise bulk.JobCancelled(1, 3)
    assert manager.get(jid)["status"] == manager.page()["jobs"][0]["status"] == "cancelled"  # read: now cached
    with records.JobRecorder(store, jid, spec.to_dict()) as again:  # the same command, run again
        assert manager.get(jid)["status"] == "running"
        with pytest.raises(RequestError) as refused:
            manager.cancel(jid)  # its process is not this server's: it cannot stop it
        assert (refused.value.status_code, refused.value.error) == (409, "job_runs_elsewhere")
        again.succeeded("file:///x/manifest.json", {"samples": 40, "shards": 3, "bytes": 1})
    assert manager.get(jid)["status"] == "succeeded"
    manager.ended_record_ttl_s = 0.0  # a listing re-reads records older than this
    assert manager.page()["jobs"][0]["status"] == "succeeded"
    assert manager.cancel(jid)["status"] == "succeeded"  # ended: answered as it is


def test_a_long_job_keeps_its_heartbeat_and_a_dead_one_reads_as_interrupted(tmp_path, monkeypatch):
    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)
    jid = bulk.job_id(spec)
    monkeypatch.setattr(records.JobRecorder, "heartbeat_s", 0.05)
    with records.JobRecorder(store, jid, spec.to_dict()):
        first = records.get_job(store, jid)["heartbeat_at"]
        time.sleep(0.4)
        assert records.get_job(store, jid)["heartbeat_at"] > first  # no progress, still alive
    # A runner killed mid-job (no exit): once stale, the API calls it interrupted, resumable.
    record = {**records.get_job(store, jid), "status": "running", "updated_at": "2020-01-01T00:00:00.000+00:00"}
    records.put_job(store, record)
    answered = _manager(tmp_path, store).get(jid)
    assert answered["status"] == "failed" and "re-submit the same spec to resume" in answered["error"]


def test_a_record_that_cannot_be_written_does_not_stop_the_job(tmp_path, monkeypatch):
    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)

    def refuse(*a, **kw):
        raise OSError("read-only")

    monkeypatch.setattr(records, "put_job", refuse)
    with records.JobRecorder(store, bulk.job_id(spec), spec.to_dict()) as recorder:
        recorder.succeeded("file:///x/manifest.json", {"samples": 40, "shards": 3, "bytes": 1})
    assert recorder.record["status"] == "succeeded"


def test_the_status_schema_has_exactly_the_fields_a_record_answers_with():
    from serving.api.schemas import JobStatus
    from serving.jobs import PUBLIC_FIELDS

    assert tuple(JobStatus.model_fields) == PUBLIC_FIELDS


def _live_record(store, spec, owner):
    record = records.JobRecorder(store, bulk.job_id(spec), spec.to_dict()).record
    records.put_job(store, {**record, "owner": owner, "runner": None})
    return records.get_job(store, bulk.job_id(spec))


def test_a_flow_run_of_a_spec_running_elsewhere_is_refused_leaving_that_runs_record(tmp_path):
    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)
    theirs = _live_record(store, spec, "server-host:4242:0f0f")  # a server on another host runs it now
    with pytest.raises(bulk.JobRefused, match=rf"job {bulk.job_id(spec)} \(this spec\) is running in another"):
        with records.JobRecorder(store, bulk.job_id(spec), spec.to_dict()):
            pytest.fail("entered")
    assert records.get_job(store, bulk.job_id(spec)) == theirs


def test_a_flow_run_goes_on_where_the_other_run_is_over_or_dead(tmp_path):
    import socket
    import subprocess
    import sys

    store, spec = FileStorage(tmp_path / "store"), _spec(tmp_path)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    dead_pid = int(exited.stdout)  # a run on this host killed moments ago: its record still looks fresh
    for owner in (f"{socket.gethostname()}:{dead_pid}:dead", None):
        record = _live_record(store, spec, owner or "other-host:1:x")
        if owner is None:  # the other host's run ended
            records.put_job(store, {**record, "status": "cancelled", "ended_at": record["updated_at"]})
        with records.JobRecorder(store, bulk.job_id(spec), spec.to_dict()) as recorder:
            assert records.get_job(store, bulk.job_id(spec))["owner"] == recorder.record["owner"]
            recorder.succeeded("file:///x/manifest.json", {"samples": 40, "shards": 3, "bytes": 1})
