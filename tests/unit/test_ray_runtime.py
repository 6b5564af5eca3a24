"""ensure_ray: what the local cluster it starts is configured with, and what a cluster keeps;
stop_ray: no worker of a local cluster outlives it; reap_departed_workers: none stuck in its
exit outlives its grace while the cluster runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import pytest

from genmodels import ray_runtime
from genmodels.ray_runtime import (
    LOCAL_CLUSTER_ENV,
    LOCAL_TRAIN_POLL_INTERVAL_S,
    TRAIN_POLL_INTERVAL_ENV,
    cluster_workers,
    departed_worker_pids,
    ensure_ray,
    reap_departed_workers,
    reap_workers,
    stop_ray,
)


@pytest.fixture
def exit_hooks(monkeypatch):
    """What is registered with atexit (not this process's own hooks), and a fresh record of the
    local clusters started."""
    hooks: list = []
    monkeypatch.setattr(ray_runtime, "atexit", types.SimpleNamespace(register=hooks.append))
    monkeypatch.setattr(ray_runtime, "_local_clusters", [])
    return hooks


@pytest.fixture
def fake_ray(monkeypatch, exit_hooks):
    """Ray's ``init`` recording the environment it saw instead of starting anything (patched on the
    real module: the suite's other tests may hold a Ray of their own in this process)."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append({"kwargs": kwargs, "env": dict(os.environ)}))
    for name in (TRAIN_POLL_INTERVAL_ENV, "RAY_ADDRESS", "RAY_AUTH_MODE", LOCAL_CLUSTER_ENV):
        # set, then removed: monkeypatch then restores the original state of each variable,
        # unset included, after ensure_ray has set it in this process's environment.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return calls


def test_a_local_cluster_polls_ray_train_workers_every_half_second(fake_ray, exit_hooks):
    ensure_ray(num_cpus=2)
    (call,) = fake_ray
    assert exit_hooks == [stop_ray]
    assert call["env"][TRAIN_POLL_INTERVAL_ENV] == LOCAL_TRAIN_POLL_INTERVAL_S == "0.5"
    assert call["env"]["RAY_AUTH_MODE"] == "disabled" and call["kwargs"]["num_cpus"] == 2


def test_an_operators_interval_wins_and_a_cluster_keeps_its_own(fake_ray, monkeypatch):
    monkeypatch.setenv(TRAIN_POLL_INTERVAL_ENV, "3")
    ensure_ray()
    assert fake_ray[-1]["env"][TRAIN_POLL_INTERVAL_ENV] == "3"
    monkeypatch.delenv(TRAIN_POLL_INTERVAL_ENV)
    ensure_ray(address="ray://10.0.0.1:10001")
    assert fake_ray[-1]["kwargs"]["address"] == "ray://10.0.0.1:10001"
    assert TRAIN_POLL_INTERVAL_ENV not in fake_ray[-1]["env"]
    assert ray_runtime._local_clusters == [fake_ray[0]["env"][LOCAL_CLUSTER_ENV]]  # the cluster is no one's to reap


def test_each_local_cluster_gets_its_own_mark_and_stop_ray_reaps_each_once(fake_ray, exit_hooks, monkeypatch):
    import ray

    ensure_ray()
    ensure_ray()
    marks = [call["env"][LOCAL_CLUSTER_ENV] for call in fake_ray]
    assert len(set(marks)) == 2 and all(len(mark) == 32 for mark in marks)
    assert exit_hooks == [stop_ray]  # registered once
    events = []
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(ray_runtime, "reap_workers", lambda cluster, grace_s: events.append(cluster) or {})
    assert stop_ray() == {} and stop_ray() == {}
    assert events == ["shutdown", marks[1], marks[0], "shutdown"]


def _idle_process(**env: str) -> subprocess.Popen:
    """A process that ignores SIGTERM, as a worker stuck in its exit does, with ``env`` added."""
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE)
    proc.stdout.readline()  # started, the handler set
    return proc


def test_reaping_kills_only_the_workers_of_the_cluster_that_did_not_exit(monkeypatch):
    monkeypatch.delenv(LOCAL_CLUSTER_ENV, raising=False)
    stuck = _idle_process(**{LOCAL_CLUSTER_ENV: "ours", "RAY_RAYLET_PID": "1"})
    not_a_worker = _idle_process(**{LOCAL_CLUSTER_ENV: "ours"})  # e.g. a server the driver started
    other_cluster = _idle_process(**{LOCAL_CLUSTER_ENV: "theirs", "RAY_RAYLET_PID": "1"})
    exiting = _idle_process(**{LOCAL_CLUSTER_ENV: "ours", "RAY_RAYLET_PID": "1"})
    try:
        assert set(cluster_workers("ours")) == {stuck.pid, exiting.pid}
        assert sys.executable.rsplit("/", 1)[-1] in cluster_workers("ours")[stuck.pid]
        started = time.monotonic()
        exiting.send_signal(signal.SIGKILL)  # exits within the grace period: not counted
        assert set(reap_workers("ours", grace_s=1.0)) == {stuck.pid}
        assert 1.0 <= time.monotonic() - started < 5
        assert stuck.wait(5) == -signal.SIGKILL
        assert not_a_worker.poll() is None and other_cluster.poll() is None
        assert cluster_workers("ours") == {}
        assert reap_workers("ours", grace_s=10) == {}  # nothing left: returns at once
        assert time.monotonic() - started < 5
    finally:
        for proc in (stuck, not_a_worker, other_cluster, exiting):
            proc.kill()
            proc.wait()


def _entry(pid: int, alive: bool, end_time_ms: int = 0):
    from ray.core.generated import gcs_pb2

    return gcs_pb2.WorkerTableData(pid=pid, is_alive=alive, end_time_ms=end_time_ms)


def test_departed_workers_are_those_that_exited_before_the_cutoff_and_whose_pid_no_live_worker_took():
    table = [_entry(10, True), _entry(11, False, 1_000), _entry(12, False, 2_000), _entry(13, False, 1_000),
             _entry(13, True), _entry(14, False, 0)]  # 13: pid reused by a live worker; 14: no end time
    assert departed_worker_pids(table, exited_before_ms=1_500) == {11}
    assert departed_worker_pids(table, exited_before_ms=2_000) == {11, 12}
    assert departed_worker_pids([], exited_before_ms=2_000) == set()


def test_the_sweep_kills_the_departed_workers_of_its_local_clusters_only(monkeypatch, exit_hooks, caplog):
    monkeypatch.delenv(LOCAL_CLUSTER_ENV, raising=False)
    monkeypatch.setattr(ray_runtime, "_worker_table", lambda: pytest.fail("no local cluster: nothing to read"))
    assert reap_departed_workers() == {}
    ray_runtime._local_clusters.append("ours")
    departed = _idle_process(**{LOCAL_CLUSTER_ENV: "ours", "RAY_RAYLET_PID": "1"})
    live = _idle_process(**{LOCAL_CLUSTER_ENV: "ours", "RAY_RAYLET_PID": "1"})
    theirs = _idle_process(**{LOCAL_CLUSTER_ENV: "theirs", "RAY_RAYLET_PID": "1"})
    try:
        exited_ms = int((time.time() - 10) * 1000)
        table = [_entry(departed.pid, False, exited_ms), _entry(live.pid, True), _entry(theirs.pid, False, exited_ms)]
        monkeypatch.setattr(ray_runtime, "_worker_table", lambda: table)
        assert reap_departed_workers(grace_s=60) == {}  # exited 10 s ago: within the grace
        killed = reap_departed_workers(grace_s=5)
        assert list(killed) == [departed.pid] and departed.wait(5) == -signal.SIGKILL
        assert live.poll() is None and theirs.poll() is None
        assert "still running 5 s after Ray recorded their exit" in caplog.text
    finally:
        for proc in (departed, live, theirs):
            proc.kill()
            proc.wait()


def test_a_worker_table_that_cannot_be_read_is_logged_and_the_sweep_returns_nothing(monkeypatch, exit_hooks, caplog):
    def unreadable():
        raise AttributeError("'GlobalState' object has no attribute '_connect_and_get_accessor'")

    ray_runtime._local_clusters.append("ours")
    monkeypatch.setattr(ray_runtime, "_worker_table", unreadable)
    assert reap_departed_workers() == {}
    assert "cannot read Ray's worker table" in caplog.text and "_connect_and_get_accessor" in caplog.text


def test_a_running_server_sweeps_for_departed_workers_every_interval_until_stopped(monkeypatch):
    import serving.cli

    events: list = []

    def sleep(seconds):
        events.append(seconds)
        if len(events) == 7:
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM, while it sleeps

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(ray_runtime, "reap_departed_workers", lambda: events.append("sweep") or {})
    with pytest.raises(KeyboardInterrupt):
        serving.cli._sweep_until_interrupted(interval_s=60)
    assert events == [60, "sweep", 60, "sweep", 60, "sweep", 60]
    assert serving.cli.DEPARTED_WORKER_SWEEP_S == 60 and ray_runtime.DEPARTED_WORKER_GRACE_S == 30
