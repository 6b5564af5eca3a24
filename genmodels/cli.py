"""The `genmodels` command: prepare data, train, evaluate and sample, on the embedded defaults."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown

try:
    from genmodels.cli_options import (  # noqa: F401 - PRESETS: the presets the commands offer, read by tests
        DEFAULT_FAMILIES, PRESETS, TEMPERATURE_HELP, ChannelsOpt, DatasetOpt, FamilyOpt, ImageSizeOpt, OutOpt,
        PresetOpt, QuantOpt, SamplingSeedOpt, SeedOpt, SourceOpt, console, device_choice, family_list,
        friendly_errors, train_overrides,
    )
except ModuleNotFoundError as exc:
    # A serving-only install (no `train` extra) has the runtime but not the models' code.
    if exc.name not in ("torch", "sklearn"):
        raise
    raise SystemExit(f"genmodels: this command line trains, evaluates and exports models and needs {exc.name}, "
                     "which this install lacks: pip install 'genmodels[pipelines]' (or [all]). A serving-only "
                     "install serves the registry's champions with `serve run serving/config.yaml`.") from None
from genmodels.config import get_settings

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True)
data_app = typer.Typer(help="Dataset sources and snapshots.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _storage(out: str | None):
    from genmodels.storage import check_reachable, open_storage

    storage = open_storage(out or get_settings().storage_url)
    check_reachable(storage)
    return storage


def _snapshot(storage, dataset: str, source: str | None, quantization: str, seed: int, image_size, channels):
    from genmodels.data import PrepConfig
    from genmodels.runs import snapshot_for

    prep = PrepConfig(quantization=quantization, seed=seed, image_size=image_size, channels=channels)
    if dataset == "fashion-mnist" and source is None:
        source = get_settings().fashion_mnist_dir
    with console.status(f"preparing {dataset} ({quantization})"):
        return snapshot_for(storage, dataset, source, prep)


def _families(spec: str) -> list[str]:
    from genmodels.models import parse_families

    return parse_families(spec)


@contextmanager
def _run_lease(storage, dataset: str, family: str):
    """Hold the (dataset, family) run lease (:func:`genmodels.runs.run_lease`) for the block;
    a :class:`~genmodels.lease.LeaseLost` raised by its ``check()`` in the block ends the command
    with one line and exit code 2, as friendly_errors ends it for a busy lease."""
    from genmodels.lease import LeaseLost
    from genmodels.runs import run_lease

    try:
        with run_lease(storage, dataset, family) as lease:
            yield lease
    except LeaseLost as exc:
        console.print(f"[bold red]error:[/] {family}: {exc}: this command stalled past the lease's expiry and "
                      "another one took the run over; stopped here")
        raise typer.Exit(code=2) from None


@data_app.command("prepare")
@friendly_errors
def data_prepare(
    dataset: DatasetOpt = "fashion-mnist", source: SourceOpt = None, quantization: QuantOpt = "binary",
    seed: SeedOpt = 0, image_size: ImageSizeOpt = None, channels: ChannelsOpt = "L", out: OutOpt = None,
) -> None:
    """Validate a source, quantize, split, and write a content-hashed snapshot."""
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, image_size, channels)
    manifest = snap.manifest()
    console.print(f"snapshot [bold]{snap.hash[:16]}[/] of {dataset}: "
                  + ", ".join(f"{k}={len(s.y)}" for k, s in snap.splits.items())
                  + f", image {snap.image.shape}, {snap.image.quantization}")
    typer.echo(json.dumps({"hash": snap.hash, "storage": storage.url, "manifest": manifest}, indent=2, default=str))


@app.command("train")
@friendly_errors
def train_cmd(
    family: FamilyOpt = "vae", dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick",
    source: SourceOpt = None, quantization: QuantOpt = "binary", seed: SeedOpt = 0, out: OutOpt = None,
    image_size: ImageSizeOpt = None, channels: ChannelsOpt = "L",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Override the preset's epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Override the preset's batch size.")] = None,
    max_train_examples: Annotated[Optional[int], typer.Option(min=1, help="Cap the training examples.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Where to train (auto: CUDA when present).",
                                                  **device_choice())] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint and start over.")] = False,
) -> None:
    """Train one family (resumes from the run's last checkpoint unless --fresh)."""
    from genmodels.runs import train_family

    (family,) = _families(family)
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, image_size, channels)
    overrides = {"seed": seed, **train_overrides(epochs, batch_size, max_train_examples, device)}
    with _run_lease(storage, snap.dataset, family) as lease:
        outcome = train_family(storage, snap, family, preset, overrides=overrides, fresh=fresh, progress=True)
        # Superseded meanwhile, the run's model.pt may be the other holder's: not reported as ours.
        lease.check()
    r = outcome.result
    note = f" (resumed at epoch {r.resumed_from_epoch})" if r.resumed_from_epoch else ""
    console.print(f"trained {family} for {r.epochs_completed} epochs{note}"
                  f"{', stopped early' if r.stopped_early else ''}; best val loss "
                  f"{r.best_val_loss if r.best_val_loss is None else round(r.best_val_loss, 4)} -> "
                  f"{outcome.run.url_for('model.pt')}")


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    family: FamilyOpt = "vae", dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick",
    source: SourceOpt = None, quantization: QuantOpt = "binary", seed: SeedOpt = 0, out: OutOpt = None,
    image_size: ImageSizeOpt = None, channels: ChannelsOpt = "L",
    max_eval_minutes: Annotated[Optional[float], typer.Option(
        min=0.0,
        help="Pause the likelihood pass after the batch of test images that crosses this many minutes (its "
             "sums written; exit code 3: running the same command again goes on).")] = None,
) -> None:
    """Evaluate a trained run: likelihoods, domain FID/KID, class accuracy, pictures."""
    from genmodels.evaluation import LikelihoodPassPaused
    from genmodels.runs import evaluate_run, run_prefix

    (family,) = _families(family)
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, image_size, channels)
    run = storage.child(run_prefix(snap.dataset, family, preset))
    deadline = None if max_eval_minutes is None else time.monotonic() + 60.0 * max_eval_minutes
    with _run_lease(storage, snap.dataset, family) as lease:
        try:
            with console.status(f"evaluating {family}"):
                metrics = evaluate_run(storage, run, snap, preset, seed=seed, deadline=deadline)
        except LikelihoodPassPaused as paused:
            lease.check()
            console.print(_paused_message(family, paused))
            raise typer.Exit(code=3) from None
        # Superseded meanwhile, these metrics may be of a model another holder has since replaced.
        lease.check()
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True))


def _goes_on(fresh: bool = False) -> str:
    # --fresh deletes the checkpoint on every invocation: the same command would start over.
    return "run it again without --fresh to go on" if fresh else "the same command goes on"


def _paused_message(family: str, paused, fresh: bool = False) -> str:
    return (f"{family}: the evaluation's time budget paused its likelihood pass after {paused.done} of "
            f"{paused.total} test images; not evaluated yet ({_goes_on(fresh)})")


@app.command("sample")
@friendly_errors
def sample_cmd(
    family: FamilyOpt = "vae", dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick",
    out: OutOpt = None, n: Annotated[int, typer.Option("--n", min=1, max=4096, help="Number of images.")] = 64,
    seed: SamplingSeedOpt = 0,
    label: Annotated[Optional[int], typer.Option(help="Class label (conditional models).")] = None,
    temperature: Annotated[float, typer.Option(min=1e-3, help=TEMPERATURE_HELP)] = 1.0,
    png: Annotated[Path, typer.Option("--png", help="Where to write the PNG grid.")] = Path("samples.png"),
    checkpoint: Annotated[Optional[Path], typer.Option(help="Sample from this model checkpoint instead of a run.")] = None,
) -> None:
    """Sample a PNG grid from a trained model (same seed -> same images)."""
    from genmodels.images import grid_png
    from genmodels.models import model_from_checkpoint
    from genmodels.runs import load_model, run_prefix

    (family,) = _families(family)
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    else:
        model, _ = load_model(_storage(out).child(run_prefix(dataset, family, preset)))
    labels = model.check_labels(label, n, field="--label")  # refused naming the option, not the API's field
    images = model.sample(n, labels=labels, seed=seed, temperature=temperature)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(grid_png(images))
    console.print(f"{n} samples of {model.family} (seed {seed}) -> {png}")


def read_image_png(path: Path, shape: tuple[int, int, int]) -> "np.ndarray":
    """A PNG file -> float32 [C, H, W] in [0, 1] for a model of image ``shape``: grey (8- or
    1-bit) for 1 channel, RGB for 3; the size must be the model's (no resizing: it would
    invent the very pixels a completion keeps exactly)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        picture = Image.open(path, formats=["PNG"])
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a PNG image ({exc})") from None
    with picture:
        if picture.size != (width, height):
            raise ValueError(f"{path}: the model takes {width}x{height} images, got {picture.size[0]}x{picture.size[1]}")
        modes = {1: ("L", "1"), 3: ("RGB",)}[channels]
        if picture.mode not in modes:
            raise ValueError(f"{path}: the model takes {'grey' if channels == 1 else 'RGB'} images, "
                             f"got PNG mode {picture.mode!r}")
        try:
            pixels = np.asarray(picture.convert("L") if picture.mode == "1" else picture, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:  # the header read, the pixels do not decode
            raise ValueError(f"{path}: unreadable PNG ({exc})") from None
    return (pixels.reshape(height, width, channels).transpose(2, 0, 1) / np.float32(255)).astype(np.float32)


@app.command("complete")
@friendly_errors
def complete_cmd(
    image: Annotated[Path, typer.Option("--image", help="PNG of the model's size (grey, or RGB for 3 channels).")],
    family: FamilyOpt = "pixelrnn", dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick",
    out: OutOpt = None,
    known_rows: Annotated[Optional[int], typer.Option("--known-rows", help="Rows known from the top.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Mixture only: PNG, white = known pixel.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=4096, help="Number of completions.")] = 8,
    seed: SamplingSeedOpt = 0,
    label: Annotated[Optional[int], typer.Option(help="The image's class (conditional models).")] = None,
    temperature: Annotated[float, typer.Option(min=1e-3, help=TEMPERATURE_HELP)] = 1.0,
    png: Annotated[Path, typer.Option("--png", help="Where to write the PNG grid of completions.")] = Path(
        "completions.png"),
    checkpoint: Annotated[Optional[Path], typer.Option(help="Use this model checkpoint instead of a run.")] = None,
) -> None:
    """Complete a partly known image: n draws of the unknown pixels given the known ones
    (pixelrnn: below --known-rows; mixture: --known-rows or any --mask). Same seed, same PNG."""
    import torch

    from genmodels.images import grid_png
    from genmodels.models import model_from_checkpoint
    from genmodels.runs import load_model, run_prefix

    (family,) = _families(family)
    if (known_rows is None) == (mask is None):
        raise ValueError("give exactly one of --known-rows and --mask")
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    else:
        model, _ = load_model(_storage(out).child(run_prefix(dataset, family, preset)))
    x = torch.from_numpy(read_image_png(image, model.image.shape))
    known = known_rows if mask is None else torch.from_numpy(
        read_image_png(mask, (1, model.image.height, model.image.width))[0] >= 0.5)
    labels = model.check_labels(label, 1, field="--label")
    images = model.complete(x, known, n, seed=seed, temperature=temperature, labels=labels)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(grid_png(images))
    console.print(f"{n} completions by {model.family} (seed {seed}) -> {png}")


@app.command("run")
@friendly_errors
def run_cmd(
    families: Annotated[str, typer.Option("--families", help="Comma list of families, or 'all'.",
                                          **family_list())] = DEFAULT_FAMILIES,
    dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick", source: SourceOpt = None,
    quantization: QuantOpt = "binary", seed: SeedOpt = 0, out: OutOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain even where a run already finished.")] = False,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Override the preset's epochs.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(
        min=0.0,
        help="Stop each family's training after the epoch that crosses this many minutes (checkpointed: "
             "running the same command again resumes).")] = None,
    max_eval_minutes: Annotated[Optional[float], typer.Option(
        min=0.0,
        help="Pause each family's likelihood pass after the batch of test images that crosses this many "
             "minutes of its evaluation (its sums written: running the same command again goes on).")] = None,
    image_size: ImageSizeOpt = None, channels: ChannelsOpt = "L",
) -> None:
    """Prepare, train and evaluate several families; write grids, a comparison picture and a
    metrics table."""
    from genmodels.evaluation import LikelihoodPassPaused
    from genmodels.runs import evaluate_run, train_family, write_report

    names = _families(families)
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, image_size, channels)
    overrides: dict = {"seed": seed}
    if epochs is not None:
        overrides["epochs"] = epochs
    if max_minutes is not None:
        overrides["max_seconds"] = 60.0 * max_minutes
    for family in names:
        console.rule(f"{family} ({preset})")
        with _run_lease(storage, snap.dataset, family) as lease:
            outcome = train_family(storage, snap, family, preset, overrides=overrides, fresh=fresh, progress=True)
            # Superseded while training (stalled past the lease's expiry), the run directory is the
            # other holder's now: evaluating would write this run's metrics over its model.
            lease.check()
            if not outcome.finished:
                # An unfinished model's evaluation (hours of IWAE at the `cpu` preset) would be thrown
                # away by the next epoch.
                console.print(f"{family}: the time budget stopped training after epoch "
                              f"{outcome.result.epochs_completed} of {outcome.train_config.epochs}; not evaluated "
                              f"({_goes_on(fresh)})")
                continue
            deadline = None if max_eval_minutes is None else time.monotonic() + 60.0 * max_eval_minutes
            try:
                with console.status(f"evaluating {family}"):
                    evaluate_run(storage, outcome.run, snap, preset, seed=seed, deadline=deadline)
            except LikelihoodPassPaused as paused:
                lease.check()  # superseded meanwhile, the progress just written is in another holder's run
                console.print(_paused_message(family, paused, fresh))
                continue
            lease.check()
    report = write_report(storage, snap, preset, seed=seed)
    Console().print(Markdown(report.markdown))
    console.print(f"report: {storage.url_for(report.markdown_key)}; pictures under {storage.child(f'runs/{snap.dataset}').url}")


def _load_command_plugins() -> None:
    """Commands of the layers above the library (``pipelines``: retrain, schedule, generate,
    status; ``serving``: serve), registered on ``app`` by their ``register(app)``. They are found
    through the ``genmodels.cli`` entry points of the installed distribution (a module, whose
    ``register`` is called, or the function itself), so this library never imports those layers
    by name, and they never import ``app``."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="genmodels.cli"):
        plugin = entry.load()
        getattr(plugin, "register", plugin)(app)


_load_command_plugins()


if __name__ == "__main__":
    app()
