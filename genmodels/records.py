"""What the platform did, as small JSON records in its object store (``Settings().storage_url``):

    jobs/<job id>.json                          a bulk job's last known state (serving's Jobs deployment,
                                                or the generate flow through JobRecorder)
    retrains/<UTC end time>-<run id>.json       the outcome of one retrain flow run; while it runs,
                                                a ``running`` record under its start time instead

Each record is written with one atomic put (:meth:`genmodels.storage.Storage.put_json`), so a
reader sees the previous state or the next, never a mix. Readers need no server: the Jobs
deployment reads job records back after a restart, ``genmodels status`` reads both kinds.

Times are ISO 8601 UTC strings (``2026-11-24T23:40:01.123+00:00``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from genmodels.registry import ALREADY_CHAMPION
from genmodels.storage import Storage, open_storage

__all__ = [
    "HEARTBEAT_S", "JOBS", "RETRAINS", "STALE_AFTER_S", "JobRecorder", "RetrainRecorder", "get_job", "interrupted",
    "is_stale", "job_error", "last_retrain",
    "list_jobs", "list_retrains", "put_job", "put_retrain", "retrain_key", "utc_now",
]

logger = logging.getLogger(__name__)

JOBS, RETRAINS = "jobs/", "retrains/"
JOB_RECORD_FORMAT, RETRAIN_RECORD_FORMAT = "genmodels.job-record/1", "genmodels.retrain/1"
ACTIVE_JOB_STATUSES = ("queued", "running")
#: A running job's record is rewritten at least this often, progress or not.
HEARTBEAT_S = 30.0
#: A queued/running record not rewritten for this long: whoever ran it has most likely stopped.
STALE_AFTER_S = 4 * HEARTBEAT_S
# Job ids are hex digests; anything else (a path, "..") can never name a record.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_READERS = 8


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _storage(storage: Storage | str) -> Storage:
    return open_storage(storage) if isinstance(storage, str) else storage


def prefix_url(storage: Storage, prefix: str) -> str:
    """The URL of a "directory" of records (``url_for`` takes object keys only)."""
    return f"{storage.url.rstrip('/')}/{prefix}"


def _read_all_keyed(storage: Storage, keys: Iterable[str]) -> list[dict[str, Any] | None]:
    """The record at each of ``keys``, None where missing or unreadable (not JSON, not an
    object: with a warning)."""
    keys = list(keys)

    def read(key: str) -> dict[str, Any] | None:
        try:
            record = storage.get_json(key)
        except FileNotFoundError:
            return None  # no such record, or deleted since it was listed
        except ValueError as exc:
            logger.warning("skipping record %s: %s", storage.url_for(key), exc)
            return None
        if not isinstance(record, dict):
            logger.warning("skipping record %s: not a JSON object", storage.url_for(key))
            return None
        return record

    if len(keys) <= 1:
        return [read(k) for k in keys]
    # One GET per record: on S3 the round trips, not the bytes, are the cost.
    with ThreadPoolExecutor(max_workers=min(_READERS, len(keys)), thread_name_prefix="genmodels-records") as pool:
        return list(pool.map(read, keys))


def _read_all(storage: Storage, keys: Iterable[str]) -> list[dict[str, Any]]:
    """The records at ``keys``, in order; missing ones are left out, unreadable ones (not JSON,
    not an object) too, with a warning: one bad record must not hide the others."""
    return [r for r in _read_all_keyed(storage, keys) if r is not None]


# --- bulk jobs ---------------------------------------------------------------------------------
def job_key(job_id: str) -> str | None:
    """``jobs/<id>.json``, or None for a string that cannot be a job id."""
    return f"{JOBS}{job_id}.json" if isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) else None


def put_job(storage: Storage | str, record: Mapping[str, Any]) -> None:
    key = job_key(record["job_id"])
    if key is None:
        raise ValueError(f"job_id {record['job_id']!r}: job ids are 1-128 letters, digits, '_' or '-'")
    _storage(storage).put_json(key, {"format": JOB_RECORD_FORMAT, **record})


def get_job(storage: Storage | str, job_id: str) -> dict[str, Any] | None:
    """The job's record, or None when there is none (or the id cannot be one)."""
    key = job_key(job_id)
    if key is None:
        return None
    found = _read_all(_storage(storage), [key])
    return found[0] if found else None


def list_jobs(storage: Storage | str, skip_ids: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every readable job record, most recently submitted first. ``skip_ids``: job ids the
    caller already holds (not read again)."""
    storage = _storage(storage)
    skip = {job_key(j) for j in skip_ids}
    keys = [k for k in storage.list(JOBS) if k.endswith(".json") and "/" not in k[len(JOBS):] and k not in skip]
    return sort_jobs(r for r in _read_all(storage, keys) if _is_job_record(storage, r))


_JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


# Besides job_id, status and submitted_at: what every writer (JobRecorder, serving's Jobs
# deployment) puts in a record and its readers (`genmodels status`, GET /v1/jobs) take as there.
_JOB_FIELDS = {"model": str, "version": str, "output": str, "done": int, "total": int}


def _is_job_record(storage: Storage, record: Mapping[str, Any]) -> bool:
    # A record someone wrote by hand (or a half-migrated one) must not break a listing of the others.
    jid, status = record.get("job_id"), record.get("status")
    bad = [k for k, kind in _JOB_FIELDS.items()
           if not isinstance(record.get(k), kind) or isinstance(record.get(k), bool)]
    if job_key(jid) is None or status not in _JOB_STATUSES or not isinstance(record.get("submitted_at") or "", str):
        bad[:0] = ["job_id, status or submitted_at"]
    if bad:
        logger.warning("skipping job record %r under %s: no valid %s", jid if isinstance(jid, str) else None,
                       prefix_url(storage, JOBS), ", ".join(bad))
        return False
    return True


def sort_jobs(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return sorted((dict(r) for r in records),
                  key=lambda r: (str(r.get("submitted_at") or ""), str(r.get("job_id", ""))), reverse=True)


class _Heartbeat:
    """Calls ``write`` every ``interval_s`` from a daemon thread until :meth:`stop`: a record
    rewritten while its writer lives, so a reader tells a live run from one whose process died
    (:func:`is_stale`) even when the run itself has nothing new to say for a long while."""

    def __init__(self, write, interval_s: float, name: str) -> None:
        self._write, self._interval_s = write, interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self._write()

    def stop(self) -> None:
        # Joined, so that no heartbeat write can land after (and undo) the final one.
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()


class JobRecorder:
    """The record of a bulk job run outside the serving API (the generate flow, the CLI), in the
    same form as the Jobs deployment writes, so ``genmodels status`` and ``GET /v1/jobs`` list it:
    ``running`` on entry, rewritten on progress (at most every :attr:`progress_interval_s`) and
    every :data:`HEARTBEAT_S` (a long shard reports no progress for a while), ended on exit:
    ``succeeded`` after :meth:`succeeded`, ``cancelled`` on a job cancelled or a process stopped
    (any ``BaseException`` that is not an ``Exception``: ``KeyboardInterrupt``, Prefect's
    ``TerminationSignal`` on SIGTERM, ``SystemExit``), ``failed`` on any other exception (which
    propagates). A record that cannot be written is logged, never raised: the job's own outcome
    comes first.

    ``spec``: the resolved job spec as a dict (``JobSpec.to_dict()``); ``job_id``: its id
    (``genmodels.bulk.job_id``), the one the API gives the same spec.
    """

    progress_interval_s: float = 5.0
    heartbeat_s: float = HEARTBEAT_S

    def __init__(self, storage: Storage | str, job_id: str, spec: Mapping[str, Any], *, runner: str = "generate") -> None:
        if job_key(job_id) is None:
            raise ValueError(f"job_id {job_id!r}: job ids are 1-128 letters, digits, '_' or '-'")
        self.storage = _storage(storage)
        now = utc_now()
        self.record: dict[str, Any] = {
            "job_id": job_id, "status": "running", "done": 0, "total": int(spec["n"]), "model": spec["model"],
            "version": str(spec["version"]), "output": spec["output"], "cancel_requested": False,
            "submitted_at": now, "started_at": now, "updated_at": now, "ended_at": None, "heartbeat_at": now,
            "retries": 0, "spec": dict(spec), "runner": runner,
            "owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        }
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._heartbeat: _Heartbeat | None = None

    def _write(self) -> None:
        with self._lock:  # one write at a time, each of the state at that moment
            r = self.record
            r["updated_at"] = utc_now()
            if r["status"] == "running":
                r["heartbeat_at"] = r["updated_at"]
            self._last_write = time.monotonic()
            try:
                put_job(self.storage, r)
            except Exception as exc:  # noqa: BLE001 - the job runs on without its record
                logger.warning("job %s: cannot record its state (%s) in %s: %r", r["job_id"], r["status"],
                               prefix_url(self.storage, JOBS), exc)

    def progress(self, done: int, total: int) -> None:
        self.record["done"] = int(done)
        if time.monotonic() - self._last_write >= self.progress_interval_s:
            self._write()

    def event(self, kind: str, detail: Mapping[str, Any]) -> None:
        """``run_job``'s ``on_event``: the writers placed, the shards retried."""
        if kind == "writers":
            self.record["writers"] = detail["count"]
        elif kind == "retry":
            self.record["retries"] += 1
        self._write()

    def succeeded(self, manifest_url: str, totals: Mapping[str, Any]) -> None:
        self.record["result"] = {"manifest": manifest_url, "totals": dict(totals)}
        self.record["done"] = int(totals["samples"])

    def __enter__(self) -> JobRecorder:
        from genmodels.bulk import JobRefused  # here: records stay importable without numpy/onnx

        r = self.record
        # Before the first write: a record of the run going on elsewhere is that run's, not ours to replace.
        if run_elsewhere(get_job(self.storage, r["job_id"]), r["owner"]):
            raise JobRefused(f"job {r['job_id']} (this spec) is running in another process (a server or another "
                             "`genmodels generate`); wait for it to end, or stop it there. Its shards are the same, "
                             "so running it here would only write them twice")
        self._write()
        self._heartbeat = _Heartbeat(self._write, self.heartbeat_s,
                                     f"genmodels-job-{self.record['job_id'][:8]}-heartbeat")
        self._heartbeat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from genmodels.bulk import JobCancelled  # here: records stay importable without numpy/onnx

        if self._heartbeat is not None:
            self._heartbeat.stop()
        r = self.record
        if exc is None:
            r["status"] = "succeeded" if "result" in r else "failed"
            if "result" not in r:
                r["error"] = "ended without a manifest"
        elif isinstance(exc, JobCancelled):
            r["status"], r["cancel_requested"] = "cancelled", True
            r["error"] = str(exc)
        elif not isinstance(exc, Exception):
            # Ctrl-C, a SIGTERM (Prefect raises TerminationSignal), sys.exit: the process was
            # stopped, the job did not fail; its written shards stay and a re-run resumes them.
            r["status"], r["cancel_requested"] = "cancelled", True
            r["error"] = f"{interrupted(exc)}; re-running the same command resumes the job"
        else:
            r["status"], r["error"] = "failed", job_error(exc, r["job_id"])
        r["ended_at"] = utc_now()
        self._write()


def interrupted(exc: BaseException) -> str:
    """The text a record gives a stop that is no error (``KeyboardInterrupt()`` has none of its own)."""
    return f"interrupted ({type(exc).__name__})"


def job_error(exc: BaseException, job_id: str, log: logging.Logger = logger) -> str:
    """What a failed job's record says of ``exc``; its details go to ``log``.

    A record is answered to API clients, so it carries the message of a refusal they can act on
    (:class:`genmodels.bulk.JobRefused`: an output holding another job, labels the model lacks) and
    of nothing else: a storage or worker fault's text names endpoints, hosts, process ids and source
    paths, and any other ``ValueError`` is the server's (a graph that does not load, a bug). Those
    get an error id that the log line carries beside the traceback."""
    from genmodels.bulk import JobRefused  # here: records stay importable without numpy/onnx

    # A Ray task's error wraps the writer's own (``cause``) in a text with the remote traceback.
    while isinstance(getattr(exc, "cause", None), BaseException) and exc.cause is not exc:
        exc = exc.cause
    if isinstance(exc, JobRefused):
        log.info("job %s refused: %s", job_id, exc)
        return str(exc)
    error_id = uuid.uuid4().hex[:16]
    log.warning("job %s failed (error id %s)", job_id, error_id, exc_info=exc)
    return f"{type(exc).__name__}: the job failed on the server side (error id {error_id}; the log has its details)"


def is_stale(record: Mapping[str, Any], now: float | None = None) -> bool:
    """A queued/running record (a job's or a retrain's) its writer has not refreshed for
    :data:`STALE_AFTER_S`: the process running it has most likely stopped (a live one rewrites
    it every :data:`HEARTBEAT_S`)."""
    if record.get("status") not in ACTIVE_JOB_STATUSES:
        return False
    try:
        updated = parse_time(record["updated_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return True
    return (time.time() if now is None else now) - updated > STALE_AFTER_S


def run_elsewhere(record: Mapping[str, Any] | None, owner: str) -> bool:
    """Whether ``record`` is of a job that another process is running now: queued or running,
    refreshed within :data:`STALE_AFTER_S`, by an owner other than ``owner``. An owner on this
    host whose process has exited (a run killed moments ago) runs nothing."""
    if record is None or record.get("status") not in ACTIVE_JOB_STATUSES or is_stale(record):
        return False
    other = str(record.get("owner") or "")
    if other == owner:
        return False
    host, _, rest = other.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except OSError:  # alive, another user's
            pass
    return True


# --- retrains ------------------------------------------------------------------------------------
#: ``running`` while the flow runs (rewritten every HEARTBEAT_S); ``interrupted``: stopped by a
#: signal or Ctrl-C (a stale ``running`` record reads so too: its process died).
RETRAIN_STATUSES = ("running", "succeeded", "failed", "interrupted")
# What retrain_key writes; anything else under retrains/ (a note, another tool's file) is no record.
_RETRAIN_KEY = re.compile(re.escape(RETRAINS) + r"\d{8}T\d{6}\.\d{3}Z-[A-Za-z0-9_-]{1,64}\.json")
# What a reader (`genmodels status`) takes from a family's outcome when it says "registered".
_REGISTERED_FIELDS = ("model", "version", "new_version", "gate_metric", "gate_value", "alias", "promoted")


def retrain_key(ended_at: str, run_id: str) -> str:
    """``retrains/<YYYYmmddTHHMMSS.fffZ>-<run id>.json``: keys sort in the order runs ended (a
    running retrain's record: in the order it started)."""
    stamp = parse_time(ended_at).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:64] or "run"
    return f"{RETRAINS}{stamp}-{safe}.json"


def _retrain_record_key(record: Mapping[str, Any]) -> str:
    return retrain_key(record.get("ended_at") or record["started_at"], record["run_id"])


def put_retrain(storage: Storage | str, record: Mapping[str, Any]) -> str:
    """Write a retrain record (under its end time; a running one under its start time); its URL."""
    storage = _storage(storage)
    key = _retrain_record_key(record)
    storage.put_json(key, {"format": RETRAIN_RECORD_FORMAT, **record})
    return storage.url_for(key)


def _retrain_problem(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` is not a retrain record a reader can show (None when it is one)."""
    if record.get("format") != RETRAIN_RECORD_FORMAT:
        return f"format {record.get('format')!r}, not {RETRAIN_RECORD_FORMAT!r}"
    if record.get("status") not in RETRAIN_STATUSES:
        return f"status {record.get('status')!r}"
    bad = [k for k in ("run_id", "dataset", "preset", "started_at") if not isinstance(record.get(k), str)]
    if not isinstance(record.get("ended_at"), str) and not (record["status"] == "running"
                                                            and record.get("ended_at") is None):
        bad.append("ended_at")
    seconds = record.get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        bad.append("seconds")
    outcomes = record.get("outcomes")
    if not isinstance(outcomes, dict):
        bad.append("outcomes")
    else:
        for family, o in outcomes.items():
            if not isinstance(o, dict) or not isinstance(o.get("status"), str) or (
                    o["status"] == "registered" and (any(k not in o for k in _REGISTERED_FIELDS)
                                                     or not isinstance(o["gate_value"], (int, float)))):
                bad.append(f"outcomes.{family}")
    return f"missing or malformed {', '.join(bad)}" if bad else None


def _read_retrains(storage: Storage, keys: list[str], seen: set[tuple[Any, Any]]) -> list[dict[str, Any]]:
    out = []
    for key, record in zip(keys, _read_all_keyed(storage, keys)):
        if record is None:
            continue
        problem = _retrain_problem(record)
        if problem:
            logger.warning("skipping retrain record %s: %s", storage.url_for(key), problem)
            continue
        run = (record["run_id"], record["started_at"])
        if record["status"] == "running" and run in seen:
            continue  # its final record (a newer key, read first) is written; removing this one failed
        seen.add(run)
        out.append(record)
    return out


def list_retrains(storage: Storage | str, limit: int | None = None) -> list[dict[str, Any]]:
    """Retrain records, the most recently ended (running ones: started) first (at most ``limit``).
    Objects under ``retrains/`` that are no retrain record (another key form, another format,
    fields a reader needs missing) are skipped with a warning naming them: a foreign file must
    neither become "the last retrain" nor break the listing."""
    storage = _storage(storage)
    keys = []
    for k in storage.list(RETRAINS):
        if _RETRAIN_KEY.fullmatch(k):
            keys.append(k)
        else:
            logger.warning("skipping %s: not a retrain record's key", storage.url_for(k))
    keys.sort(reverse=True)
    seen: set[tuple[Any, Any]] = set()
    if limit is None:
        return _read_retrains(storage, keys, seen)
    out: list[dict[str, Any]] = []
    for start in range(0, len(keys), limit):  # skipped records: read on until `limit`
        out.extend(_read_retrains(storage, keys[start:start + limit], seen))
        if len(out) >= limit:
            break
    return out[:limit]


def last_retrain(storage: Storage | str) -> dict[str, Any] | None:
    found = list_retrains(storage, limit=1)
    return found[0] if found else None


def family_outcome(step_outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A family's entry in the record, from the retrain flow's outputs of its steps
    (``train``, ``registered``, ``promotion``: the dicts the pipeline tasks return)."""
    reg, promo, train = step_outputs["registered"], step_outputs["promotion"], step_outputs.get("train") or {}
    return {
        "status": "registered",
        "model": reg["name"], "version": str(reg["version"]), "new_version": bool(reg["created"]),
        "gate_metric": reg["gate_metric"], "gate_value": reg["gate_value"],
        "alias": promo["alias"],
        # Newly champion: already holding the alias before this run is not a promotion. A version
        # registered by an earlier run that finds itself champion ("already the champion", naming
        # the one it replaced back then) was promoted by that run; one this run registered was
        # promoted by this run's first try (a retried promotion step).
        "promoted": promo["alias"] == "champion" and promo.get("previous_champion") != str(reg["version"])
                    and not (promo.get("reason") == ALREADY_CHAMPION and not reg["created"]),
        "previous_champion": promo.get("previous_champion"), "champion_value": promo.get("champion_value"),
        "reason": promo.get("reason"),
        "epochs": train.get("epochs"), "train_seconds": train.get("seconds"),
    }


class RetrainRecorder:
    """One retrain's record: ``running`` from the start of the ``with`` block (under its start
    time, rewritten every :attr:`heartbeat_s` with the families done and the one in progress, so
    that a retrain killed outright leaves a record that goes stale), then its outcome when the
    block ends, whether it returns or raises (under its end time; the running record is removed).
    Stopped by Ctrl-C or a signal (a ``BaseException`` that is not an ``Exception``), it reads
    ``interrupted``, and so does the family it was at. A record that cannot be written is logged,
    never raised: it must not replace the retrain's own outcome."""

    heartbeat_s: float = HEARTBEAT_S

    def __init__(self, storage: Storage | str, *, run_id: str, dataset: str, preset: str, families: Iterable[str],
                 parameters: Mapping[str, Any] | None = None) -> None:
        self.storage = _storage(storage)
        self.record: dict[str, Any] = {
            "run_id": run_id, "dataset": dataset, "preset": preset, "families": list(families),
            "parameters": dict(parameters or {}), "started_at": utc_now(), "ended_at": None,
            "status": None, "error": None, "snapshot": None,
            "outcomes": {},
        }
        self.url: str | None = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()  # the heartbeat thread reads what the flow's thread writes
        self._heartbeat: _Heartbeat | None = None

    def snapshot(self, snapshot: Mapping[str, Any]) -> None:
        with self._lock:
            self.record["snapshot"] = {k: snapshot[k] for k in ("hash", "prefix", "sizes") if k in snapshot}

    def done(self, family: str, step_outputs: Mapping[str, Any]) -> None:
        outcome = family_outcome(step_outputs)
        with self._lock:
            self.record["outcomes"][family] = outcome

    def failed(self, family: str, error: str) -> None:
        with self._lock:
            self.record["outcomes"][family] = {"status": "failed", "error": error}

    def skipped(self, family: str, why: str) -> None:
        with self._lock:
            self.record["outcomes"][family] = {"status": "skipped", "reason": why}

    def _in_progress(self) -> str | None:
        # The flow takes the families in order once the data is prepared, and gives each an
        # outcome as it ends: the one it is at is the first without one (none before the data).
        if self.record["snapshot"] is None:
            return None
        return next((f for f in self.record["families"] if f not in self.record["outcomes"]), None)

    def _write_running(self) -> None:
        with self._lock:
            r, current = self.record, self._in_progress()
            now = utc_now()
            outcomes = {f: r["outcomes"].get(f) or {"status": "running" if f == current else "pending"}
                        for f in dict.fromkeys([*r["families"], *r["outcomes"]])}
            body = {**r, "status": "running", "outcomes": outcomes, "updated_at": now, "heartbeat_at": now,
                    "seconds": round(time.monotonic() - self._t0, 3)}
            try:
                put_retrain(self.storage, body)
            except Exception as exc:  # noqa: BLE001 - the retrain runs on without its record
                logger.warning("could not record the running retrain under %s: %r",
                               prefix_url(self.storage, RETRAINS), exc)

    def __enter__(self) -> RetrainRecorder:
        self._write_running()
        self._heartbeat = _Heartbeat(self._write_running, self.heartbeat_s,
                                     f"genmodels-retrain-{self.record['run_id'][:8]}-heartbeat")
        self._heartbeat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        r = self.record
        outcomes = r["outcomes"]
        stopped = exc is not None and not isinstance(exc, Exception)  # Ctrl-C, SIGTERM, sys.exit
        if exc is not None:
            # KeyboardInterrupt() has no text of its own: the record still says what happened.
            text = str(exc)
            if stopped:
                r["error"] = interrupted(exc) + (f": {text}" if text else "")
            else:
                r["error"] = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            current = self._in_progress()
            if current is not None:
                outcomes[current] = {"status": "interrupted" if stopped else "failed", "error": r["error"]}
        for family in r["families"]:
            # Reached by no step: the flow stopped before it (data preparation failed...).
            outcomes.setdefault(family, {"status": "not_run"})
        failed = any(o["status"] != "registered" and o["status"] != "skipped" for o in outcomes.values())
        r["status"] = "interrupted" if stopped else "failed" if exc is not None or failed else "succeeded"
        r["ended_at"] = utc_now()
        r["seconds"] = round(time.monotonic() - self._t0, 3)
        try:
            self.url = put_retrain(self.storage, r)
        except Exception:  # noqa: BLE001 - the record is secondary to the retrain's own result
            logger.warning("could not write the retrain record under %s", prefix_url(self.storage, RETRAINS),
                           exc_info=True)
            return  # the running record stays: without its heartbeat it goes stale, read interrupted
        running = retrain_key(r["started_at"], r["run_id"])
        if running != _retrain_record_key(r):
            try:
                self.storage.delete(running)
            except Exception as exc:  # noqa: BLE001 - readers skip it beside its final record
                logger.warning("could not remove the running retrain record %s: %r",
                               self.storage.url_for(running), exc)
