"""The steps of a training run and where their results live in object storage.

Used by the CLI and, later, by the Prefect tasks, so each step exists once. Layout under a
storage root (``file://`` or ``s3://``)::

    snapshots/<dataset>/<hash16>/...            dataset snapshot + manifest.json
    classifiers/<hash16>.pt                     domain feature network (evaluation cache)
    runs/<dataset>/<family>-<preset>/
        checkpoint.pt                           resumable training state (also a model checkpoint)
        model.pt                                the trained model (best validation loss; the GAN: last epoch)
        history.json  metrics.json              per-epoch training log, evaluation metrics
        evaluation.json                         what the metrics were measured with (settings, seed, networks)
        samples.png  interpolation.png ...      pictures
        onnx/<graph>.onnx                       exported graphs, parity-checked against torch
    reports/<dataset>-<preset>.md               metrics table of the families run together
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from genmodels.data import PrepConfig, Snapshot, prepare, read_snapshot, snapshot_prefix, write_snapshot
from genmodels.models import checkpoint_bytes, initial_model, load_checkpoint, model_from_checkpoint
from genmodels.models.base import GenerativeModel
from genmodels.storage import Storage
from genmodels.training import (RESUME_FREE_TRAIN_FIELDS, START_OVER, UNFITTING_STATE_ERRORS, LocalContext, TrainConfig,
                                TrainResult, load_resume_state, preset_configs, resolve_device, train, unresumable)

ONNX_PREFIX = "onnx"


def run_prefix(dataset: str, family: str, preset: str) -> str:
    return f"runs/{dataset}/{family}-{preset}"


#: Seconds the lease of a family's runs outlives a holder that stopped renewing it (killed).
RUN_LEASE_TTL_S = 300.0


def run_lease(storage: Storage | str, dataset: str, family: str):
    """The lease on a (dataset, family)'s runs: one writer at a time, whoever it is (the retrain
    flow, `genmodels train`, `run`, `evaluate`). Two writers of one run directory would mix one
    model's metrics, pictures and graphs with another's weights."""
    from genmodels.lease import Lease

    return Lease(storage, f"retrain/{dataset}/{family}", ttl_s=RUN_LEASE_TTL_S)


def snapshot_for(storage: Storage, dataset: str, location: str | None, prep: PrepConfig) -> Snapshot:
    """Prepare the dataset and persist its snapshot (a no-op when the same one is stored)."""
    snapshot = prepare(dataset, location, prep)
    write_snapshot(snapshot, storage)
    return snapshot


def saw_test_images(trained_on: Snapshot, scored_on: Snapshot) -> bool:
    """Whether a model trained on ``trained_on`` saw, in training or validation, images of
    ``scored_on``'s test split that ``scored_on``'s own model did not: its metric there would be
    optimistic. Sources without their own test split (digits, image folders) draw it from the
    seed and the image count, so another seed or a grown folder moves test images into training.
    A dataset's own repeats (an image in both its train and test files) are no such image: both
    models saw it. Compared image by image, not in counts: repeats the candidate saw do not
    offset test images only the champion saw."""
    def rows(*splits) -> set[bytes]:
        return {hashlib.sha256(row.tobytes()).digest() for split in splits for row in split.x}

    test = [hashlib.sha256(row.tobytes()).digest() for row in scored_on.splits["test"].x]
    seen = rows(trained_on.splits["train"], trained_on.splits["val"])
    own = rows(scored_on.splits["train"], scored_on.splits["val"])
    return any(h in seen and h not in own for h in test)


def load_snapshot(storage: Storage, prefix: str) -> Snapshot:
    return read_snapshot(storage, prefix)


@dataclass
class TrainOutcome:
    result: TrainResult
    run: Storage
    train_config: TrainConfig

    @property
    def finished(self) -> bool:
        """Whether training ran its plan out (every epoch, or early stopping) rather than
        stopping on a time budget with epochs left."""
        return self.result.stopped_early or self.result.epochs_completed >= self.train_config.epochs


def plan_run(
    snapshot: Snapshot,
    family: str,
    preset: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
) -> tuple[GenerativeModel, TrainConfig, dict[str, Any]]:
    """The fresh model, the training config (preset + overrides) and the checkpoint metadata of
    a run: what local and Ray training both start from."""
    model_cfg, train_cfg = preset_configs(family, preset)
    model_cfg.update(model_overrides or {})
    train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), **(overrides or {})})
    model = initial_model(family, snapshot.image, model_cfg, train_cfg.seed)
    meta = {"snapshot_hash": snapshot.hash, "dataset": snapshot.dataset, "preset": preset,
            "class_names": list(snapshot.class_names)}
    return model, train_cfg, meta


def finish_run(run: Storage, result: TrainResult, train_cfg: TrainConfig, meta: Mapping[str, Any]) -> None:
    """Write the trained model (best weights) and the epoch log of a run. When the weights differ
    from the stored model's, what was derived from those (metrics, pictures, ONNX graphs) goes
    first: a report or a registration in between must not pass the old model's figures or
    graphs off as the new one's."""
    new_meta = {**meta, "train_config": train_cfg.to_dict(), "epochs": result.epochs_completed}
    keep = False
    if run.exists("model.pt"):
        stored = load_checkpoint(run.get_bytes("model.pt"), where=run.url_for("model.pt"))
        if not same_weights(stored["state_dict"], result.model.state_dict()):
            for key in derived_keys(run):
                run.delete(key)
        else:
            # The same model of the same plan keeps its bytes, so the registry's digest of them:
            # another budget or device of this invocation would otherwise register it twice.
            keep = _plan_of(stored.get("meta") or {}) == _plan_of(new_meta)
    if not keep:
        run.put_bytes("model.pt", checkpoint_bytes(result.model, new_meta))
    run.put_bytes("history.json", json.dumps(result.history, indent=2).encode())


def _plan_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A model's metadata without what only one invocation set (its budget, device, cadence)."""
    train = {k: v for k, v in (meta.get("train_config") or {}).items() if k not in RESUME_FREE_TRAIN_FIELDS}
    return {**meta, "train_config": train}


def same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def picture_keys(run: Storage) -> list[str]:
    """The run's pictures (``samples.png``, ``interpolation.png``, ...), as evaluation wrote them."""
    return [k for k in run.list() if "/" not in k and k.endswith(".png")]


def derived_keys(run: Storage) -> list[str]:
    """The run's keys computed from its ``model.pt``: evaluation metrics, pictures, ONNX graphs."""
    metrics = [k for k in ("metrics.json", EVALUATION_RECORD) if run.exists(k)]
    return metrics + picture_keys(run) + run.list(f"{ONNX_PREFIX}/")


def train_family(
    storage: Storage,
    snapshot: Snapshot,
    family: str,
    preset: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    fresh: bool = False,
    progress: bool = False,
    on_epoch: Callable[[Mapping[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train one family in this process with a preset (plus overrides), resuming an interrupted run."""
    model, train_cfg, meta = plan_run(snapshot, family, preset, overrides=overrides, model_overrides=model_overrides)
    run = storage.child(run_prefix(snapshot.dataset, family, preset))
    if fresh:
        run.delete("checkpoint.pt")
    _check_resumable(run, model, train_cfg, meta)
    result = train(model, snapshot, train_cfg, LocalContext(run, on_epoch=on_epoch), progress=progress,
                   meta=meta)
    finish_run(run, result, train_cfg, meta)
    return TrainOutcome(result=result, run=run, train_config=train_cfg)


def _check_resumable(run: Storage, model: GenerativeModel, train_cfg: TrainConfig, meta: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint of another model config, training config or dataset snapshot
    (a resumed schedule, epoch count or seed that changed would train neither run's plan)."""
    if not run.exists("checkpoint.pt"):
        return
    where = run.url_for("checkpoint.pt")
    saved = load_resume_state(run.get_bytes("checkpoint.pt"), where)
    if saved["family"] != model.family:
        raise ValueError(f"{where} was trained with another model config "
                         f"(family {saved['family']!r} -> {model.family!r}); {START_OVER}")
    # Compared as configs, not dicts: a checkpoint written before a field with a default was
    # added has the same config and resumes. One written by a version with fields this one lacks
    # builds none.
    try:
        then_model = model.config_class.from_dict(saved["config"])
    except UNFITTING_STATE_ERRORS as exc:
        raise unresumable(where, f"its {model.family} model config", exc) from exc
    if then_model != model.config:
        # Named like the training config's below: a bare "another model config" leaves the user to
        # diff the configs by hand (a preset whose model changed between versions, say).
        then, now = then_model.to_dict(), model.config.to_dict()
        changed = [f"{k} {then[k]!r} -> {now[k]!r}" for k in now if then[k] != now[k]]
        raise ValueError(f"{where} was trained with another model config ({', '.join(changed)}); {START_OVER}")
    if saved["meta"].get("snapshot_hash") != meta["snapshot_hash"]:
        raise ValueError(f"{where} was trained on another dataset snapshot; {START_OVER}")
    try:
        then = TrainConfig.from_dict(saved["train_state"]["train_config"]).to_dict()
    except UNFITTING_STATE_ERRORS as exc:
        raise unresumable(where, "its training config", exc) from exc
    now = train_cfg.to_dict()
    changed = [f"{k} {then[k]!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE_TRAIN_FIELDS and then[k] != now[k]]
    if changed:
        raise ValueError(f"{where} was trained with another training config ({', '.join(changed)}); {START_OVER}")


def load_model(run: Storage) -> tuple[GenerativeModel, dict[str, Any]]:
    if not run.exists("model.pt"):
        raise FileNotFoundError(f"no trained model at {run.url_for('model.pt')}: run `genmodels train` first")
    where = run.url_for("model.pt")
    ckpt = load_checkpoint(run.get_bytes("model.pt"), where=where)
    return model_from_checkpoint(ckpt, where=where), ckpt["meta"]


#: A run's record of how its metrics.json was measured: the preset's evaluation settings
#: (:func:`genmodels.evaluation.evaluation_settings`), the seed, and the digests of the domain
#: classifier (``feature_network``) and class judge (``class_judge``) whose spaces its sample
#: figures live in.
EVALUATION_RECORD = "evaluation.json"


def evaluation_record(run: Storage) -> dict[str, Any]:
    """The run's :data:`EVALUATION_RECORD`; empty for a run evaluated before it was written."""
    return json.loads(run.get_bytes(EVALUATION_RECORD)) if run.exists(EVALUATION_RECORD) else {}


def evaluate_model(storage: Storage, model: GenerativeModel, snapshot: Snapshot, preset: str,
                   seed: int = 0, progress: Storage | None = None, deadline: float | None = None,
                   provenance: dict[str, str] | None = None) -> dict[str, float]:
    """Evaluation metrics of ``model`` on ``snapshot``'s test split, with the preset's effort;
    ``progress`` (e.g. the run's storage) lets an interrupted likelihood pass resume, and
    ``deadline`` pauses it (:class:`genmodels.evaluation.LikelihoodPassPaused`);
    ``provenance`` receives the digests of the networks the sample figures were measured with
    (``genmodels.evaluation.domain_metrics``)."""
    from genmodels.evaluation import evaluate, evaluation_settings

    settings = evaluation_settings(preset)
    # The exact families' passes in the batches they run fastest in: the pixel-by-pixel samplers
    # in large ones; the likelihood's row recurrences on the CPU in batches of 64, whose maps stay
    # in cache (the `cpu` PixelRNN's test pass ran 1.5x as fast as in batches of 256). The VAEs
    # keep the default: their IWAE draws are seeded per batch, and each already batches k samples.
    if not model.has_latent:
        on_gpu = next(model.parameters()).device.type == "cuda"
        settings["batch_size"] = 1000 if on_gpu else 64
        settings["sample_batch_size"] = 1000
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    metrics = evaluate(model, snapshot, storage=storage, seed=seed, progress=progress, deadline=deadline,
                       provenance=provenance, **settings)
    # This call's time only; ``likelihood_seconds`` is the likelihood pass's, summed over the calls
    # of a pass resumed after a pause or a kill.
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def evaluate_run(storage: Storage, run: Storage, snapshot: Snapshot, preset: str, seed: int = 0,
                 deadline: float | None = None) -> dict[str, float]:
    """Evaluate a trained run, write its :data:`EVALUATION_RECORD`, metrics.json and pictures,
    return the metrics. Past ``deadline`` (a :func:`time.monotonic` instant) its likelihood pass
    pauses with :class:`genmodels.evaluation.LikelihoodPassPaused`, writing nothing but its
    progress, which the next call resumes."""
    from genmodels.evaluation import evaluation_settings, render_pictures

    model, meta = load_model(run)
    if meta.get("snapshot_hash") != snapshot.hash:
        raise ValueError(f"{run.url} was trained on snapshot {meta.get('snapshot_hash', '?')[:16]}, "
                         f"not on {snapshot.hash[:16]}")
    # Evaluate where training ran (a GPU when there is one); the pictures are cheap on the CPU.
    provenance: dict[str, str] = {}
    metrics = evaluate_model(storage, model.to(resolve_device("auto")), snapshot, preset, seed=seed, progress=run,
                             deadline=deadline, provenance=provenance)
    record = {"settings": evaluation_settings(preset), "seed": seed, **provenance}
    run.put_bytes(EVALUATION_RECORD, json.dumps(record, indent=2, sort_keys=True).encode())
    run.put_bytes("metrics.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
    for name, png in render_pictures(model.cpu(), snapshot, seed=seed).items():
        run.put_bytes(name, png)
    return metrics


#: Where a champion re-evaluated for a promotion keeps its likelihood pass's progress, per model digest.
REEVALUATIONS_PREFIX = "reevaluations"


def reevaluate_champion(storage: Storage, snapshot: Snapshot, checkpoint: bytes, tags: Mapping[str, str],
                        preset: str, seed: int = 0, feature_network: str | None = None,
                        where: str = "champion",
                        read_snapshot_at: Callable[[str], Snapshot] | None = None) -> tuple[float | None, str]:
    """A champion's gate metric measured as a candidate's was: on the candidate's test
    ``snapshot``, with ``preset``'s evaluation settings and ``seed``, and a FID in the features of
    the candidate's domain classifier (``feature_network``, the candidate's weights digest of it).

    ``checkpoint`` and ``tags`` are the champion's (its registry tags: dataset, snapshot hash,
    gate metric). Returns ``(value, "")`` (NaN when its evaluation gives non-finite figures), or
    ``(None, why)`` when no comparable value can be had:
    another image format, a champion trained on some of these test images (or on a snapshot not
    in ``storage`` to check), a FID that ``storage``'s classifier would measure in other features
    than the candidate's. ``read_snapshot_at`` reads the champion's snapshot by prefix (default: from
    ``storage``; a flow passes its cached reader, its families' champions sharing one snapshot)."""
    from genmodels.registry import FEATURE_SPACE_METRICS, model_digest

    model = model_from_checkpoint(checkpoint, where=where)
    if model.image != snapshot.image:
        return None, f"it generates {model.image}, the candidate's test images are {snapshot.image}"
    trained_prefix = snapshot_prefix(tags["genmodels.dataset"], tags["genmodels.snapshot_hash"])
    try:
        trained_on = (read_snapshot_at or (lambda prefix: load_snapshot(storage, prefix)))(trained_prefix)
    except FileNotFoundError:
        return None, (f"its snapshot {trained_prefix} is not in {storage.url}: whether it trained on the "
                      "candidate's test images cannot be checked")
    if saw_test_images(trained_on, snapshot):
        return None, "it trained on some of the candidate's test images: its figure there would be optimistic"
    metric = tags["genmodels.gate_metric"]
    used: dict[str, str] = {}
    # Where the candidate was evaluated (a GPU when there is one: a `full` champion's IWAE k=5000
    # pass took hours on the CPU, holding the promotion's lease), and resumable as the candidate's
    # pass is: a promote task that dies or retries continues it. The progress record is keyed by
    # weights, snapshot, seed and device, so one prefix per champion never mixes two passes.
    progress = storage.child(f"{REEVALUATIONS_PREFIX}/{model_digest(checkpoint)}")
    try:
        value = evaluate_model(storage, model.to(resolve_device("auto")), snapshot, preset, seed=seed,
                               progress=progress, provenance=used)[metric]
    except FloatingPointError:
        # Non-finite figures (NaN weights, samples that broke) are NaN in any classifier's features:
        # the registry hands such a champion's place to the candidate; raised, every retrain would fail.
        return math.nan, ""
    if metric in FEATURE_SPACE_METRICS and (feature_network is None or used.get("feature_network") != feature_network):
        return None, (f"its {metric} would be measured in other domain-classifier features than the candidate's "
                      f"({(used.get('feature_network') or '?')[:12]} against {(feature_network or 'unknown')[:12]})")
    return float(value), ""


def export_run(run: Storage) -> list[str]:
    """Export the run's model to ONNX, check the graphs against torch (a disagreement raises
    ``ExportParityError`` and nothing is written), store them under ``onnx/``; returns the keys."""
    from genmodels.export import check_parity, export_sampler

    model, _ = load_model(run)
    with tempfile.TemporaryDirectory() as tmp:
        files = export_sampler(model, tmp)
        check_parity(model, files)
        stale = [k for k in run.list(f"{ONNX_PREFIX}/") if Path(k).name not in {f.name for f in files}]
        for key in stale:
            run.delete(key)
        keys = []
        for f in files:
            keys.append(f"{ONNX_PREFIX}/{f.name}")
            run.put_bytes(keys[-1], f.read_bytes())
    return keys


def fetch_onnx(run: Storage, directory: str | Path) -> list[Path]:
    """Copy the run's exported graphs into a local directory (onnxruntime reads files)."""
    keys = run.list(f"{ONNX_PREFIX}/")
    if not keys:
        raise FileNotFoundError(f"no ONNX graphs under {run.url_for(ONNX_PREFIX)}: export the run first")
    paths = []
    for key in keys:
        path = Path(directory) / Path(key).name
        path.write_bytes(run.get_bytes(key))
        paths.append(path)
    return paths


def collect_metrics(storage: Storage, dataset: str, preset: str, snapshot_hash: str) -> dict[str, dict[str, float]]:
    """Evaluation metrics of every family evaluated on this snapshot, plus its training time
    (the sum of its epochs' times, so a resumed run still counts every epoch once)."""
    from genmodels.models import FAMILIES

    rows = {}
    for family in FAMILIES:
        run = storage.child(run_prefix(dataset, family, preset))
        try:
            model = load_checkpoint(run.get_bytes("model.pt"), where=run.url_for("model.pt"))
            if model["meta"].get("snapshot_hash") != snapshot_hash:
                continue
            metrics = json.loads(run.get_bytes("metrics.json"))
            history = json.loads(run.get_bytes("history.json")) if run.exists("history.json") else []
        except FileNotFoundError:
            # Not evaluated, or being retrained right now by another process (finish_run removes
            # the old figures before placing new weights): no row rather than a failed report.
            continue
        seconds = sum(h.get("seconds", 0.0) for h in history)
        images = sum(h.get("images_per_s", 0.0) * h.get("seconds", 0.0) for h in history)
        rows[family] = {**metrics, "train_seconds": seconds, "train_epochs": float(len(history)),
                        "train_images_per_s": images / seconds if seconds else 0.0}
    return rows


def comparison_png(storage: Storage, dataset: str, preset: str, snapshot_hash: str, n: int = 10,
                   seed: int = 0, metrics: Mapping[str, Mapping[str, float]] | None = None) -> bytes | None:
    """One row of ``n`` samples per family trained on this snapshot (same seed for all;
    class-conditional families draw classes 0, 1, 2, ...), each row headed by its family and
    gate figure from ``metrics`` (``collect_metrics``'s rows; a family without one is named
    alone): the lecture's comparison at a glance. None when no family has a model yet."""
    from genmodels.images import labelled_rows_png
    from genmodels.models import FAMILIES

    rows, labels = [], []
    for family in FAMILIES:
        run = storage.child(run_prefix(dataset, family, preset))
        if not run.exists("model.pt"):
            continue
        model, meta = load_model(run)
        if meta.get("snapshot_hash") != snapshot_hash:
            continue
        classes = torch.arange(n) % model.image.num_classes if model.conditional else None
        rows.append(model.sample(n, labels=classes, seed=seed).cpu())
        labels.append(_row_label(family, (metrics or {}).get(family, {})))
    return labelled_rows_png(torch.cat(rows), labels) if rows else None


def _row_label(family: str, metrics: Mapping[str, float]) -> str:
    """``vae 233.7 nats`` / ``gan FID 11.71``: the family and the figure its promotion is gated on."""
    from genmodels.registry import gate_metric

    metric = gate_metric(family)
    if metric not in metrics:
        return family
    return f"{family} FID {metrics[metric]:.2f}" if metric == "fid" else f"{family} {metrics[metric]:.1f} nats"


@dataclass
class Report:
    markdown: str
    markdown_key: str
    picture: bytes | None  # None when no family has a model on this snapshot yet
    picture_key: str


def write_report(storage: Storage, snapshot: Snapshot, preset: str, seed: int = 0) -> Report:
    """The families of ``preset`` side by side on ``snapshot``: the metrics table as
    ``reports/<dataset>-<preset>.md`` and one row of samples per family (same seed) as
    ``reports/<dataset>-<preset>.png``; the one writer of both, for the CLI and the pipelines."""
    rows = collect_metrics(storage, snapshot.dataset, preset, snapshot.hash)
    # A bare header row would read as a broken table where the truth is that nothing has figures yet
    # (every family stopped by its time budget, or paused in its evaluation).
    table = metrics_table(rows) if rows else (
        f"No family of preset {preset} has been evaluated on this snapshot yet: none has figures to report.\n")
    header = (f"# {snapshot.dataset}, preset {preset}, snapshot {snapshot.hash[:16]} ({snapshot.image.quantization})\n\n"
              "Test split. nll_nats: negative log-likelihood in nats/image (exact, or IWAE for the VAEs; lower "
              "is better); elbo_nats: the ELBO itself (a lower bound on log p). FID/KID on the domain "
              "classifier's features; class_accuracy of conditional samples; train_seconds: sum of epoch times.\n\n")
    report = Report(header + table, f"reports/{snapshot.dataset}-{preset}.md",
                    comparison_png(storage, snapshot.dataset, preset, snapshot.hash, seed=seed, metrics=rows),
                    f"reports/{snapshot.dataset}-{preset}.png")
    storage.put_bytes(report.markdown_key, report.markdown.encode())
    if report.picture is not None:
        storage.put_bytes(report.picture_key, report.picture)
    return report


REPORT_COLUMNS = ("nll_nats", "bits_per_dim", "elbo_nats", "fid", "fid_real_floor", "kid", "precision", "recall",
                  "class_accuracy", "completion_nll_nats", "train_seconds", "train_images_per_s")


def metrics_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """A markdown table: one row per family, the metrics that any family reported."""
    present = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| family | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for family, r in rows.items():
        cells = [_fmt(r.get(c)) for c in present]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
