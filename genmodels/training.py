"""The per-worker training loop: plain torch, used as is locally and by Ray Train.

One loop for every family. Gradient families step each of ``model.players()`` in turn on
every batch (one player for most, discriminator then generator for the GAN); the mixture
model is fit by EM, whose sufficient statistics are summed over batches and workers before
each M-step. The loop is seeded, device-aware, checkpoints every ``checkpoint_every``
epochs with everything needed to resume (model, optimizers, schedulers, RNG, early-stopping
state, history), and stops early when the validation loss stops improving.

Where the loop runs is abstracted by a :class:`TrainingContext`: :class:`LocalContext` for
one process (checkpoints in a storage), and the pipelines' Ray Train context for DDP.
Resuming only ever happens at epoch boundaries, and the batches of an epoch are a pure
function of (seed, epoch, rank), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from genmodels.config import dataclass_from_dict
from genmodels.data.loader import batches, check_global_batch, num_batches
from genmodels.models import checkpoint_dict, family_class, model_from_checkpoint, one_line
from genmodels.models.base import GenerativeModel
from genmodels.noise import derive_seed

CHECKPOINT_KEY = "checkpoint.pt"
AUTOCAST_MODES = ("none", "bf16", "auto")
SCHEDULERS = ("none", "cosine", "cosine_steps", "step")
#: Steps between the training loop's reads of its running losses (see ``_gradient_epoch``).
SYNC_EVERY_STEPS = 50


# What sets one invocation's budget or hardware, not the run's trajectory: free to differ on resume.
RESUME_FREE_TRAIN_FIELDS = ("max_seconds", "device", "checkpoint_every", "workers")


@dataclass
class TrainConfig:
    epochs: int = 10
    #: The global batch of a step: data-parallel workers take equal parts of it.
    batch_size: int = 128
    lr: float = 1e-3
    player_lr: dict[str, float] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    #: "cosine" anneals once per epoch; "cosine_steps" after every optimizer step, to zero at
    #: the run's last step: a one-epoch run (the quick PixelRNN) is annealed too.
    scheduler: str = "none"  # none | cosine | cosine_steps | step
    grad_clip: float | None = None
    early_stopping_patience: int | None = 5
    checkpoint_every: int = 1
    seed: int = 0
    max_train_examples: int | None = None
    max_val_examples: int | None = 5000
    em_init_examples: int = 5000
    device: str = "auto"
    #: "bf16": training forward passes under bfloat16 autocast; "auto": bf16 where the hardware
    #: computes it natively (:func:`native_bf16`), fp32 elsewhere. Validation, evaluation and
    #: every reported likelihood stay fp32; each epoch's history records which one trained.
    autocast: str = "none"
    #: Wall-clock budget of this invocation: training stops after the epoch that crosses it,
    #: with a checkpoint, and a later run with the same storage resumes from there.
    max_seconds: float | None = None
    #: Data-parallel workers of a Ray run that is not given a number, fewer where the cluster
    #: holds fewer or they would not divide the batch (``distributed.fitting_workers``). The
    #: workers of a step together see the batch one process would (``data.loader.batches``), so
    #: this sets speed, not the data (noise a model draws while training, the VAE's, is drawn
    #: per worker); a local run trains in one process. A Ray run records the count it got.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.lr <= 0 or any(v <= 0 for v in self.player_lr.values()):
            raise ValueError("learning rates must be > 0")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_MODES)}, got {self.autocast!r}")
        self.betas = tuple(self.betas)  # JSON/MLflow round trips turn tuples into lists

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_configs(family: str, preset: str) -> tuple[dict[str, Any], TrainConfig]:
    """Model-config overrides and the TrainConfig of a family's named preset."""
    cls = family_class(family)
    if preset not in cls.presets:
        raise ValueError(f"unknown preset {preset!r} for {family}; choose one of {sorted(cls.presets)}")
    spec = cls.presets[preset]
    return dict(spec.get("model", {})), TrainConfig.from_dict(spec.get("train", {}))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- where the loop runs --------------------------------------------------------------------
class TrainingContext:
    """Single-process defaults; a distributed context overrides the collective operations."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def wrap(self, model: GenerativeModel) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Make every worker's ``tensor`` equal to the chief's, in place."""

    def load_state(self) -> dict[str, Any] | None:
        """The last saved training state, or None for a fresh run."""
        return None

    def state_url(self) -> str | None:
        """Where :meth:`load_state` reads the training state from, for the errors of one that
        loads but cannot be resumed; None where it reads none."""
        return None

    def save_state(self, state_bytes: bytes, epoch: int, metrics: Mapping[str, float]) -> None:
        """Persist a training state (every worker calls this; the chief's copy counts)."""

    def report(self, metrics: Mapping[str, float]) -> None:
        """Epoch metrics without a checkpoint."""


class LocalContext(TrainingContext):
    """One process; resumable checkpoints in ``storage`` (a genmodels.storage.Storage) or none."""

    def __init__(self, storage=None, on_epoch: Callable[[Mapping[str, float]], None] | None = None) -> None:
        self.storage = storage
        self.on_epoch = on_epoch

    def load_state(self) -> dict[str, Any] | None:
        if self.storage is None or not self.storage.exists(CHECKPOINT_KEY):
            return None
        return load_resume_state(self.storage.get_bytes(CHECKPOINT_KEY), self.state_url())

    def state_url(self) -> str | None:
        return None if self.storage is None else self.storage.url_for(CHECKPOINT_KEY)

    def save_state(self, state_bytes: bytes, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.storage is not None:
            self.storage.put_bytes(CHECKPOINT_KEY, state_bytes)
        self.report(metrics)

    def report(self, metrics: Mapping[str, float]) -> None:
        if self.on_epoch is not None:
            self.on_epoch(metrics)


def load_training_state(data: bytes, where: str | None = None) -> dict[str, Any]:
    """A training state (a checkpoint with ``train_state``) from its bytes; ``where``: the URL or
    path they were read from, which every error names."""
    from genmodels.models import load_checkpoint

    state = load_checkpoint(data, where=where)
    if "train_state" not in state:
        raise ValueError(f"{where or '<bytes>'}: checkpoint holds a model but no training state: cannot resume from it")
    return state


#: How an error about a run's checkpoint ends: the run's option that removes it.
START_OVER = "pass --fresh to start over"

#: What reading a loaded checkpoint's configs or state into this code's raises where they do not
#: fit: an unknown or missing config field (ValueError, TypeError), a tensor or entry added or
#: missing (RuntimeError from ``load_state_dict``, ValueError from an optimizer's, KeyError).
UNFITTING_STATE_ERRORS = (ValueError, TypeError, KeyError, RuntimeError)


def load_resume_state(data: bytes, where: str) -> dict[str, Any]:
    """The saved state a run resumes from. One that cannot be resumed would fail the run on every
    retry until it is removed, so its error says how: the run's ``--fresh`` (local and Ray alike)."""
    try:
        return load_training_state(data, where)
    except ValueError as exc:
        raise ValueError(f"{exc}; {START_OVER}") from exc


def unfitting(where: str | None, what: str, exc: BaseException) -> ValueError:
    """The error for a checkpoint that loads but does not fit this code (written by another
    version: a config field renamed or removed, a tensor added or missing), naming the checkpoint
    (``where``), the part of it that does not fit (``what``) and how (``exc``'s text, on one line)."""
    detail = f"lacks {exc}" if isinstance(exc, KeyError) else one_line(exc)
    return ValueError(f"{where or 'checkpoint'}: {what} does not fit this version of genmodels ({detail})")


def unresumable(where: str | None, what: str, exc: BaseException) -> ValueError:
    """:func:`unfitting` for the state a run resumes from: as for one that does not load
    (:func:`load_resume_state`), every retry would fail alike until it is removed, so it says how."""
    return ValueError(f"{unfitting(where, what, exc)}; {START_OVER}")


# --- the loop --------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: GenerativeModel  # the best by validation loss (the last without validation or selection)
    history: list[dict[str, float]]
    epochs_completed: int
    best_val_loss: float | None
    stopped_early: bool
    resumed_from_epoch: int  # 0 for a fresh run


#: Devices with torch's fused Adam kernel.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def _make_optimizers(model: GenerativeModel, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    optimizers = {}
    for name, params in model.players().items():
        params = list(params)
        # The fused kernel, not Adam's default per-tensor loop, which on the CPU launched a dozen
        # element-wise ops per parameter tensor per step: 1.11-1.14x the quick VAE's, CVAE's and
        # GAN's steps on 2 CPU cores, the PixelRNN's unchanged (benchmarks/RESULTS.md). The same
        # update, rounded in another order.
        fused = all(p.device.type in FUSED_ADAM_DEVICES for p in params)
        optimizers[name] = torch.optim.Adam(params, lr=cfg.player_lr.get(name, cfg.lr), betas=cfg.betas,
                                            weight_decay=cfg.weight_decay, fused=fused or None)
    return optimizers


def _make_schedulers(
    optimizers: Mapping[str, torch.optim.Optimizer], cfg: TrainConfig, steps_per_epoch: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-epoch, per-step) schedulers by player; at most one of the two is non-empty."""
    if cfg.scheduler == "cosine_steps":
        horizon = cfg.epochs * steps_per_epoch
        return {}, {n: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=horizon) for n, o in optimizers.items()}
    if cfg.scheduler == "cosine":
        return {n: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs) for n, o in optimizers.items()}, {}
    if cfg.scheduler == "step":
        step = max(1, cfg.epochs // 3)
        return {n: torch.optim.lr_scheduler.StepLR(o, step_size=step, gamma=0.3) for n, o in optimizers.items()}, {}
    return {}, {}


class _Progress:
    """A rich progress bar with loss and throughput, or nothing (workers other than the chief)."""

    def __init__(self, enabled: bool, total_epochs: int, steps_per_epoch: int, label: str) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total_epochs * steps_per_epoch, info="")

    def advance(self, info: str, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=steps, info=info)

    def set_completed(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def check_shared_examples(n_train: int, world_size: int) -> None:
    """Refuse fewer training examples than data-parallel workers: each needs one at least."""
    if n_train < world_size:
        raise ValueError(f"{n_train} training examples cannot be shared by {world_size} workers")


def train(
    model: GenerativeModel,
    snapshot,
    cfg: TrainConfig,
    context: TrainingContext | None = None,
    *,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
    finish: bool = True,
) -> TrainResult:
    """Train ``model`` on ``snapshot`` ("train" split; "val" for early stopping), then
    :func:`finish_training` it unless ``finish`` is false (a Ray worker: the driver rebuilds the
    model from the last checkpoint and finishes that one)."""
    ctx = context or LocalContext()
    check_global_batch(cfg.batch_size, ctx.world_size)
    device = resolve_device(cfg.device)
    model.to(device)
    train_split, val_split = snapshot.splits["train"], snapshot.splits.get("val")
    n_train = training_examples(cfg, train_split)
    check_shared_examples(n_train, ctx.world_size)
    steps_per_epoch = num_batches(n_train, cfg.batch_size, ctx.world_size)
    is_em = model.fit_method == "em"
    bf16 = not is_em and trains_in_bf16(cfg, device)
    optimizers = {} if is_em else _make_optimizers(model, cfg)
    # Per-step schedulers advance inside the epoch, right after their player's optimizer step.
    epoch_schedulers, step_schedulers = _make_schedulers(optimizers, cfg, steps_per_epoch)
    schedulers = {**epoch_schedulers, **step_schedulers}

    history: list[dict[str, float]] = []
    best_val, best_state, bad_epochs, start_epoch = math.inf, None, 0, 0
    saved = ctx.load_state()
    if saved is not None:
        try:
            ts = saved["train_state"]
            model.load_state_dict(saved["state_dict"])
            for name, opt in optimizers.items():
                opt.load_state_dict(ts["optimizers"][name])
            for name, sched in schedulers.items():
                sched.load_state_dict(ts["schedulers"][name])
            history, start_epoch, bad_epochs = list(ts["history"]), int(ts["epoch"]), int(ts["bad_epochs"])
            if model.validation_selects_weights:
                best_val, best_state = float(ts["best_val"]), ts.get("best_state_dict")
        except UNFITTING_STATE_ERRORS as exc:
            raise unresumable(ctx.state_url(), f"its {model.family} training state", exc) from exc
    elif is_em:
        _em_initialize(model, train_split, snapshot.image, cfg, ctx, n_train, device)

    wrapped = model if is_em else ctx.wrap(model)
    bar = _Progress(progress and ctx.is_chief, cfg.epochs, steps_per_epoch, f"train {model.family}")
    bar.set_completed(start_epoch * steps_per_epoch)
    # A run that stopped early is finished: running its plan again must not train on.
    stopped_early = early_stop_reached(cfg, best_state, bad_epochs)
    started = time.monotonic()
    try:
        for epoch in range(start_epoch, start_epoch if stopped_early else cfg.epochs):
            # Each epoch's randomness is a function of (seed, epoch, rank) alone: a resumed run
            # draws exactly what the uninterrupted one would, and workers never draw alike.
            torch.manual_seed(derive_seed(cfg.seed, epoch, ctx.rank))
            model.begin_epoch(epoch, cfg.epochs)
            model.train()
            t0 = time.perf_counter()
            epoch_batches = batches(
                train_split, snapshot.image, batch_size=cfg.batch_size, kind=model.train_input, seed=cfg.seed,
                epoch=epoch, shuffle=True, rank=ctx.rank, world_size=ctx.world_size, limit=n_train, device=device,
                pad=not is_em,  # EM's statistics are summed once, so no worker needs equal parts
            )
            if is_em:
                train_logs, seen = _em_epoch(model, epoch_batches, ctx, bar)
            else:
                train_logs, seen = _gradient_epoch(wrapped, model, optimizers, step_schedulers, epoch_batches, cfg,
                                                   bf16, bar, ctx)
            for sched in epoch_schedulers.values():
                sched.step()
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_logs.items()},
                      "seconds": seconds, "images_per_s": seen * ctx.world_size / max(seconds, 1e-9),
                      "bf16": float(bf16)}
            if val_split is not None and len(val_split.y):
                record["val_loss"] = _validation_loss(model, val_split, snapshot.image, cfg, ctx, device)
                if model.validation_selects_weights:
                    if record["val_loss"] < best_val - 1e-6:
                        best_val, bad_epochs = record["val_loss"], 0
                        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    else:
                        bad_epochs += 1
            history.append(record)
            stopped_early = early_stop_reached(cfg, best_state, bad_epochs)
            out_of_time = cfg.max_seconds is not None and _any_worker(
                time.monotonic() - started >= cfg.max_seconds, ctx, device)
            last = stopped_early or out_of_time or epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.checkpoint_every == 0 or last:
                state = _training_state(model, optimizers, schedulers, history, epoch + 1, best_val, bad_epochs,
                                        best_state, cfg, meta, resumed_from_epoch=start_epoch)
                ctx.save_state(state, epoch + 1, record)
            else:
                ctx.report(record)
            if stopped_early or out_of_time:
                break
    finally:
        bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    if finish:
        finish_training(model, snapshot, cfg, device)
    model.eval()
    return TrainResult(
        model=model, history=history, epochs_completed=len(history),
        best_val_loss=None if math.isinf(best_val) else best_val,
        stopped_early=stopped_early, resumed_from_epoch=start_epoch,
    )


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that says so, or a CPU with
    AVX512-BF16 or AMX. Without them CPU autocast emulates bf16 and trained 8-30x slower than fp32
    (benchmarks/RESULTS.md, "bf16 autocast"); with AVX512-BF16 it trained 1.2-1.7x faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def trains_in_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.autocast == "bf16" or (cfg.autocast == "auto" and native_bf16(device))


def _gradient_epoch(
    wrapped, model, optimizers, step_schedulers, epoch_batches, cfg, bf16: bool, bar, ctx: TrainingContext
) -> tuple[dict[str, float], int]:
    """One epoch of gradient steps: (each logged term's mean over all workers' steps, this worker's
    images). The progress bar shows this worker's running means; the history gets all workers'."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # Running sums stay on the device, in float64 (the same additions, in the same order, as
    # Python floats), and are read every SYNC_EVERY_STEPS steps: each read waits for the device,
    # and a GPU that is waited on every step cannot run ahead of the host.
    sums: dict[str, torch.Tensor] = {}
    # Per key: a term computed on some steps only (the GAN's lazy R1) averages over those steps.
    counts: dict[str, int] = {}
    seen = steps = read_at = 0
    means: dict[str, float] = {}
    t0 = time.perf_counter()
    for batch in epoch_batches:
        for player, opt in optimizers.items():
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = wrapped(batch, player)
            out["loss"].float().backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            if player in step_schedulers:
                step_schedulers[player].step()
            model.after_step(player)
            for key, value in out.items():
                name, term = _logged_name(key, player, optimizers), value.detach().double()
                sums[name] = sums[name] + term if name in sums else term
                counts[name] = counts.get(name, 0) + 1
        steps += 1
        seen += len(batch["y"])
        if steps % SYNC_EVERY_STEPS == 0:
            means = _checked_means(model.family, optimizers, sums, counts, read_at, steps)
            bar.advance(_progress_info(means, seen, t0), steps - read_at)
            read_at = steps
    if steps > read_at:  # the steps since the last read (none where the epoch ended on one)
        means = _checked_means(model.family, optimizers, sums, counts, read_at, steps)
        bar.advance(_progress_info(means, seen, t0), steps - read_at)
    return _all_workers_means(sums, counts, ctx), seen


def _all_workers_means(sums: Mapping[str, torch.Tensor], counts: Mapping[str, int], ctx: TrainingContext
                       ) -> dict[str, float]:
    """Each term's mean over every worker's steps: one all-reduce of the sums and counts (each
    worker's alone would record the chief's share of the data as the run's training loss).
    Every worker logs the same terms (they take the same steps); sorted, their tensors line up."""
    if not sums:
        return {}
    names = sorted(sums)
    totals = torch.cat([torch.stack([sums[k] for k in names]),
                        torch.tensor([float(counts[k]) for k in names], dtype=torch.float64,
                                     device=sums[names[0]].device)])
    totals = ctx.all_reduce_sum(totals).tolist()
    means = {k: totals[i] / totals[len(names) + i] for i, k in enumerate(names)}
    return {k: means[k] for k in sums}  # the order the model logs them in


def _logged_name(key: str, player: str, optimizers: Mapping[str, Any]) -> str:
    """A loss term's name in the epoch's logs: prefixed by its player where there are several."""
    return key if len(optimizers) == 1 else f"{player}_{key}"


def _progress_info(means: Mapping[str, float], seen: int, t0: float) -> str:
    head = next(iter(means))
    return f"{head} {means[head]:.3f}  {seen / max(time.perf_counter() - t0, 1e-9):.0f} img/s"


def _checked_means(family, optimizers, sums, counts, read_at, steps) -> dict[str, float]:
    """The running means, read from the device at once; a non-finite player loss since the last
    read stops training (nothing of the epoch has been checkpointed)."""
    totals = dict(zip(sums, torch.stack(list(sums.values())).tolist())) if sums else {}
    for player in optimizers:
        if not math.isfinite(totals.get(_logged_name("loss", player, optimizers), 0.0)):
            raise FloatingPointError(
                f"{family}: non-finite {player} loss in steps {read_at + 1}-{steps} of the epoch")
    return {k: v / counts[k] for k, v in totals.items()}


@torch.no_grad()
def _em_initialize(model, train_split, image, cfg, ctx, n_train, device) -> None:
    if ctx.is_chief:
        first = batches(train_split, image, batch_size=cfg.em_init_examples, kind=model.train_input, seed=cfg.seed,
                        epoch=0, shuffle=True, limit=n_train, device=device)
        batch = next(first)
        model.em_initialize(batch["x"], cfg.seed, y=batch["y"])
    for buffer in list(model.parameters()) + list(model.buffers()):
        ctx.broadcast_(buffer.data)


@torch.no_grad()
def _em_epoch(model, epoch_batches, ctx, bar) -> tuple[dict[str, float], int]:
    totals: dict[str, torch.Tensor] = {}
    seen = 0
    for batch in epoch_batches:
        for key, value in model.em_accumulate(batch).items():
            totals[key] = totals[key] + value if key in totals else value.clone()
        seen += len(batch["y"])
        bar.advance(f"E-step {seen} images")
    totals = {k: ctx.all_reduce_sum(v) for k, v in sorted(totals.items())}
    model.em_update(totals)
    return {"loss": float(-totals["loglik_sum"] / totals["count"])}, seen


def finish_training(model: GenerativeModel, snapshot, cfg: TrainConfig, device: torch.device) -> None:
    """``model.after_training`` on one pass over the whole training set (binarized as no epoch
    was): a function of the trained weights, the data and the seed, wherever it runs."""
    train_split = snapshot.splits["train"]
    model.after_training(batches(train_split, snapshot.image, batch_size=cfg.batch_size, kind=model.train_input,
                                 seed=cfg.seed, epoch=cfg.epochs, limit=training_examples(cfg, train_split),
                                 device=device), cfg.seed)


def shipped_model(state: Mapping[str, Any], snapshot, device: torch.device, *,
                  where: str | None = None) -> GenerativeModel:
    """What a run ships had it ended at the training ``state`` (a checkpoint): the best epoch's
    weights where validation selects them, else the last step's, then finished. ``where``: the
    URL the state was read from, which its errors name."""
    model = model_from_checkpoint(state, where=where)
    try:
        ts = state["train_state"]
        if model.validation_selects_weights and ts.get("best_state_dict") is not None:
            model.load_state_dict(ts["best_state_dict"])
        train_cfg = TrainConfig.from_dict(ts["train_config"])
    except UNFITTING_STATE_ERRORS as exc:
        # No --fresh here: like model_from_checkpoint's, the error only names what it was handed
        # (a run's driver reads the state its workers just resumed from or wrote).
        raise unfitting(where, f"its {model.family} training state", exc) from exc
    finish_training(model, snapshot, train_cfg, device)
    return model.eval()


def training_examples(cfg: TrainConfig, train_split) -> int:
    """How many of the split's first examples training reads (``max_train_examples`` caps it)."""
    n = len(train_split.y)
    return n if cfg.max_train_examples is None else min(cfg.max_train_examples, n)


@torch.no_grad()
def _validation_loss(model, val_split, image, cfg, ctx, device) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches(val_split, image, batch_size=cfg.batch_size, kind=model.train_input, seed=cfg.seed,
                         rank=ctx.rank, world_size=ctx.world_size, limit=cfg.max_val_examples, pad=False,
                         device=device):
        total[0] += float(model.validation_loss(batch)) * len(batch["y"])
        total[1] += len(batch["y"])
    total = ctx.all_reduce_sum(total)
    return float(total[0] / total[1])


def _any_worker(flag: bool, ctx: TrainingContext, device: torch.device | str) -> bool:
    """``flag`` of any worker, the same answer on all: each worker reads its own clock, and one
    that stopped alone would leave the others waiting in the next epoch's collectives."""
    return bool(ctx.all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def early_stop_reached(cfg: TrainConfig, best_state: Mapping[str, Any] | None, bad_epochs: int) -> bool:
    """Whether validation has not improved for the patience's number of epochs (never for a
    model whose validation loss selects nothing: ``best_state`` stays None)."""
    patience = cfg.early_stopping_patience
    return patience is not None and best_state is not None and bad_epochs >= patience


def _training_state(model, optimizers, schedulers, history, epoch, best_val, bad_epochs, best_state, cfg,
                    meta, resumed_from_epoch) -> bytes:
    state = checkpoint_dict(model, meta)
    state["train_state"] = {
        "epoch": epoch,
        "resumed_from_epoch": resumed_from_epoch,
        "history": copy.deepcopy(history),
        "best_val": best_val,
        "bad_epochs": bad_epochs,
        "best_state_dict": best_state,
        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
        "train_config": cfg.to_dict(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
