"""Records of what the platform did (genmodels/records.py) and `genmodels status`, which reads
them with the registry without starting any server.

The retrain record is written by the library's RetrainRecorder from the step outputs the flow
passes it (no training here); `genmodels status` runs through typer's CliRunner on a temp work
dir, with untrained tiny VAEs registered in a real MLflow (sqlite).
"""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from genmodels import records
from genmodels.cli import app
from genmodels.storage import FileStorage

runner = CliRunner()


def steps(name: str, version: str, alias: str, previous: str | None, created: bool = True) -> dict:
    """What the retrain flow holds for a family after its steps (task outputs)."""
    return {
        "train": {"run": "file:///x", "epochs": 2, "best_val_loss": 1.5, "stopped_early": False, "seconds": 3.25},
        "registered": {"name": name, "version": version, "run_id": "r", "model_digest": "d", "gate_metric": "nll_nats",
                       "gate_value": 41.5, "snapshot_hash": "s", "created": created},
        "promotion": {"name": name, "version": version, "alias": alias, "previous_champion": previous,
                      "candidate_value": 41.5, "champion_value": None if previous is None else 40.0,
                      "reason": "no champion yet" if previous is None else "nll_nats 41.5 does not beat 40.0"},
    }


# --- retrain records ---------------------------------------------------------------------------------
def test_retrain_record_of_a_successful_run(tmp_path):
    store = FileStorage(tmp_path)
    with records.RetrainRecorder(store, run_id="run-1", dataset="digits", preset="quick", families=["vae", "gan"],
                                 parameters={"workers": 2}) as rec:
        rec.snapshot({"hash": "h" * 64, "prefix": "snapshots/digits/h", "sizes": {"train": 10}, "dataset": "digits"})
        rec.done("vae", steps("digits-vae", "3", "champion", "2"))
        rec.done("gan", steps("digits-gan", "1", "challenger", "1"))
    (key,) = store.list("retrains/")
    assert key.startswith("retrains/") and key.endswith("-run-1.json")
    record = store.get_json(key)
    assert rec.url == store.url_for(key)
    assert (record["status"], record["error"], record["dataset"], record["preset"]) == ("succeeded", None, "digits",
                                                                                       "quick")
    assert record["snapshot"] == {"hash": "h" * 64, "prefix": "snapshots/digits/h", "sizes": {"train": 10}}
    assert record["parameters"] == {"workers": 2}
    assert record["outcomes"]["vae"] == {
        "status": "registered", "model": "digits-vae", "version": "3", "new_version": True, "gate_metric": "nll_nats",
        "gate_value": 41.5, "alias": "champion", "promoted": True, "previous_champion": "2", "champion_value": 40.0,
        "reason": "nll_nats 41.5 does not beat 40.0", "epochs": 2, "train_seconds": 3.25}
    assert (record["outcomes"]["gan"]["alias"], record["outcomes"]["gan"]["promoted"]) == ("challenger", False)
    started, ended = records.parse_time(record["started_at"]), records.parse_time(record["ended_at"])
    assert started <= ended and record["seconds"] >= 0
    assert records.last_retrain(store) == record


def test_retrain_record_when_families_fail_and_when_the_flow_raises(tmp_path):
    store = FileStorage(tmp_path)

    class RetrainFailed(RuntimeError):
        pass

    with pytest.raises(RetrainFailed):
        with records.RetrainRecorder(store, run_id="a", dataset="digits", preset="quick",
                                     families=["vae", "mixture"]) as rec:
            rec.done("vae", steps("digits-vae", "1", "champion", "1", created=False))
            rec.failed("mixture", "ExportParityError: disagree")
            raise RetrainFailed("retrain failed for mixture")
    first = records.last_retrain(store)
    assert (first["status"], first["error"]) == ("failed", "RetrainFailed: retrain failed for mixture")
    assert first["outcomes"]["mixture"] == {"status": "failed", "error": "ExportParityError: disagree"}
    # Already the champion before this run: registered again, not promoted.
    assert (first["outcomes"]["vae"]["promoted"], first["outcomes"]["vae"]["new_version"]) == (False, False)

    time.sleep(0.002)  # keys carry milliseconds
    with pytest.raises(OSError):
        with records.RetrainRecorder(store, run_id="b", dataset="digits", preset="quick", families=["vae"]):
            raise OSError("source unreadable")
    second = records.last_retrain(store)
    assert second["run_id"] == "b" and second["outcomes"] == {"vae": {"status": "not_run"}}
    assert [r["run_id"] for r in records.list_retrains(store)] == ["b", "a"]


def test_families_skipped_for_an_existing_champion_make_a_successful_record(tmp_path):
    store = FileStorage(tmp_path)
    with records.RetrainRecorder(store, run_id="c", dataset="digits", preset="quick", families=["vae"]) as rec:
        rec.skipped("vae", "a champion exists (if_no_champion)")
    assert records.last_retrain(store)["status"] == "succeeded"


def test_a_record_that_cannot_be_written_does_not_replace_the_outcome(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with records.RetrainRecorder(FileStorage(tmp_path / "file"), run_id="d", dataset="digits", preset="quick",
                                 families=[]) as rec:
        pass
    assert rec.url is None and rec.record["status"] == "succeeded"


def test_retrain_keys_sort_in_the_order_runs_ended():
    keys = [records.retrain_key(t, "r/../x") for t in
            ("2026-11-24T09:30:00.001+00:00", "2026-11-24T10:00:00.500+01:00", "2026-11-24T09:00:00.000+00:00")]
    assert keys[2] == "retrains/20261124T090000.000Z-r----x.json"
    assert keys[1] == "retrains/20261124T090000.500Z-r----x.json"  # 10:00:00.5+01:00 in UTC
    assert sorted(keys) == [keys[2], keys[1], keys[0]]


def retrain(run_id: str, ended_at: str) -> dict:
    """A retrain record as RetrainRecorder writes it (less the format, which put_retrain adds)."""
    return {"run_id": run_id, "dataset": "digits", "preset": "quick", "families": ["vae"], "parameters": {},
            "started_at": "2026-11-24T08:00:00.000+00:00", "ended_at": ended_at, "status": "succeeded",
            "error": None, "snapshot": None, "seconds": 1.0,
            "outcomes": {"vae": {"status": "skipped", "reason": "a champion exists (if_no_champion)"}}}


def test_unreadable_retrain_records_are_skipped(tmp_path):
    store = FileStorage(tmp_path)
    records.put_retrain(store, retrain("good", "2026-11-24T09:00:00+00:00"))
    store.put_bytes("retrains/20261125T000000.000Z-bad.json", b"{not json")
    assert records.last_retrain(store)["run_id"] == "good"
    assert records.last_retrain(FileStorage(tmp_path / "fresh")) is None


def test_foreign_json_under_retrains_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    store = FileStorage(tmp_path)
    records.put_retrain(store, retrain("real", "2026-11-24T09:00:00.000+00:00"))
    later = "retrains/20991231T000000.000Z-x.json"  # keys that sort first: each would be "the last retrain"
    foreign = {
        "retrains/notes.json": {"hello": "world"},  # a note, another tool's file: not a record's key
        later: {"format": "genmodels.retrain/2", "status": "succeeded"},  # a format this code cannot read
    }
    for key, body in foreign.items():
        store.put_json(key, body)
    assert records.last_retrain(store)["run_id"] == "real"
    for key in foreign:
        assert store.url_for(key) in caplog.text
    for broken in ({"status": "finished"},  # fields a reader takes as there, missing or malformed
                   {"outcomes": {"vae": {"status": "registered"}}},
                   {"dataset": None}, {"seconds": None}, {"ended_at": None}):
        store.put_json(later, {"format": records.RETRAIN_RECORD_FORMAT,
                               **retrain("x", "2099-12-31T00:00:00.000+00:00"), **broken})
        assert [r["run_id"] for r in records.list_retrains(store)] == ["real"], broken
        assert records.last_retrain(store)["run_id"] == "real", broken


def test_a_running_retrain_is_recorded_with_a_heartbeat_and_ends_in_one_record(tmp_path, monkeypatch):
    store = FileStorage(tmp_path)
    monkeypatch.setattr(records.RetrainRecorder, "heartbeat_s", 0.05)
    with records.RetrainRecorder(store, run_id="r", dataset="digits", preset="quick",
                                 families=["vae", "gan"]) as rec:
        running = records.last_retrain(store)
        assert (running["status"], running["ended_at"], running["run_id"]) == ("running", None, "r")
        assert running["outcomes"] == {"vae": {"status": "pending"}, "gan": {"status": "pending"}}
        assert not records.is_stale(running)
        rec.snapshot({"hash": "h", "prefix": "snapshots/digits/h", "sizes": {}})
        rec.done("vae", steps("digits-vae", "3", "champion", "2"))
        deadline = time.monotonic() + 10
        while records.last_retrain(store)["outcomes"]["gan"]["status"] != "running":  # the heartbeat's rewrite
            assert time.monotonic() < deadline, records.last_retrain(store)
            time.sleep(0.02)
        beat = records.last_retrain(store)
        assert beat["outcomes"]["vae"]["promoted"] and beat["updated_at"] >= running["updated_at"]
        rec.done("gan", steps("digits-gan", "1", "champion", None))
    (key,) = store.list("retrains/")  # the running record gave way to the outcome
    assert records.last_retrain(store)["status"] == "succeeded" and key == records.retrain_key(
        records.last_retrain(store)["ended_at"], "r")


def test_a_retrain_stopped_by_ctrl_c_reads_interrupted_at_the_family_it_was_at(tmp_path):
    store = FileStorage(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with records.RetrainRecorder(store, run_id="r", dataset="digits", preset="quick",
                                     families=["vae", "gan", "mixture"]) as rec:
            rec.snapshot({"hash": "h", "prefix": "snapshots/digits/h", "sizes": {}})
            rec.done("vae", steps("digits-vae", "3", "champion", "2"))
            raise KeyboardInterrupt  # while training gan
    record = records.last_retrain(store)
    assert (record["status"], record["error"]) == ("interrupted", "interrupted (KeyboardInterrupt)")
    assert {f: o["status"] for f, o in record["outcomes"].items()} == {
        "vae": "registered", "gan": "interrupted", "mixture": "not_run"}
    assert record["outcomes"]["gan"]["error"] == "interrupted (KeyboardInterrupt)"
    assert len(store.list("retrains/")) == 1


def test_a_retrain_killed_outright_leaves_a_running_record_that_reads_interrupted_once_stale(tmp_path):
    from genmodels.status import read_retrain

    store = FileStorage(tmp_path)
    rec = records.RetrainRecorder(store, run_id="r", dataset="digits", preset="quick", families=["vae", "gan"])
    rec.__enter__()
    rec._heartbeat.stop()  # SIGKILL: neither the heartbeat nor __exit__ runs again
    rec.snapshot({"hash": "h", "prefix": "snapshots/digits/h", "sizes": {}})
    rec._write_running()  # its last heartbeat: gan in progress
    left = records.last_retrain(store)
    assert read_retrain(left)["status"] == "running" and read_retrain(left)["stale"] is False
    later = records.parse_time(left["updated_at"]).timestamp() + records.STALE_AFTER_S + 1
    seen = read_retrain(left, now=later)
    assert (seen["status"], seen["stale"]) == ("interrupted", True) and "no heartbeat since" in seen["error"]
    assert {f: o["status"] for f, o in seen["outcomes"].items()} == {"vae": "interrupted", "gan": "not_run"}


# --- job records -----------------------------------------------------------------------------------
def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def job(jid: str, status: str, submitted: str, updated_ago: float = 0.0) -> dict:
    return {"job_id": jid, "status": status, "done": 10, "total": 40, "model": "digits-vae", "version": "1",
            "output": f"file:///tmp/{jid}", "cancel_requested": False, "submitted_at": submitted,
            "updated_at": _ago(updated_ago), "spec": {"n": 40}, "owner": "host:1:abc"}


def test_job_records_round_trip_newest_submission_first(tmp_path):
    store = FileStorage(tmp_path)
    written = [job("aa", "succeeded", "2026-11-24T09:00:00.000+00:00"),
               job("bb", "running", "2026-11-24T11:00:00.000+00:00"),
               job("cc", "failed", "2026-11-24T10:00:00.000+00:00")]
    for record in written:
        records.put_job(store, record)
    assert records.get_job(store, "bb") == {"format": records.JOB_RECORD_FORMAT, **written[1]}
    assert [j["job_id"] for j in records.list_jobs(store)] == ["bb", "cc", "aa"]
    assert [j["job_id"] for j in records.list_jobs(store, skip_ids={"cc"})] == ["bb", "aa"]
    assert records.get_job(store, "dd") is None
    for impossible in ("../x", "a/b", "", "x" * 129):
        assert records.get_job(store, impossible) is None
        with pytest.raises(ValueError, match="job ids are"):
            records.put_job(store, job(impossible, "queued", "t"))


def test_a_job_record_without_the_fields_readers_need_is_skipped(tmp_path, caplog):
    store = FileStorage(tmp_path)
    records.put_job(store, job("aa", "running", "2026-11-24T09:00:00.000+00:00"))
    for field in ("model", "version", "done", "total", "output"):
        broken = job("bb", "running", "2026-11-24T10:00:00.000+00:00")
        del broken[field]
        records.put_job(store, broken)
        assert [j["job_id"] for j in records.list_jobs(store)] == ["aa"], field
        assert f"no valid {field}" in caplog.text


def test_a_running_record_without_heartbeat_is_stale():
    assert not records.is_stale(job("a", "running", "t", updated_ago=records.HEARTBEAT_S))
    assert records.is_stale(job("a", "running", "t", updated_ago=records.STALE_AFTER_S + 5))
    assert records.is_stale({**job("a", "queued", "t"), "updated_at": "garbage"})
    assert not records.is_stale(job("a", "succeeded", "t", updated_ago=10 * records.STALE_AFTER_S))


# --- genmodels status ------------------------------------------------------------------------------
@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path / "w"))
    monkeypatch.delenv("GENMODELS_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables at full width: assertions see whole cells
    return tmp_path / "w"


def test_status_on_a_fresh_work_dir_says_there_is_nothing_yet_and_creates_nothing(work):
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "no models yet" in result.stdout
    assert "no retrain recorded yet" in result.stdout and "no queued or running bulk jobs" in result.stdout
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == {"storage": (work / "store").resolve().as_uri(),
                      "tracking_uri": f"sqlite:///{(work / 'mlflow.db').resolve()}",
                      "models": [], "last_retrain": None, "jobs": [], "job_counts": {}, "errors": {}}
    assert not work.exists()


@pytest.fixture
def registered(work, monkeypatch):
    """digits-vae v1 champion (nll 30) and v2 challenger (nll 35), digits-gan with no alias."""
    import torch

    from genmodels import registry
    from genmodels.export import export_sampler
    from genmodels.models import build_model
    from genmodels.models.base import ImageSpec

    monkeypatch.setenv("GENMODELS_GIT_COMMIT", "0123456789abcdef")
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    uri = registry.configure(None, f"sqlite:///{work.resolve() / 'mlflow.db'}")
    image = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3)
    for seed, nll in ((0, 30.0), (1, 35.0)):
        torch.manual_seed(seed)
        model = build_model("vae", image, latent_dim=3, hidden=(16,)).eval()
        paths = export_sampler(model, work / f"onnx{seed}", likelihood=False)
        checkpoint = io.BytesIO()
        torch.save({"family": "vae", "weights": model.state_dict()}, checkpoint)
        reg = registry.register(dataset="digits", family="vae", preset="quick", checkpoint=checkpoint.getvalue(),
                                onnx_files=paths, metrics={"nll_nats": nll}, params={}, snapshot_hash="0" * 64,
                                artifact_root=(work / "mlflow").resolve().as_uri())
        registry.promote(reg.name, reg.version)
    from mlflow import MlflowClient

    MlflowClient().create_registered_model("digits-gan")
    return uri


def test_status_shows_champions_the_last_retrain_and_running_jobs(work, registered):
    store = FileStorage(work / "store")
    with records.RetrainRecorder(store, run_id="flow-7", dataset="digits", preset="quick",
                                 families=["vae", "mixture"]) as rec:
        rec.done("vae", steps("digits-vae", "2", "challenger", "1"))
        rec.failed("mixture", "ExportParityError: ONNX and torch disagree")
    records.put_job(store, job("a" * 32, "running", "2026-11-24T11:00:00.000+00:00"))
    records.put_job(store, job("b" * 32, "queued", "2026-11-24T10:00:00.000+00:00",
                               updated_ago=records.STALE_AFTER_S + 60))
    records.put_job(store, job("c" * 32, "succeeded", "2026-11-24T09:00:00.000+00:00"))

    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tracking_uri"] == registered and report["errors"] == {}
    gan, vae = report["models"]
    assert (vae["name"], vae["versions"], gan) == ("digits-vae", 2, {"name": "digits-gan", "versions": 0,
                                                                    "champion": None, "challenger": None})
    assert {k: vae["champion"][k] for k in ("version", "gate_metric", "gate_value")} == \
           {"version": "1", "gate_metric": "nll_nats", "gate_value": 30.0}
    assert (vae["challenger"]["version"], vae["challenger"]["gate_value"]) == ("2", 35.0)
    assert report["last_retrain"] == records.last_retrain(store)
    assert report["last_retrain"]["status"] == "failed"
    assert [(j["job_id"][0], j["status"], j["stale"]) for j in report["jobs"]] == [("a", "running", False),
                                                                                  ("b", "queued", True)]
    assert report["job_counts"] == {"running": 1, "queued": 1, "succeeded": 1}

    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    vae_row = next(line for line in text.splitlines() if "digits-vae" in line and "nll_nats 30.0000" in line)
    assert "v1" in vae_row and "v2 (nll_nats 35.0000)" in vae_row
    assert "last retrain failed" in text and "run flow-7" in text
    assert "ExportParityError: ONNX and torch disagree" in text
    assert "a" * 12 in text and "b" * 12 in text and "no heartbeat" in text and "c" * 12 not in text


def test_status_reports_an_unreachable_registry_and_still_shows_the_rest(work, monkeypatch, closed_port):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert set(report["errors"]) == {"models"} and str(closed_port) in report["errors"]["models"]
    assert report["jobs"] == [] and report["last_retrain"] is None


@pytest.mark.parametrize("out", ["s4://bucket/x", "file://host/x"], ids=["unknown-scheme", "relative-file-url"])
def test_status_with_a_malformed_out_is_the_users_error_exit_2_naming_it(work, out):
    # It was reported as a storage that "cannot be read", exit 1: what a storage outage gets.
    result = runner.invoke(app, ["status", "--out", out])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith(f"error: {out!r}: ") and "cannot read" not in said, said


def test_status_on_a_storage_root_that_is_a_file_reports_it_exit_1(work, tmp_path):
    # It printed "no retrain recorded yet / no queued or running bulk jobs" and exited 0.
    root = tmp_path / "store_is_a_file"
    root.write_bytes(b"not a folder")
    result = runner.invoke(app, ["status", "--json", "--out", str(root)])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert {"last_retrain", "jobs"} <= set(report["errors"])
    assert "storage root exists but is not a directory" in report["errors"]["jobs"]
    assert root.read_bytes() == b"not a folder"


def test_status_prints_a_running_retrain_with_its_start(work):
    store = FileStorage(work / "store")
    with records.RetrainRecorder(store, run_id="r", dataset="digits", preset="quick", families=["vae"]):
        result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.stdout.splitlines() if l.startswith("last retrain"))
    assert "running started " in line and "None" not in line, line
