"""Ray Train integration: ``genmodels.distributed.ray_train_loop`` under a real 2-worker
``TorchTrainer`` (gloo DDP on CPU) on a local Ray cluster.

Each fit costs ~20 s on 2 cores (worker group start-up dominates), so every run is as small
as the property it checks allows: 8x8 binary digits, at most 128 training images per epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genmodels.data import PrepConfig, prepare, write_snapshot
from genmodels.models import model_from_checkpoint
from genmodels.storage import open_storage
from genmodels.training import CHECKPOINT_KEY, load_training_state

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    # No token-auth warning for a throwaway local cluster (see shared/STACK_NOTES.md).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def snapshot_store(tmp_path_factory) -> tuple[str, str]:
    """(storage_url, snapshot_prefix) of the digits snapshot, written once for the module."""
    root = tmp_path_factory.mktemp("store")
    url = root.as_uri()
    snapshot = prepare("digits", None, PrepConfig(seed=0))
    prefix = write_snapshot(snapshot, open_storage(url))
    return url, prefix


def _fit(tmp_path: Path, snapshot_store, name: str, family: str, model_config: dict, train_config: dict,
         max_failures: int = 0, **hooks):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from genmodels.distributed import ray_train_loop

    url, prefix = snapshot_store
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={
            "storage_url": url, "snapshot_prefix": prefix, "family": family, "model_config": model_config,
            "train_config": {"batch_size": 32, "max_train_examples": 128, "max_val_examples": 64,
                             "early_stopping_patience": None, "seed": 0, **train_config},
            "meta": {"dataset": "digits", "test": name}, **hooks,
        },
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=name,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as directory:
        state = load_training_state((Path(directory) / CHECKPOINT_KEY).read_bytes())
    return result, state


def _assert_complete(state, family: str, epochs: int, meta_test: str) -> None:
    ts = state["train_state"]
    assert state["family"] == family
    assert state["meta"]["test"] == meta_test
    assert ts["epoch"] == epochs
    assert [h["epoch"] for h in ts["history"]] == list(range(1, epochs + 1))
    for record in ts["history"]:
        assert all(torch.isfinite(torch.tensor(float(v))) for v in record.values()), record
    model = model_from_checkpoint(state)
    x = model.sample(5, seed=3)
    assert x.shape == (5, 1, 8, 8)
    assert torch.isfinite(x).all()
    assert torch.equal(x, model.sample(5, seed=3))


def test_vae_on_two_workers(local_ray, snapshot_store, tmp_path):
    result, state = _fit(tmp_path, snapshot_store, "vae", "vae", {"latent_dim": 4, "hidden": (32,), "iwae_k": 4},
                         {"epochs": 3})
    _assert_complete(state, "vae", 3, "vae")
    assert "val_loss" in state["train_state"]["history"][-1]
    # The checkpoint of every epoch was reported (checkpoint_every defaults to 1).
    run_dir = Path(result.checkpoint.path).parent
    assert sorted(p.name for p in run_dir.glob("epoch-*")) == ["epoch-00001", "epoch-00002", "epoch-00003"]


def test_gan_two_players_under_ddp(local_ray, snapshot_store, tmp_path):
    _, state = _fit(tmp_path, snapshot_store, "gan", "gan",
                    {"latent_dim": 8, "g_width": 8, "d_width": 8, "d_features": 16},
                    {"epochs": 2, "lr": 2e-4, "betas": (0.5, 0.999)})
    _assert_complete(state, "gan", 2, "gan")
    history = state["train_state"]["history"]
    # Both players stepped: per-player losses carry the player's prefix.
    assert any(k.startswith("train_generator_") for k in history[0]), history[0]
    assert any(k.startswith("train_discriminator_") for k in history[0]), history[0]
    assert set(state["train_state"]["optimizers"]) == {"generator", "discriminator"}


def test_mixture_em_stats_all_reduced(local_ray, snapshot_store, tmp_path):
    _, state = _fit(tmp_path, snapshot_store, "mixture", "mixture", {"n_components": 3}, {"epochs": 2})
    _assert_complete(state, "mixture", 2, "mixture")
    history = state["train_state"]["history"]
    # train_loss is the mean NLL from the pooled (all-reduced) E-step statistics: one EM step
    # on them (MAP, small smoothing prior) must not make the fit worse.
    assert history[1]["train_loss"] <= history[0]["train_loss"] + 1e-3


def test_worker_failure_resumes_from_last_checkpoint(local_ray, snapshot_store, tmp_path):
    marker = tmp_path / "crashed-once"
    result, state = _fit(tmp_path, snapshot_store, "fault", "vae", {"latent_dim": 4, "hidden": (32,), "iwae_k": 4},
                         {"epochs": 3}, max_failures=1, fail_once_at_epoch=2, fail_marker=str(marker))
    assert marker.read_text() == "rank 1 failed at epoch 2\n"
    _assert_complete(state, "vae", 3, "fault")  # each of the 3 epochs exactly once
    # Resumed, not restarted: epoch 1's checkpoint predates the crash (a restart from scratch
    # would have rewritten it); the final one came after it.
    run_dir = Path(result.checkpoint.path).parent
    crash = marker.stat().st_mtime_ns
    assert (run_dir / "epoch-00001" / CHECKPOINT_KEY).stat().st_mtime_ns < crash
    assert (run_dir / "epoch-00003" / CHECKPOINT_KEY).stat().st_mtime_ns > crash
