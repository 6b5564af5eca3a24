"""ensure_ray: what the local cluster it starts is configured with, and what a cluster keeps;
stop_ray: no worker of a local cluster outlives it."""

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
    ensure_ray,
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
