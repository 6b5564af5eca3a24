"""ensure_ray: what the local cluster it starts is configured with, and what a cluster keeps."""

from __future__ import annotations

import os

import pytest

from genmodels.ray_runtime import LOCAL_TRAIN_POLL_INTERVAL_S, TRAIN_POLL_INTERVAL_ENV, ensure_ray


@pytest.fixture
def fake_ray(monkeypatch):
    """Ray's ``init`` recording the environment it saw instead of starting anything (patched on the
    real module: the suite's other tests may hold a Ray of their own in this process)."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append({"kwargs": kwargs, "env": dict(os.environ)}))
    for name in (TRAIN_POLL_INTERVAL_ENV, "RAY_ADDRESS", "RAY_AUTH_MODE"):
        # set, then removed: monkeypatch then restores the original state of each variable,
        # unset included, after ensure_ray has set it in this process's environment.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return calls


def test_a_local_cluster_polls_ray_train_workers_every_half_second(fake_ray):
    ensure_ray(num_cpus=2)
    (call,) = fake_ray
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
