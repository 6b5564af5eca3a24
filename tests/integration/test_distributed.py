"""Ray Train integration: ``genmodels.distributed.train_on_ray`` runs the training loop under a
real 2-worker ``TorchTrainer`` (gloo DDP on CPU) on a local Ray cluster.

Each fit costs ~20 s on 2 cores (worker group start-up dominates), so every run is as small
as the property it checks allows: 8x8 binary digits, at most 128 training images per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genmodels.data import PrepConfig, prepare, write_snapshot
from genmodels.models import load_checkpoint, model_from_checkpoint
from genmodels.storage import open_storage
from genmodels.training import CHECKPOINT_KEY, TrainConfig, finish_training, load_training_state

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

SMALL_TRAIN = {"batch_size": 32, "max_train_examples": 128, "max_val_examples": 64, "early_stopping_patience": None,
               "seed": 0}
TINY_VAE = {"latent_dim": 4, "hidden": (32,), "iwae_k": 4}


@pytest.fixture(scope="module")
def local_ray():
    from genmodels.ray_runtime import ensure_ray, stop_ray

    ensure_ray(num_cpus=2)
    try:
        yield
    finally:
        stop_ray()


@pytest.fixture(scope="module")
def snapshot():
    return prepare("digits", None, PrepConfig(seed=0))


def _killed_once_loop(at_epoch: int, marker: str):
    """A ``train_loop`` whose rank 1 (rank 0 in a one-worker group) kills its own process
    (SIGKILL, as an OOM killer or a lost node would) when about to report epoch ``at_epoch``
    (1-based), unless the file ``marker`` exists, which it creates first: only the first
    attempt dies and the restarted group runs through. Built in a function so that Ray pickles
    the class and loop by value: the workers cannot import this test module."""
    import os
    import signal
    import time

    from genmodels.distributed import RayTrainContext, ray_train_loop

    class KilledOnce(RayTrainContext):
        def _maybe_fail(self, metrics):
            if self.rank != min(1, self.world_size - 1):
                return
            if int(metrics["epoch"]) == at_epoch and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(f"rank {self.rank} killed at epoch {at_epoch}\n")
                # The controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a real
                # epoch outlasts that, a test's tiny one does not. Wait so that the previous epoch's
                # checkpoint is registered, as it would be in a real run, before dying.
                time.sleep(2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
                os.kill(os.getpid(), signal.SIGKILL)

        def save_state(self, state_bytes, epoch, metrics):
            self._maybe_fail(metrics)
            super().save_state(state_bytes, epoch, metrics)

        def report(self, metrics):
            self._maybe_fail(metrics)
            super().report(metrics)

    def loop(config):
        ray_train_loop(config, context_class=KilledOnce)

    return loop


def _fit(tmp_path: Path, snapshot, family: str, model_config: dict, train_config: dict, max_failures: int = 0,
         train_loop=None, num_workers: int | None = 2):
    """``num_workers=None``: the preset's, as many as the 2-CPU cluster holds."""
    from genmodels.distributed import RayScaling, ray_train_loop, train_on_ray

    storage = open_storage(tmp_path / "store")
    write_snapshot(snapshot, storage)
    cpus = None if num_workers is None else 1
    outcome = train_on_ray(storage, snapshot, family, "quick",
                           scaling=RayScaling(num_workers=num_workers, cpus_per_worker=cpus, max_failures=max_failures),
                           overrides={**SMALL_TRAIN, **train_config}, model_overrides=model_config,
                           keep_checkpoints=None, train_loop=train_loop or ray_train_loop)
    (run_dir,) = (tmp_path / "store" / "ray" / "digits").iterdir()
    last = sorted(run_dir.glob("epoch-*"))[-1]
    state = load_training_state((last / CHECKPOINT_KEY).read_bytes())
    return outcome, run_dir, state


def _assert_complete(outcome, state, family: str, epochs: int) -> None:
    ts = state["train_state"]
    assert state["family"] == family
    assert state["meta"]["dataset"] == "digits" and state["meta"]["preset"] == "quick"
    assert ts["epoch"] == epochs
    assert [h["epoch"] for h in ts["history"]] == list(range(1, epochs + 1))
    for record in ts["history"]:
        assert all(torch.isfinite(torch.tensor(float(v))) for v in record.values()), record
    # The driver wrote the run's model and history where local training would.
    saved = load_checkpoint(outcome.run.get_bytes("model.pt"))
    assert saved["family"] == family and saved["meta"]["epochs"] == epochs
    assert json.loads(outcome.run.get_bytes("history.json")) == ts["history"]
    model = model_from_checkpoint(saved)
    x = model.sample(5, seed=3)
    assert x.shape == (5, 1, 8, 8)
    assert torch.isfinite(x).all()
    assert torch.equal(x, model.sample(5, seed=3))
    assert torch.equal(x, outcome.result.model.sample(5, seed=3))


def test_vae_on_two_workers(local_ray, snapshot, tmp_path):
    outcome, run_dir, state = _fit(tmp_path, snapshot, "vae", TINY_VAE, {"epochs": 3})
    _assert_complete(outcome, state, "vae", 3)
    assert "val_loss" in state["train_state"]["history"][-1]
    # The checkpoint of every epoch was reported (checkpoint_every defaults to 1).
    assert sorted(p.name for p in run_dir.glob("epoch-*")) == ["epoch-00001", "epoch-00002", "epoch-00003"]
    # Best weights by validation loss are what the run's model.pt holds.
    ts = state["train_state"]
    best_epoch = min(ts["history"], key=lambda h: h["val_loss"])["epoch"]
    assert outcome.result.best_val_loss == pytest.approx(ts["history"][best_epoch - 1]["val_loss"])
    # The run ships the latent mixture (the quick preset's) fit to those weights: the workers'
    # models are dropped, so the driver must finish what it rebuilds from the checkpoint.
    shipped = model_from_checkpoint(load_checkpoint(outcome.run.get_bytes("model.pt")))
    assert shipped.config.latent_mixture > 0
    assert shipped.mixture_means.abs().sum() > 0, "the shipped mixture is the unfitted prior"
    trained = model_from_checkpoint(state)
    trained.load_state_dict(ts["best_state_dict"])
    finish_training(trained, snapshot, TrainConfig.from_dict(ts["train_config"]), torch.device("cpu"))
    for name in ("mixture_weights", "mixture_means", "mixture_scale_tril"):
        assert torch.equal(getattr(shipped, name), getattr(trained, name)), name


def _trained_locally(snapshot, family: str, model_config: dict, train_config: dict):
    """The run of ``_fit``'s plan in this process, and its initial weights."""
    from genmodels.runs import plan_run
    from genmodels.training import train

    # On the CPU as the workers (a GPU's convolutions would round otherwise).
    overrides = {**SMALL_TRAIN, **train_config, "device": "cpu"}
    model, train_cfg, _ = plan_run(snapshot, family, "quick", overrides=overrides, model_overrides=model_config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    return train(model, snapshot, train_cfg), initial


def _assert_same_weights(distributed, local, initial) -> None:
    for name, value in local.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Training moved the weights far beyond that tolerance: the agreement is not the initial weights'.
    assert max(float((v - initial[k]).abs().max()) for k, v in local.items() if v.is_floating_point()) > 1e-2


def test_two_workers_train_what_one_process_trains(local_ray, snapshot, tmp_path):
    """batch_size is the global batch: two workers of 16 see the images and binarization one
    process of 32 sees, and DDP averages their gradients, so a model that draws no noise while
    training (the PixelRNN) ends with the weights of a local run, up to float rounding."""
    tiny = {"num_layers": 1, "hidden_channels": 8, "head_hidden": 16, "input_kernel": 3}
    # In fp32: the quick preset's bf16 (where the CPU has it) rounds a convolution over 16 images
    # unlike one over 32, and what this checks is the split of the batch, not the precision.
    fp32 = {"epochs": 2, "autocast": "none"}
    # No worker count given: the quick preset's 2, which the 2-CPU cluster holds, and the run says so.
    outcome, _, state = _fit(tmp_path, snapshot, "pixelrnn", tiny, fp32, num_workers=None)
    _assert_complete(outcome, state, "pixelrnn", 2)
    assert state["train_state"]["train_config"]["workers"] == 2
    assert load_checkpoint(outcome.run.get_bytes("model.pt"))["meta"]["train_config"]["workers"] == 2
    local, initial = _trained_locally(snapshot, "pixelrnn", tiny, fp32)
    assert local.history[0]["epoch"] == 1 and SMALL_TRAIN["batch_size"] == 32  # 4 steps an epoch either way
    _assert_same_weights(outcome.result.model.state_dict(), local.model.state_dict(), initial)
    local_val = [h["val_loss"] for h in local.history]
    assert local_val == pytest.approx([h["val_loss"] for h in state["train_state"]["history"]], rel=1e-5)


def test_gan_two_players_under_ddp(local_ray, snapshot, tmp_path):
    outcome, _, state = _fit(tmp_path, snapshot, "gan", {"latent_dim": 8, "g_width": 8, "d_width": 8, "d_features": 16},
                             {"epochs": 2, "lr": 2e-4, "betas": (0.5, 0.999), "checkpoint_every": 1})
    _assert_complete(outcome, state, "gan", 2)
    history = state["train_state"]["history"]
    # Both players stepped: per-player losses carry the player's prefix.
    assert any(k.startswith("train_generator_") for k in history[0]), history[0]
    assert any(k.startswith("train_discriminator_") for k in history[0]), history[0]
    assert set(state["train_state"]["optimizers"]) == {"generator", "discriminator"}
    # The model the run keeps is the last step's EMA generator, not a "best" epoch by D(G(z)).
    assert outcome.result.best_val_loss is None and state["train_state"]["best_state_dict"] is None
    assert torch.equal(outcome.result.model.state_dict()["ema_steps"], state["state_dict"]["ema_steps"])


def test_mixture_em_stats_all_reduced(local_ray, snapshot, tmp_path):
    outcome, _, state = _fit(tmp_path, snapshot, "mixture", {"n_components": 3}, {"epochs": 2, "checkpoint_every": 1})
    _assert_complete(outcome, state, "mixture", 2)
    # Every M-step pools the E-step statistics of both workers' halves of the data: the fit one
    # process makes of all of it (an M-step on one worker's statistics would not be), and
    # train_loss is the mean NLL of those pooled statistics.
    local, initial = _trained_locally(snapshot, "mixture", {"n_components": 3}, {"epochs": 2, "checkpoint_every": 1})
    _assert_same_weights(outcome.result.model.state_dict(), local.model.state_dict(), initial)
    history = state["train_state"]["history"]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in local.history], rel=1e-5)


def test_killed_worker_resumes_from_last_checkpoint(local_ray, snapshot, tmp_path):
    marker = tmp_path / "killed-once"
    outcome, run_dir, state = _fit(tmp_path, snapshot, "vae", TINY_VAE, {"epochs": 3}, max_failures=1,
                                   train_loop=_killed_once_loop(2, str(marker)))
    assert marker.read_text() == "rank 1 killed at epoch 2\n"
    _assert_complete(outcome, state, "vae", 3)  # each of the 3 epochs exactly once
    # Resumed, not restarted: epoch 1's checkpoint predates the kill (a restart from scratch
    # would have rewritten it); the final one came after it.
    kill = marker.stat().st_mtime_ns
    assert (run_dir / "epoch-00001" / CHECKPOINT_KEY).stat().st_mtime_ns < kill
    assert (run_dir / "epoch-00003" / CHECKPOINT_KEY).stat().st_mtime_ns > kill


def test_same_plan_again_finds_the_run_finished(local_ray, snapshot, tmp_path):
    first, run_dir, _ = _fit(tmp_path, snapshot, "vae", TINY_VAE, {"epochs": 2})
    model_bytes = first.run.get_bytes("model.pt")
    checkpoint_times = {p.name: (p / CHECKPOINT_KEY).stat().st_mtime_ns for p in run_dir.glob("epoch-*")}
    again, _, _ = _fit(tmp_path, snapshot, "vae", TINY_VAE, {"epochs": 2})
    # No epoch was trained again and the model is byte-identical (so registering it again is a no-op).
    assert {p.name: (p / CHECKPOINT_KEY).stat().st_mtime_ns for p in run_dir.glob("epoch-*")} == checkpoint_times
    assert again.run.get_bytes("model.pt") == model_bytes


def test_more_workers_than_the_cluster_places_are_refused_at_once(local_ray, snapshot, tmp_path):
    # Ray Train would wait for a group of 4 on 2 CPUs without end or word: run in a thread so that
    # a wait fails this test instead of hanging it.
    import threading
    import time

    from genmodels.distributed import RayScaling, train_on_ray

    storage = open_storage(tmp_path / "store")
    write_snapshot(snapshot, storage)
    box = {}

    def fit():
        try:
            train_on_ray(storage, snapshot, "mixture", "quick", scaling=RayScaling(num_workers=4),
                         overrides={**SMALL_TRAIN, "epochs": 1}, model_overrides={"n_components": 3})
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            box["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "still waiting for 4 workers on a 2-CPU cluster"
    assert time.monotonic() - t0 < 10
    assert isinstance(box.get("error"), ValueError), box
    assert "4 workers asked for, but the Ray cluster has 2 CPUs: it places at most 2" in str(box["error"])
    assert not (tmp_path / "store" / "ray").exists()  # refused before any Ray Train run


def test_the_local_clusters_workers_carry_its_mark(local_ray):
    """What stop_ray finds the workers that outlive the cluster by: the mark ensure_ray gave it
    reaches every worker process, through the raylet's environment."""
    import os

    from genmodels.ray_runtime import LOCAL_CLUSTER_ENV, cluster_workers

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    try:
        pid = ray.get(probe.pid.remote())
        workers = cluster_workers(os.environ[LOCAL_CLUSTER_ENV])
        assert pid in workers and workers[pid].startswith("ray::Probe"), workers
    finally:
        ray.kill(probe)
