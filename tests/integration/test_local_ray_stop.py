"""stop_ray on a real local cluster: a worker that hangs in its own exit after leaving the
cluster (as Ray 2.60's core worker can, deadlocked in its exit handler) does not outlive it, nor, while
the cluster runs, the grace after Ray recorded its exit."""

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


def _stuck_in_exit_actor():
    """An actor (on the connected cluster) whose ``leave`` takes it out of the cluster and then
    leaves its process hanging in its own exit, as Ray 2.60's deadlocked exit handler does."""

    @ray.remote(num_cpus=0)
    class StuckInExit:
        def pid(self) -> int:
            return os.getpid()

        def leave(self) -> None:
            import atexit

            atexit.register(time.sleep, 3600)  # runs after the worker has left the cluster
            ray.actor.exit_actor()

    return StuckInExit.remote()


def _leave(actor) -> None:
    """Ask ``actor`` to leave; return once the cluster has lost it (its process hangs on)."""
    actor.leave.remote()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.pid.remote(), timeout=30)


def test_a_worker_stuck_in_its_exit_is_killed_when_the_local_cluster_stops():
    from genmodels.ray_runtime import LOCAL_CLUSTER_ENV, cluster_workers, ensure_ray, stop_ray

    ensure_ray(num_cpus=1)
    cluster = os.environ[LOCAL_CLUSTER_ENV]
    try:
        actor = _stuck_in_exit_actor()
        pid = ray.get(actor.pid.remote())
        _leave(actor)  # the actor is gone ...
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


def test_a_running_cluster_kills_a_worker_stuck_in_its_exit_once_its_grace_is_over_and_no_other():
    """What `genmodels serve` sweeps for while it runs: the stuck worker is killed once Ray's record
    of its exit is older than the grace, a live actor and the cluster itself carry on."""
    from genmodels.ray_runtime import LOCAL_CLUSTER_ENV, cluster_workers, ensure_ray, reap_departed_workers, stop_ray

    ensure_ray(num_cpus=1)
    cluster = os.environ[LOCAL_CLUSTER_ENV]
    try:
        stuck, live = _stuck_in_exit_actor(), _stuck_in_exit_actor()
        stuck_pid, live_pid = ray.get([stuck.pid.remote(), live.pid.remote()])
        _leave(stuck)
        time.sleep(1.5)
        assert _alive(stuck_pid) and stuck_pid in cluster_workers(cluster)
        assert reap_departed_workers(grace_s=60) == {}  # its exit is recorded, but only just
        assert _alive(stuck_pid)
        killed = reap_departed_workers(grace_s=0.5)
        assert list(killed) == [stuck_pid] and killed[stuck_pid].startswith("ray::StuckInExit"), killed
        deadline = time.monotonic() + 5
        while _alive(stuck_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(stuck_pid)
        assert ray.get(live.pid.remote(), timeout=30) == live_pid and _alive(live_pid)
        assert ray.get(_stuck_in_exit_actor().pid.remote(), timeout=60) > 0  # the cluster takes new work
        assert reap_departed_workers(grace_s=0.5) == {}
    finally:
        stop_ray(grace_s=1.0)
    assert not _alive(live_pid) and cluster_workers(cluster) == {}
