"""The training loop: resume loses nothing, early stopping keeps the best model, sharding is exact."""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from genmodels.data.loader import batches, global_batches
from genmodels.models import build_model
from genmodels.models.base import GenerativeModel, ImageSpec, ModelConfig
from genmodels.noise import NoiseField
from genmodels import training
from genmodels.training import SYNC_EVERY_STEPS, LocalContext, TrainConfig, train


@dataclass(frozen=True)
class TinyConfig(ModelConfig):
    hidden: int = 8


class TinyBernoulli(GenerativeModel):
    """Independent Bernoulli pixels whose logits come from a small net with dropout: a valid
    density with an exact loss, and it draws from the torch RNG, which resume must restore."""

    family = "tiny"
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        d = config.image.dims
        self.net = nn.Sequential(nn.Linear(d, config.hidden), nn.Tanh(), nn.Linear(config.hidden, d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.dropout = nn.Dropout(0.2)

    def loss(self, batch, player="model"):
        x = batch["x"].flatten(1)
        logits = self.bias + self.net(self.dropout(torch.ones_like(x)))
        nll = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        return {"loss": nll.mean()}

    def noise_spec(self):
        return {"u": NoiseField(self.image.shape, "uniform")}

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        p = torch.sigmoid(self.bias).view(1, *self.image.shape)
        return (noise["u"] < p).float()


class MemoryStorage:
    def __init__(self):
        self.objects = {}

    def put_bytes(self, key, data):
        self.objects[key] = bytes(data)

    def get_bytes(self, key):
        return self.objects[key]

    def exists(self, key):
        return key in self.objects

    def url_for(self, key):
        return f"memory:///{key}"


def tiny_snapshot(n=96, seed=0):
    rng = np.random.default_rng(seed)
    image = ImageSpec(channels=1, height=3, width=3, levels=2, num_classes=2)
    proto = rng.integers(0, 256, size=(1, 1, 3, 3))
    x = np.clip(proto + rng.integers(-40, 40, size=(n, 1, 3, 3)), 0, 255).astype(np.uint8)
    y = rng.integers(0, 2, size=n).astype(np.int64)
    val_x = (rng.random((32, 1, 3, 3)) < x[:32] / 255).astype(np.uint8)
    splits = {
        "train": SimpleNamespace(x=x, y=y, x_binary=None),
        "val": SimpleNamespace(x=x[:32], y=y[:32], x_binary=val_x),
    }
    return SimpleNamespace(image=image, splits=splits, dataset="tiny", hash="0" * 64)


def make_model(snapshot):
    torch.manual_seed(0)
    return TinyBernoulli(TinyConfig(image=snapshot.image))


def crashed_and_resumed(snap, cfg: TrainConfig, crash_after_epoch: int):
    """The result of a run that crashed after checkpointing epoch ``crash_after_epoch`` and was
    then run again on the same storage."""
    storage = MemoryStorage()

    class Crash(RuntimeError):
        pass

    def crash(metrics):
        if metrics["epoch"] == crash_after_epoch:
            raise Crash()

    with pytest.raises(Crash):
        train(make_model(snap), snap, cfg, LocalContext(storage, on_epoch=crash))
    return train(make_model(snap), snap, cfg, LocalContext(storage))


@pytest.mark.parametrize("scheduler", ["cosine", "cosine_steps"])
def test_resumed_run_equals_uninterrupted_run(scheduler):
    snap = tiny_snapshot()
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, early_stopping_patience=None, scheduler=scheduler)
    full = train(make_model(snap), snap, cfg)
    resumed = crashed_and_resumed(snap, cfg, crash_after_epoch=2)

    assert resumed.resumed_from_epoch == 2
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]  # no epoch lost, none counted twice
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]


def adam_steps_record(monkeypatch, setting: str) -> list:
    """The value of ``setting`` in the first parameter group at each of Adam's steps from now on."""
    seen = []
    adam_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0][setting])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    return seen


def test_every_step_takes_adams_fused_kernel_also_after_a_resume(monkeypatch):
    """The fused kernel is the gradient families' optimizer speed on the CPU (1.11-1.14x the quick
    VAE's, CVAE's and GAN's steps): a resumed run's optimizer, rebuilt from its checkpoint's state,
    keeps it."""
    snap = tiny_snapshot()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, early_stopping_patience=None)
    fused = adam_steps_record(monkeypatch, "fused")
    resumed = crashed_and_resumed(snap, cfg, crash_after_epoch=1)
    assert resumed.resumed_from_epoch == 1
    assert len(fused) == 18 and all(flag is True for flag in fused), fused  # 6 steps an epoch, 3 epochs


@pytest.mark.parametrize("scheduler", ["cosine", "cosine_steps"])
def test_cosine_anneals_per_epoch_or_per_optimizer_step(scheduler, monkeypatch):
    snap = tiny_snapshot()  # 96 images, batches of 16: 6 steps an epoch
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, early_stopping_patience=None, scheduler=scheduler)
    seen_lrs = adam_steps_record(monkeypatch, "lr")
    train(make_model(snap), snap, cfg)
    assert len(seen_lrs) == 18
    if scheduler == "cosine":  # one value per epoch
        expected = [0.05 * (1 + math.cos(math.pi * (k // 6) / 3)) / 2 for k in range(18)]
    else:  # every step lower, the last one just above zero
        expected = [0.05 * (1 + math.cos(math.pi * k / 18)) / 2 for k in range(18)]
    assert seen_lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_early_stopping_returns_best_model():
    snap = tiny_snapshot()
    # A learning rate this large makes validation loss worse after the first epochs.
    cfg = TrainConfig(epochs=30, batch_size=8, lr=3.0, early_stopping_patience=2)
    result = train(make_model(snap), snap, cfg)
    vals = [h["val_loss"] for h in result.history]
    assert result.stopped_early and len(vals) < 30
    best = min(vals)
    assert result.best_val_loss == pytest.approx(best)
    assert vals.index(best) == len(vals) - 3  # stopped exactly `patience` epochs after the best
    # the returned weights are the best epoch's: recompute its validation loss
    model = result.model
    with torch.no_grad():
        b = next(batches(snap.splits["val"], snap.image, batch_size=32))
        assert float(model.validation_loss(b)) == pytest.approx(best, rel=1e-5)


def test_an_early_stopped_run_is_finished_when_its_plan_runs_again():
    snap = tiny_snapshot()
    cfg = TrainConfig(epochs=30, batch_size=8, lr=3.0, early_stopping_patience=2)  # stops within a few epochs
    storage = MemoryStorage()
    first = train(make_model(snap), snap, cfg, LocalContext(storage))
    assert first.stopped_early and first.epochs_completed < 30
    checkpoint = storage.objects["checkpoint.pt"]
    again = train(make_model(snap), snap, cfg, LocalContext(storage))
    # Nothing trained on: same history, same weights, the checkpoint untouched, still stopped early.
    assert again.stopped_early and again.resumed_from_epoch == first.epochs_completed
    assert again.history == first.history and again.best_val_loss == first.best_val_loss
    assert storage.objects["checkpoint.pt"] == checkpoint
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_a_diagnostic_validation_loss_neither_selects_weights_nor_stops_training():
    class DiagnosticOnly(TinyBernoulli):
        validation_selects_weights = False

    snap = tiny_snapshot()
    # The early-stopping test's settings: validation loss worsens after the first epochs.
    cfg = TrainConfig(epochs=12, batch_size=8, lr=3.0, early_stopping_patience=2)
    torch.manual_seed(0)
    result = train(DiagnosticOnly(TinyConfig(image=snap.image)), snap, cfg)
    vals = [h["val_loss"] for h in result.history]
    assert not result.stopped_early and len(vals) == 12 and result.best_val_loss is None
    assert min(vals) < vals[-1]  # a best-by-validation loop would have returned another epoch
    # the returned weights are the last epoch's: recompute its validation loss
    with torch.no_grad():
        b = next(batches(snap.splits["val"], snap.image, batch_size=32))
        assert float(result.model.validation_loss(b)) == pytest.approx(vals[-1], rel=1e-5)


def test_non_finite_loss_is_reported():
    snap = tiny_snapshot()
    model = make_model(snap)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(model, snap, TrainConfig(epochs=1, batch_size=16))


class LossRecorder(TinyBernoulli):
    """Records every training step's loss as the host saw it; from the ``nan_from_call``-th
    training step on, its loss is NaN (validation calls it too, in eval mode: not counted)."""

    nan_from_call: int | None = None

    def __init__(self, config):
        super().__init__(config)
        self.seen_losses: list[float] = []

    def loss(self, batch, player="model"):
        out = super().loss(batch, player)
        if not self.training:
            return out
        if self.nan_from_call is not None and len(self.seen_losses) + 1 >= self.nan_from_call:
            out = {"loss": out["loss"] * float("nan")}
        self.seen_losses.append(float(out["loss"].detach()))
        return out


def test_epoch_losses_read_in_windows_equal_the_per_step_mean(monkeypatch):
    # 96 steps an epoch: two reads of the device-side sums (at step 50 and at the end), not 96.
    snap = tiny_snapshot()
    assert SYNC_EVERY_STEPS < 96 < 2 * SYNC_EVERY_STEPS
    reads = []
    read_means = training._checked_means
    monkeypatch.setattr(training, "_checked_means", lambda *args: reads.append(args[-1]) or read_means(*args))
    torch.manual_seed(0)
    model = LossRecorder(TinyConfig(image=snap.image))
    result = train(model, snap, TrainConfig(epochs=2, batch_size=1, lr=1e-2, early_stopping_patience=None))
    assert reads == [SYNC_EVERY_STEPS, 96] * 2
    per_epoch = [model.seen_losses[:96], model.seen_losses[96:]]
    assert len(model.seen_losses) == 192
    for record, losses in zip(result.history, per_epoch):
        # Python floats added in step order: the device's float64 sums must give the same bits.
        expected = 0.0
        for value in losses:
            expected += value
        assert record["train_loss"] == expected / 96


def test_a_loss_that_turns_non_finite_mid_epoch_stops_training_before_any_checkpoint():
    snap = tiny_snapshot()
    storage = MemoryStorage()
    model = LossRecorder(TinyConfig(image=snap.image))
    model.nan_from_call = 96 + 60  # the second epoch's 60th step, after the read at its 50th
    epochs_saved = []
    window = f"{SYNC_EVERY_STEPS + 1}-96"
    with pytest.raises(FloatingPointError, match=f"tiny: non-finite model loss in steps {window} of the epoch"):
        train(model, snap, TrainConfig(epochs=3, batch_size=1, early_stopping_patience=None),
              LocalContext(storage, on_epoch=lambda m: epochs_saved.append(m["epoch"])))
    assert epochs_saved == [1]
    resumed = train(make_model(snap), snap, TrainConfig(epochs=3, batch_size=1, early_stopping_patience=None),
                    LocalContext(storage))
    assert resumed.resumed_from_epoch == 1 and all(math.isfinite(h["train_loss"]) for h in resumed.history)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_cover_every_example_with_equal_counts(world_size):
    n = 10
    steps = [[step[lo:hi] for step, lo, hi in global_batches(n, seed=1, epoch=3, shuffle=True, rank=r,
                                                            world_size=world_size, batch_size=4 * world_size)]
             for r in range(world_size)]
    whole = [step for step, _, _ in global_batches(n, seed=1, epoch=3, shuffle=True, rank=0, world_size=world_size,
                                                   batch_size=4 * world_size)]
    assert len({len(s) for s in steps}) == 1  # DDP needs every worker to run the same steps
    for step, parts in zip(whole, zip(*steps)):
        assert len({len(mine) for mine in parts}) == 1
        # A step's parts, in rank order, are its global batch.
        assert np.array_equal(np.concatenate(parts), step)
    shards = [np.concatenate(s) for s in steps]
    assert set(np.concatenate(shards)) == set(range(n))
    assert sum(len(s) for s in shards) - n < world_size  # only the wrap-around padding repeats


@pytest.mark.parametrize("world_size", [2, 4])
def test_workers_of_a_step_see_the_batch_of_one_process(world_size):
    """batch_size is the global batch: the workers' parts of every step, images with their
    dynamic binarization and labels, are exactly the batch a single process draws."""
    snap = tiny_snapshot()
    split = snap.splits["train"]
    kw = dict(batch_size=8, kind="quantized", seed=5, epoch=2, shuffle=True, limit=80)
    single = list(batches(split, snap.image, **kw))
    workers = [list(batches(split, snap.image, rank=r, world_size=world_size, **kw)) for r in range(world_size)]
    assert [len(w) for w in workers] == [len(single)] * world_size == [10] * world_size
    for step, whole in enumerate(single):
        parts = [w[step] for w in workers]
        assert all(len(p["y"]) == 8 // world_size for p in parts)
        assert torch.equal(torch.cat([p["x"] for p in parts]), whole["x"])
        assert torch.equal(torch.cat([p["y"] for p in parts]), whole["y"])
        assert torch.equal(torch.cat([p["x_probability"] for p in parts]), whole["x_probability"])
    assert set(torch.cat([b["x"] for b in single]).unique().tolist()) == {0.0, 1.0}  # binarized afresh


def test_single_process_batches_are_those_runs_drew_before_the_global_batch():
    """One process draws, to the bit, the images, order and binarization it drew before
    batch_size became the global batch (the digest of the loader at f8542b9): every figure
    recorded from single-process runs stays reproducible."""
    import hashlib

    snap = tiny_snapshot()
    digest = hashlib.sha256()
    for epoch in (0, 1):
        for b in batches(snap.splits["train"], snap.image, batch_size=16, seed=3, epoch=epoch, shuffle=True):
            digest.update(b["x"].numpy().tobytes())
            digest.update(b["y"].numpy().tobytes())
    for b in batches(snap.splits["val"], snap.image, batch_size=5):
        digest.update(b["x"].numpy().tobytes())
    assert digest.hexdigest() == "51bb1061e4ee81cb835e829456f6326c1d0edc8ec2842a65b09e6d3a48b703ad"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_unpadded_parts_hold_every_example_once(world_size):
    """Sums reduced once (validation, EM statistics) take pad=False: where the worker count does
    not divide the examples, no example is counted twice; parts may be uneven or empty."""
    snap = tiny_snapshot()
    split = snap.splits["train"]
    kw = dict(batch_size=12, kind="quantized", seed=2, epoch=1, shuffle=True, limit=29)
    single = torch.cat([b["x"] for b in batches(split, snap.image, **kw)])
    workers = [list(batches(split, snap.image, rank=r, world_size=world_size, pad=False, **kw))
               for r in range(world_size)]
    steps = max(len(w) for w in workers)
    joined = torch.cat([w[i]["x"] for i in range(steps) for w in workers if i < len(w)])
    assert torch.equal(joined, single) and len(joined) == 29
    assert all(len(b["y"]) > 0 for w in workers for b in w)  # an empty part is not yielded


def test_a_global_batch_that_does_not_divide_between_workers_is_refused():
    snap = tiny_snapshot()
    with pytest.raises(ValueError, match="batch_size 6 is the global batch of 4"):
        next(batches(snap.splits["train"], snap.image, batch_size=6, rank=0, world_size=4))
    with pytest.raises(ValueError, match="batch_size 30 is the global batch of 4"):
        train(make_model(snap), snap, TrainConfig(epochs=1, batch_size=30), SimpleNamespace(rank=0, world_size=4))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        TrainConfig(workers=0)
    with pytest.raises(ValueError, match="batch_size 6 is the global batch of 4"):
        next(global_batches(10, seed=0, epoch=0, shuffle=False, rank=0, world_size=4, batch_size=6))
    with pytest.raises(ValueError, match="3 training examples cannot be shared by 4 workers"):
        train(make_model(snap), snap, TrainConfig(epochs=1, batch_size=4, max_train_examples=3),
              SimpleNamespace(rank=0, world_size=4))


def test_dynamic_binarization_is_per_epoch_and_reproducible():
    snap = tiny_snapshot()
    train_split = snap.splits["train"]
    e0 = torch.cat([b["x"] for b in batches(train_split, snap.image, batch_size=16, epoch=0)])
    e0_again = torch.cat([b["x"] for b in batches(train_split, snap.image, batch_size=16, epoch=0)])
    e1 = torch.cat([b["x"] for b in batches(train_split, snap.image, batch_size=16, epoch=1)])
    assert set(e0.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)
    val = torch.cat([b["x"] for b in batches(snap.splits["val"], snap.image, batch_size=5, epoch=7)])
    assert torch.equal(val, torch.from_numpy(snap.splits["val"].x_binary).float())  # fixed binarization


def test_dynamic_batches_carry_the_grey_levels_their_pixels_were_drawn_from():
    """``x_probability`` is P(x = 1) of each pixel of ``x``: its image's grey level / 255, in the
    batch's order; batches with a fixed binarization or of grey levels have none."""
    snap = tiny_snapshot()
    split = snap.splits["train"]
    drawn = list(batches(split, snap.image, batch_size=8, seed=4, epoch=1, shuffle=True, limit=40))
    order = np.concatenate([step for step, _, _ in global_batches(40, seed=4, epoch=1, shuffle=True, rank=0,
                                                                   world_size=1, batch_size=8)])
    probability = torch.cat([b["x_probability"] for b in drawn])
    assert torch.equal(probability, torch.from_numpy(split.x[order]).float() / 255.0)
    x = torch.cat([b["x"] for b in drawn])
    assert not x[probability == 0].any() and x[probability == 1].all()
    assert ((probability > 0) & (probability < 1)).any()  # grey levels, not only bits, to draw from
    assert "x_probability" not in next(batches(snap.splits["val"], snap.image, batch_size=5))
    assert "x_probability" not in next(batches(split, snap.image, batch_size=5, kind="intensity"))


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="linear")


@pytest.mark.parametrize("family", ["mixture", "vae", "cvae", "pixelrnn", "gan"])
def test_every_family_has_the_three_presets(family):
    """quick (`make run`), cpu (2 cores, <= 90 min) and full (GPU), each a valid config."""
    from genmodels.training import preset_configs

    for preset in ("quick", "cpu", "full"):
        overrides, cfg = preset_configs(family, preset)
        build_model(family, ImageSpec(), **overrides)
        assert cfg.autocast in ("none", "auto")  # never bf16 on a CPU that emulates it (8-30x slower)


def test_auto_autocast_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    """'auto' trains in bf16 on a CPU with AVX512-BF16 or AMX and in fp32 elsewhere; 'none' and
    'bf16' ignore the hardware; each epoch's history says which one trained."""
    from genmodels import training

    cpu = torch.device("cpu")
    cases = [({"avx512f", "avx2"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True),
             (set(), False)]
    for flags, native in cases:
        monkeypatch.setattr(training, "_cpu_flags", lambda flags=frozenset(flags): flags)
        assert training.trains_in_bf16(TrainConfig(autocast="auto"), cpu) is native
        assert training.trains_in_bf16(TrainConfig(autocast="bf16"), cpu) is True
        assert training.trains_in_bf16(TrainConfig(autocast="none"), cpu) is False

    snap = tiny_snapshot()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, early_stopping_patience=None, autocast="auto")
    losses = {}
    for flags, bf16 in ((frozenset(), 0.0), (frozenset({"avx512_bf16"}), 1.0)):
        monkeypatch.setattr(training, "_cpu_flags", lambda flags=flags: flags)
        result = train(make_model(snap), snap, cfg)
        assert [h["bf16"] for h in result.history] == [bf16, bf16]
        losses[bf16] = [h["train_loss"] for h in result.history]
    assert losses[0.0] != losses[1.0]  # the flag really switches the forward passes' precision
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp16")


def test_max_seconds_stops_with_a_checkpoint_and_resumes(tmp_path):
    """A time budget ends training after the epoch that crosses it; the same run resumes."""
    from genmodels.storage import open_storage

    image = ImageSpec(1, 4, 4, 2, 2)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (64, 1, 4, 4)).astype(np.uint8) * 255
    y = rng.integers(0, 2, 64).astype(np.int64)
    split = SimpleNamespace(x=x, y=y, x_binary=(x > 127).astype(np.uint8))
    snapshot = SimpleNamespace(image=image, splits={"train": split, "val": split}, dataset="t", hash="0" * 64)
    storage = open_storage(f"file://{tmp_path}")
    cfg = TrainConfig(epochs=4, batch_size=16, max_seconds=0.0, early_stopping_patience=None)
    first = train(build_model("vae", image, latent_dim=2, hidden=(8,)), snapshot, cfg, LocalContext(storage))
    assert first.epochs_completed == 1 and storage.exists("checkpoint.pt")
    rest = train(build_model("vae", image, latent_dim=2, hidden=(8,)), snapshot,
                 TrainConfig(epochs=4, batch_size=16, early_stopping_patience=None), LocalContext(storage))
    assert rest.resumed_from_epoch == 1 and rest.epochs_completed == 4


def test_a_worker_whose_own_budget_is_left_stops_with_the_one_that_ran_out(tmp_path):
    """Each worker reads its own clock: when another worker's budget ran out, this one must stop
    at the same epoch, or it would wait in the next epoch's collectives for a worker that left."""
    from genmodels.storage import open_storage

    class OtherWorkerOutOfTime(LocalContext):
        flags: list = []

        def all_reduce_sum(self, tensor):
            if tensor.numel() == 1 and tensor.item() in (0.0, 1.0):  # the budget flag: the other worker's is 1
                self.flags.append(tensor.item())
                return tensor + 1.0
            return tensor

    image = ImageSpec(1, 4, 4, 2, 2)
    x = np.random.default_rng(0).integers(0, 2, (64, 1, 4, 4)).astype(np.uint8) * 255
    split = SimpleNamespace(x=x, y=np.zeros(64, np.int64), x_binary=(x > 127).astype(np.uint8))
    snapshot = SimpleNamespace(image=image, splits={"train": split}, dataset="t", hash="0" * 64)
    storage = open_storage(f"file://{tmp_path}")
    ctx = OtherWorkerOutOfTime(storage)
    cfg = TrainConfig(epochs=4, batch_size=16, max_seconds=3600.0, early_stopping_patience=None)
    result = train(build_model("vae", image, latent_dim=2, hidden=(8,)), snapshot, cfg, ctx)
    assert result.epochs_completed == 1 and ctx.flags == [0.0]  # its own clock said: go on


def test_a_damaged_training_state_is_named_by_its_url_locally_and_on_ray(tmp_path, monkeypatch):
    """Resume reads a checkpoint's bytes, which carry no name: the error names where they lie."""
    import re

    from genmodels.storage import open_storage

    storage = open_storage(f"file://{tmp_path}/run")
    storage.put_bytes(training.CHECKPOINT_KEY, b"damaged")
    where = re.escape(storage.url_for(training.CHECKPOINT_KEY))
    with pytest.raises(ValueError, match=f"(?s)^{where}: not a loadable genmodels checkpoint.*pass --fresh"):
        LocalContext(storage).load_state()

    # A Ray worker reads a copy of the reported checkpoint: the error names the reported one.
    import ray.train

    from genmodels.distributed import RayTrainContext, checkpoint_url

    checkpoint = ray.train.Checkpoint.from_directory(str(storage.root))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    with pytest.raises(ValueError, match=f"(?s)^{where}: not a loadable genmodels checkpoint.*pass --fresh"):
        RayTrainContext.__new__(RayTrainContext).load_state()
    # The driver names it so too, on S3 with the scheme pyarrow's paths leave out.
    assert checkpoint_url(checkpoint) == storage.url_for(training.CHECKPOINT_KEY)
    on_s3 = SimpleNamespace(path="bucket/ray/digits/run/checkpoint_000001",
                            filesystem=SimpleNamespace(type_name="s3"))
    assert checkpoint_url(on_s3) == f"s3://bucket/ray/digits/run/checkpoint_000001/{training.CHECKPOINT_KEY}"


def test_a_training_state_that_does_not_fit_is_named_by_its_url_on_ray(tmp_path, monkeypatch):
    """A state another version wrote loads, then fails in a Ray worker's resume and in the
    driver's shipped_model: both name the reported checkpoint, the worker's also --fresh."""
    import io
    import re

    import ray.train

    from genmodels.distributed import RayTrainContext, checkpoint_url
    from genmodels.storage import open_storage

    image = ImageSpec(1, 4, 4, 2, 2)
    x = np.random.default_rng(0).integers(0, 2, (32, 1, 4, 4)).astype(np.uint8) * 255
    split = SimpleNamespace(x=x, y=np.zeros(32, np.int64), x_binary=(x > 127).astype(np.uint8))
    snapshot = SimpleNamespace(image=image, splits={"train": split}, dataset="t", hash="0" * 64)
    storage = open_storage(f"file://{tmp_path}/run")
    cfg = TrainConfig(epochs=1, batch_size=16, early_stopping_patience=None)
    train(build_model("vae", image, latent_dim=2, hidden=(8,)), snapshot, cfg, LocalContext(storage))
    state = torch.load(io.BytesIO(storage.get_bytes(training.CHECKPOINT_KEY)), weights_only=True)
    missing = next(iter(state["state_dict"]))
    del state["state_dict"][missing]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.put_bytes(training.CHECKPOINT_KEY, buffer.getvalue())

    checkpoint = ray.train.Checkpoint.from_directory(str(storage.root))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    where = re.escape(checkpoint_url(checkpoint))
    defect = re.escape(f'Missing key(s) in state_dict: "{missing}"')
    worker = RayTrainContext.__new__(RayTrainContext)
    worker.rank, worker.world_size = 0, 1
    with pytest.raises(ValueError, match=f"^{where}: its vae training state .*{defect}.*; pass --fresh to start over$"):
        train(build_model("vae", image, latent_dim=2, hidden=(8,)), snapshot, cfg, worker)
    with pytest.raises(ValueError, match=f"^{where}: its weights do not fit its vae config .*{defect}"):
        training.shipped_model(state, snapshot, torch.device("cpu"), where=checkpoint_url(checkpoint))
    state = torch.load(io.BytesIO(storage.get_bytes(training.CHECKPOINT_KEY)), weights_only=True)
    state["state_dict"] = build_model("vae", image, latent_dim=2, hidden=(8,)).state_dict()
    state["train_state"]["train_config"]["ema"] = 0.9
    with pytest.raises(ValueError, match=f"^{where}: its vae training state .*unknown keys \\['ema'\\]"):
        training.shipped_model(state, snapshot, torch.device("cpu"), where=checkpoint_url(checkpoint))


def test_the_training_history_of_two_workers_is_all_workers_mean():
    """Each of N workers sees 1/N of every global batch: the ``train_*`` figures a DDP run
    records must be the mean over all of them (as one process computes it), not the chief's share."""
    from genmodels.data.prep import PrepConfig, prepare
    from genmodels.training import TrainingContext

    class Peer(TrainingContext):
        """Rank 1 run alone: what it sends to each all-reduce, recorded in order."""
        rank, world_size = 1, 2

        def __init__(self):
            self.sent = []

        def all_reduce_sum(self, tensor):
            self.sent.append(tensor.clone())
            return tensor

    class Chief(TrainingContext):
        """Rank 0: each all-reduce adds what the peer sent to the same collective."""
        rank, world_size = 0, 2

        def __init__(self, sent):
            self.sent = iter(sent)

        def all_reduce_sum(self, tensor):
            return tensor + next(self.sent)

    snap = prepare("digits", prep=PrepConfig(quantization="binary"))
    # An lr too small to move the weights: unsynchronized ranks stay the one model DDP keeps.
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-12, max_train_examples=256, max_val_examples=64,
                      early_stopping_patience=None)

    def model():
        torch.manual_seed(0)
        return build_model("pixelrnn", snap.image, num_layers=1, hidden_channels=4, head_hidden=6)

    one = train(model(), snap, cfg, finish=False).history[0]
    peer = Peer()
    train(model(), snap, cfg, peer, finish=False)
    two = train(model(), snap, cfg, Chief(peer.sent), finish=False).history[0]
    logged = [k for k in one if k.startswith("train_")]
    assert "train_loss" in logged and [k for k in two if k.startswith("train_")] == logged
    for key in [*logged, "val_loss"]:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_a_restarted_ray_worker_group_trains_within_the_drivers_budget_not_a_fresh_one(monkeypatch):
    """Ray Train re-enters the worker loop after a worker fails (FailureConfig): the budget of
    ``--max-minutes`` is counted from the driver's start, so a restart gets what is left."""
    import time

    import ray.train.torch

    import genmodels.data
    import genmodels.models
    from genmodels.distributed import ray_train_loop

    budgets = []
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(genmodels.data, "read_snapshot", lambda storage, prefix: SimpleNamespace(image=None))
    monkeypatch.setattr(genmodels.models, "initial_model", lambda *a: None)
    monkeypatch.setattr(training, "train", lambda model, snapshot, cfg, ctx, **k: budgets.append(cfg.max_seconds))
    config = {"storage_url": "file:///nonexistent", "snapshot_prefix": "s", "family": "vae", "model_config": {},
              "train_config": TrainConfig(max_seconds=600.0).to_dict(), "meta": {}}
    context = lambda: None  # noqa: E731 - the loop only hands it to train
    ray_train_loop({**config, "deadline": time.time() + 100.0}, context)  # restarted 500 s into the run
    ray_train_loop({**config, "deadline": time.time() - 5.0}, context)  # restarted after it ran out
    ray_train_loop(config, context)  # a driver that set no deadline: the config's own budget
    assert 99.0 < budgets[0] <= 100.0 and budgets[1:] == [0.0, 600.0]
