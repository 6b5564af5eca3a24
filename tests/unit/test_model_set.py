"""The served models of a sampling replica (serving.models.ModelSet, serving.app.LocalSampling)
over a fake registry (no MLflow, no Ray): one model that cannot be loaded or cannot run must not
take the other models down with it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from genmodels import registry
from serving.errors import RequestError
from serving.models import ModelSet


class Good:
    family, conditional, num_classes, image_shape, noise_spec = "vae", False, 0, (1, 2, 2), {"z": 1}

    def request_labels(self, labels, n, field="labels"):
        return None

    def sample_many(self, requests, temperature):
        return [np.full((r.n, 1, 2, 2), 0.5, np.float32) for r in requests]


class FailsAtRun(Good):
    """A graph that loads but fails when run (e.g. a batch size frozen at export)."""

    def sample_many(self, requests, temperature):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions")


@pytest.fixture()
def fake_registry(monkeypatch):
    """Models "a" and "b" hold the alias; the names in ``broken`` cannot be loaded."""
    state = {"broken": {"b"}, "versions": {"a": "1", "b": "1"}, "listed": ["a", "b"], "samplers": {}}

    def load_sampler(name, alias, intra_op_num_threads=None):
        if name in state["broken"]:
            raise LookupError(f"model {name!r} v{state['versions'][name]} holds no ONNX graphs under artifacts/")
        sampler = state["samplers"].get(name) or (FailsAtRun() if name == "new" else Good())
        return registry.LoadedSampler(name, state["versions"][name], sampler, {}, {})

    def served_models(alias="champion"):
        return list(state["listed"])

    monkeypatch.setattr(registry, "configure", lambda *a, **k: "sqlite:///unused")
    monkeypatch.setattr(registry, "load_sampler", load_sampler)
    monkeypatch.setattr(registry, "served_models", served_models)
    monkeypatch.setattr(registry, "current_version", lambda name, alias="champion": state["versions"][name])
    return state


@pytest.mark.parametrize("pinned", [None, ["a", "b"]], ids=["every-champion", "pinned"])
def test_a_model_that_cannot_be_loaded_leaves_the_others_served_and_is_retried(fake_registry, pinned):
    models = ModelSet(pinned, "champion", None)
    assert models.names == ["a"]
    assert models.get("a").version == "1"
    with pytest.raises(RequestError) as err:
        models.get("b")
    # Wanted but not loaded: unavailable for now, not unknown.
    assert (err.value.status_code, err.value.error) == (503, "model_unavailable")
    assert models.poll_once() == []  # still broken: still tried, still missing

    fake_registry["broken"].clear()
    if pinned:
        # Pinned models are retried without listing the registry.
        fake_registry["listed"] = []
    assert models.poll_once() == ["b"]
    assert models.names == ["a", "b"] and models.get("b").version == "1"
    assert models.poll_once() == []


def test_a_request_during_the_reload_that_brings_a_model_online_is_served_it(fake_registry):
    """The poller thread loads a missing model between a request's look at the served models and
    its look at the missing ones: the request gets the model, not a 404 that lists it as served."""
    models = ModelSet(None, "champion", None)
    fake_registry["broken"].clear()

    class ReloadedOnFirstLook(dict):
        looked = False

        def get(self, name, default=None):
            if not ReloadedOnFirstLook.looked:
                ReloadedOnFirstLook.looked = True
                assert models.poll_once() == ["b"]  # the poller, right after the request's first look
            return super().get(name, default)

    models._models = ReloadedOnFirstLook(models._models)
    assert models.get("b").version == "1"


def test_a_model_that_lost_the_alias_before_it_loaded_is_no_longer_wanted(fake_registry):
    models = ModelSet(None, "champion", None)
    fake_registry["listed"] = ["a"]
    assert models.poll_once() == []
    with pytest.raises(RequestError) as err:
        models.get("b")
    assert err.value.status_code == 404


def test_when_no_model_loads_the_replica_still_fails_to_start(fake_registry):
    fake_registry["broken"] = {"a", "b"}
    with pytest.raises(LookupError, match="holds no ONNX graphs"):
        ModelSet(None, "champion", None)


def test_a_failing_group_fails_only_its_own_items(fake_registry):
    fake_registry.update(broken=set(), versions={"good": "1", "new": "2"}, listed=["good", "new"])
    models = ModelSet(None, "champion", None)
    items = [models.prepare({"model": m, "n": 2, "seed": s, "temperature": 1.0})
             for s, m in enumerate(["good", "new", "good"])]
    models.run_batch(items)
    assert [it.images is not None for it in items] == [True, False, True]
    assert [type(it.error).__name__ if it.error else None for it in items] == [None, "RuntimeError", None]
    assert items[0].images.shape == (2, 1, 2, 2)


def test_a_batch_merging_a_failing_model_answers_the_other_models_requests(fake_registry, monkeypatch):
    # Through Serve's @serve.batch (outside a replica: its check of the replica's config is skipped).
    import ray.serve.batching

    from serving.app import LocalSampling

    monkeypatch.setattr(ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    fake_registry.update(broken=set(), versions={"good": "1", "new": "2"}, listed=["good", "new"])
    asked = ["good", "good", "new", "good"]

    async def main():
        local = LocalSampling(reload_interval_s=3600, batch_wait_timeout_s=0.05)
        try:
            return local, await asyncio.gather(
                *(local.sample({"model": m, "n": 1, "seed": s, "temperature": 1.0}) for s, m in enumerate(asked)),
                return_exceptions=True)
        finally:
            local.stop()

    local, answers = asyncio.run(main())
    assert local.models.onnx_calls == 1  # one batch: the healthy requests were merged
    for model, answer in zip(asked, answers):
        if model == "good":
            assert not isinstance(answer, BaseException), answer
            assert answer["images"].shape == (1, 1, 2, 2) and answer["version"] == "1"
        else:
            assert isinstance(answer, RuntimeError) and "new v2" in str(answer)
            assert "INVALID_ARGUMENT" in str(answer.__cause__)


class Blocking(Good):
    """A model whose sampling runs until the test releases it (a PixelRNN batch of n=256)."""

    def __init__(self) -> None:
        import threading

        self.running, self.release = threading.Event(), threading.Event()
        self.released: list[bool] = []

    def sample_many(self, requests, temperature):
        self.running.set()
        # True: released by the test; False: it waited in vain, nothing else could run meanwhile.
        self.released.append(self.release.wait(10))
        return super().sample_many(requests, temperature)


def test_a_slow_models_batch_does_not_hold_up_another_models_requests(fake_registry, monkeypatch):
    import ray.serve.batching

    from serving.app import LocalSampling

    monkeypatch.setattr(ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    slow = Blocking()
    fake_registry.update(broken=set(), versions={"slow": "1", "fast": "1"}, listed=["slow", "fast"],
                         samplers={"slow": slow})

    async def main():
        local = LocalSampling(reload_interval_s=3600)
        try:
            held = asyncio.create_task(local.sample({"model": "slow", "n": 256, "seed": 0, "temperature": 1.0}))
            assert await asyncio.to_thread(slow.running.wait, 10)
            fast = await local.sample({"model": "fast", "n": 1, "seed": 1, "temperature": 1.0})
            slow_done_first = held.done()
            slow.release.set()
            return fast, slow_done_first, await held
        finally:
            local.stop()

    fast, slow_done_first, held = asyncio.run(main())
    assert fast["images"].shape == (1, 1, 2, 2) and held["images"].shape == (256, 1, 2, 2)
    assert not slow_done_first and slow.released == [True]
