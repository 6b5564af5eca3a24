"""Connecting to Ray: what training on Ray, bulk jobs and serving share, without torch or the
training loop."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import time
import uuid

logger = logging.getLogger(__name__)

#: Ray Train's controller poll interval, set for the local cluster this process starts (a value
#: already in the environment wins; a cluster's controllers read their own environment).
TRAIN_POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_INTERVAL_S = "0.5"
#: Names each local cluster this process starts. Its raylet passes its environment on to every
#: worker it starts (which Ray marks with RAY_RAYLET_PID), so the workers that outlive the cluster
#: can be found: a Ray 2.60 worker can deadlock in its own exit (in the core worker's destructor,
#: after it has left the raylet), and then neither the raylet's end nor `ray stop` ends it. One
#: such Ray Train controller outlived a `make run` by minutes, holding 400 MB.
LOCAL_CLUSTER_ENV = "GENMODELS_LOCAL_RAY_CLUSTER"
_RAY_WORKER_ENV = b"RAY_RAYLET_PID="
#: How long the workers of a stopped local cluster get to exit before they are killed; also how
#: long a worker Ray has recorded as exited may take to end while the cluster runs.
WORKER_EXIT_GRACE_S = 3.0

#: How long after Ray recorded a worker's exit a running cluster's sweep
#: (:func:`reap_departed_workers`) leaves its process alone: ample for a clean exit.
DEPARTED_WORKER_GRACE_S = 30.0

#: The local clusters this process started and has not stopped with :func:`stop_ray`.
_local_clusters: list[str] = []


def ensure_ray(address: str | None = None, num_cpus: int | None = None, metrics_export_port: int | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS``, or start a local one; a local one
    serves Prometheus metrics at ``127.0.0.1:<metrics_export_port>/metrics`` when given (a cluster's
    port is set by its own ``ray start --metrics-export-port``)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A private local cluster: no token auth to configure (see shared/STACK_NOTES.md).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray Train's controller notices a report, a checkpoint or a finished worker only when it
        # polls (every 2 s by default), and a worker's next report waits for it: the quick mixture's
        # train_on_ray took 31-34 s for 3 s of epochs, 16-19 s polling every 0.5 s. A poll that
        # outlasts the interval is not an error (the worker fails only after 10 minutes of them).
        os.environ.setdefault(TRAIN_POLL_INTERVAL_ENV, LOCAL_TRAIN_POLL_INTERVAL_S)
        cluster = os.environ[LOCAL_CLUSTER_ENV] = uuid.uuid4().hex
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_export_port)
        if not _local_clusters:
            atexit.register(stop_ray)
        _local_clusters.append(cluster)
    else:
        ray.init(address=address, log_to_driver=False)


def stop_ray(grace_s: float = WORKER_EXIT_GRACE_S) -> dict[int, str]:
    """``ray.shutdown()``; then the workers of the local clusters :func:`ensure_ray` started here
    that are still running ``grace_s`` later are killed (logged). Returns them: pid -> process
    title. Runs at exit too, so a command that ends without calling it leaves none behind."""
    import ray

    ray.shutdown()
    killed: dict[int, str] = {}
    while _local_clusters:
        killed.update(reap_workers(_local_clusters.pop(), grace_s))
    if killed:
        logger.warning("killed %d Ray worker process(es) that outlived their local cluster by %.0f s: %s",
                       len(killed), grace_s, ", ".join(f"{pid} ({title})" for pid, title in sorted(killed.items())))
    return killed


def cluster_workers(cluster: str) -> dict[int, str]:
    """pid -> process title of each running process the raylet of the local cluster ``cluster``
    started, its workers and what they started (HAProxy, for one); none where ``/proc`` cannot be
    read."""
    marker = f"{LOCAL_CLUSTER_ENV}={cluster}".encode()
    found: dict[int, str] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for name in entries:
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")  # empty for a zombie: it has exited
            if marker not in environ or not any(v.startswith(_RAY_WORKER_ENV) for v in environ):
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                found[int(name)] = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or another user's
            continue
    found.pop(os.getpid(), None)
    return found


def reap_workers(cluster: str, grace_s: float = WORKER_EXIT_GRACE_S) -> dict[int, str]:
    """Wait up to ``grace_s`` for the worker processes of the stopped local cluster ``cluster`` to
    exit, then SIGKILL those left; returns them (pid -> process title)."""
    deadline = time.monotonic() + grace_s
    while (left := cluster_workers(cluster)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        _sigkill(pid)
    return left


def _sigkill(pid: int) -> bool:
    """SIGKILL ``pid``; False when it had already ended."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def reap_departed_workers(grace_s: float = DEPARTED_WORKER_GRACE_S) -> dict[int, str]:
    """SIGKILL the processes of this process's running local clusters whose workers Ray recorded as
    exited more than ``grace_s`` ago; returns them (pid -> process title, logged).

    A long-running driver (``genmodels serve``: every bulk job's writers are actors that end)
    would otherwise keep each worker stuck in its own exit until the cluster stops. A process is
    killed only when it carries a local cluster's mark and its pid has an exited entry in the
    GCS's worker table and no live one (a pid reused by a newer worker is spared). Nothing for a
    remote cluster, whose processes this machine cannot tell apart; a table that cannot be read is
    logged and skipped (the next sweep tries again)."""
    if not _local_clusters:
        return {}
    try:
        departed = departed_worker_pids(_worker_table(), exited_before_ms=(time.time() - grace_s) * 1000)
    except Exception as exc:  # private GCS API: a Ray upgrade may move it; the server must not fail
        logger.warning("cannot read Ray's worker table to find workers stuck in their exit: %s", exc)
        return {}
    killed = {pid: title for cluster in _local_clusters for pid, title in cluster_workers(cluster).items()
              if pid in departed and _sigkill(pid)}
    if killed:
        logger.warning("killed %d Ray worker process(es) still running %.0f s after Ray recorded their exit: %s",
                       len(killed), grace_s, ", ".join(f"{pid} ({title})" for pid, title in sorted(killed.items())))
    return killed


def departed_worker_pids(workers, exited_before_ms: float) -> set[int]:
    """pids of the GCS worker-table entries (``WorkerTableData``) that exited at or before
    ``exited_before_ms`` (epoch ms) and that no live entry has taken over."""
    alive = {w.pid for w in workers if w.is_alive}
    return {w.pid for w in workers if not w.is_alive and 0 < w.end_time_ms <= exited_before_ms} - alive


def _worker_table() -> list:
    """The connected cluster's GCS worker table (alive and exited entries); empty without Ray."""
    import ray

    if not ray.is_initialized():
        return []
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    return [gcs_pb2.WorkerTableData.FromString(raw) for raw in state._connect_and_get_accessor().get_worker_table()]
