"""The Serve application that ``build_app`` builds (inspected, not run: no Ray)."""

from __future__ import annotations

import pytest

from serving.app import build_app


def _deployments(app) -> dict[str, object]:
    """Every deployment bound into ``app``, by name: the ingress and those its arguments bind."""
    found, todo = {}, [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        bound = (*deployment.init_args, *deployment.init_kwargs.values())
        todo += [a for a in bound if hasattr(a, "_bound_deployment")]
    return found


@pytest.fixture()
def args(tmp_path, monkeypatch):
    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path))
    return {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_sampler_reserves_a_cpu_per_onnxruntime_thread(args, threads):
    # More threads than reserved CPUs spin on cores Ray hands to other work (job writers, replicas).
    deployments = _deployments(build_app({**args, "sampler_threads": threads, "sample_in_ingress": False}))
    assert set(deployments) == {"Api", "Sampler", "Jobs"}
    sampler = deployments["Sampler"]
    assert sampler.ray_actor_options["num_cpus"] == threads
    assert deployments["Api"].ray_actor_options["num_cpus"] == 0
    # What the decorator sets besides stays.
    assert sampler.max_ongoing_requests == 256


def test_a_sampling_ingress_reserves_a_cpu_per_onnxruntime_thread(args):
    deployments = _deployments(build_app({**args, "sampler_threads": 2, "sample_in_ingress": True}))
    assert set(deployments) == {"Api", "Jobs"}
    assert deployments["Api"].ray_actor_options["num_cpus"] == 2
