"""stop_ray on a real local cluster: a worker that hangs in its own exit after leaving the
cluster (as Ray 2.60's core worker can, deadlocked in its exit handler) does not outlive it."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_stuck_in_its_exit_is_killed_when_the_local_cluster_stops():
    from genmodels.ray_runtime import LOCAL_CLUSTER_ENV, cluster_workers, ensure_ray, stop_ray

    @ray.remote(num_cpus=0)
    class StuckInExit:
        def pid(self) -> int:
            return os.getpid()

        def leave(self) -> None:
            import atexit

            atexit.register(time.sleep, 3600)  # runs after the worker has left the cluster
            ray.actor.exit_actor()

    ensure_ray(num_cpus=1)
    cluster = os.environ[LOCAL_CLUSTER_ENV]
    try:
        actor = StuckInExit.remote()
        pid = ray.get(actor.pid.remote())
        actor.leave.remote()
        with pytest.raises(ray.exceptions.RayActorError):  # the actor is gone ...
            ray.get(actor.pid.remote(), timeout=30)
        time.sleep(1)
        assert _alive(pid) and pid in cluster_workers(cluster)  # ... and its process is not
    finally:
        stopped = time.monotonic()
        killed = stop_ray(grace_s=1.0)
    assert pid in killed and killed[pid].startswith("ray::StuckInExit"), killed
    assert time.monotonic() - stopped < 15
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and cluster_workers(cluster) == {}
