"""What ``genmodels status`` reports, read without starting any server or Ray:

- ``models``: per registered model, its champion and challenger versions with their gate metric
  (the MLflow registry: ``MLFLOW_TRACKING_URI`` or the work dir's sqlite);
- ``last_retrain``: the newest retrain record (``<storage>/retrains/``, :mod:`genmodels.records`);
  a ``running`` one is flagged ``stale`` when its heartbeat stopped, and then reads ``interrupted``;
- ``jobs``: bulk jobs recorded as queued or running (``<storage>/jobs/``), each flagged ``stale``
  when its record has not been refreshed for :data:`genmodels.records.STALE_AFTER_S`, and
  ``job_counts``: how many records are in each state.

A section that cannot be read is reported under ``errors`` (section -> message) and left empty;
the others are still read.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from genmodels import records

__all__ = ["collect", "read_retrain", "registry_overview"]


def _version_summary(client, name: str, version: str) -> dict[str, Any]:
    from genmodels.registry import version_gate

    mv = client.get_model_version(name, version)
    metric, value = version_gate(mv)
    return {"version": str(mv.version), "gate_metric": metric, "gate_value": value,
            "registered_at_ms": mv.creation_timestamp}


def registry_overview(uri: str) -> list[dict[str, Any]]:
    """``[{name, versions, champion, challenger}]`` sorted by name; champion/challenger are
    ``{version, gate_metric, gate_value, registered_at_ms}`` or None."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return []  # a fresh work dir: no registry yet (and reading must not create one)
    from mlflow import MlflowClient

    from genmodels import registry

    registry.configure(uri, uri)
    client = MlflowClient()
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    out = []
    for rm in sorted(models, key=lambda m: m.name):
        aliases = dict(rm.aliases or {})
        versions = client.search_model_versions(f"name='{rm.name}'")
        out.append({
            "name": rm.name,
            "versions": len(versions),
            **{alias: (_version_summary(client, rm.name, aliases[alias]) if alias in aliases else None)
               for alias in (registry.CHAMPION, registry.CHALLENGER)},
        })
    return out


def read_retrain(record: dict[str, Any] | None, now: float | None = None) -> dict[str, Any] | None:
    """A retrain record as it reads now: a ``running`` one gets ``stale``; a stale one is a retrain
    whose process died without a word (SIGKILL, a lost machine), so it reads ``interrupted``,
    the family it was at too, and those it had not reached ``not_run``, as its own exit would
    have written them."""
    if record is None or record.get("status") != "running":
        return record
    if not records.is_stale(record, now):
        return {**record, "stale": False}
    then = {"running": "interrupted", "pending": "not_run"}
    outcomes = {f: ({**o, "status": then[o.get("status")]} if o.get("status") in then else o)
                for f, o in record["outcomes"].items()}
    return {**record, "status": "interrupted", "stale": True, "outcomes": outcomes,
            "error": record.get("error") or f"no heartbeat since {record.get('updated_at')}: "
                                             "the process running it has most likely stopped"}


def collect(storage_url: str | None = None, tracking: str | None = None) -> dict[str, Any]:
    """Everything ``genmodels status`` shows, as one JSON-able dict."""
    from genmodels.config import get_settings
    from genmodels.storage import open_storage

    storage_url = storage_url or get_settings().storage_url
    from genmodels.registry import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking)
    report: dict[str, Any] = {"storage": storage_url, "tracking_uri": uri, "models": [], "last_retrain": None,
                              "jobs": [], "job_counts": {}, "errors": {}}
    try:
        report["models"] = registry_overview(uri)
    except Exception as exc:  # noqa: BLE001 - one unreadable section must not hide the others
        report["errors"]["models"] = f"{type(exc).__name__}: {exc}"
    try:
        storage = open_storage(storage_url)
    except ValueError as exc:
        report["errors"]["storage"] = str(exc)
        return report
    try:
        report["last_retrain"] = read_retrain(records.last_retrain(storage))
    except Exception as exc:  # noqa: BLE001
        report["errors"]["last_retrain"] = f"{type(exc).__name__}: {exc}"
    try:
        jobs = records.list_jobs(storage)
    except Exception as exc:  # noqa: BLE001
        report["errors"]["jobs"] = f"{type(exc).__name__}: {exc}"
    else:
        report["job_counts"] = dict(Counter(j.get("status", "?") for j in jobs))
        report["jobs"] = [{**{k: v for k, v in j.items() if k not in ("format", "spec")},
                           "stale": records.is_stale(j)}
                          for j in jobs if j.get("status") in records.ACTIVE_JOB_STATUSES]
    return report
