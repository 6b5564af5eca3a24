"""The `genmodels` command: prepare data, train, evaluate and sample, on the embedded defaults."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Callable, Optional, Sequence

import typer
from rich.console import Console
from rich.markdown import Markdown

from genmodels.config import get_settings
from genmodels.data.prep import QUANTIZATIONS
from genmodels.data.sources import source_names
from genmodels.models import FAMILIES, family_class, parse_families

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True)
data_app = typer.Typer(help="Dataset sources and snapshots.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)

DEFAULT_FAMILIES = ",".join(FAMILIES)

# --- options with fixed choices -------------------------------------------------------------------
#: Every family's presets, in the families' order (quick, cpu, full): the models define them.
PRESETS: tuple[str, ...] = tuple(dict.fromkeys(p for f in FAMILIES for p in family_class(f).presets))
DATASETS: tuple[str, ...] = tuple(source_names())
QUANTIZATION_CHOICES: tuple[str, ...] = tuple(QUANTIZATIONS)
CHANNELS: tuple[str, ...] = ("L", "RGB")


def _fail(message: str):
    # The one red line and exit code 2 of every other bad input (friendly_errors), rather than
    # click's usage panel: the value is checked while the command line is parsed, before any work.
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def choice(what: str, choices: Sequence[str]) -> dict:
    """typer.Option arguments for an option with fixed ``choices``: listed in ``--help``, offered
    by shell completion, refused at parse time naming the choices."""

    def parse(value: str) -> str:
        if value not in choices:
            _fail(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
        return value

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return {"parser": parse, "metavar": f"[{'|'.join(choices)}]", "autocompletion": complete}


def family_list() -> dict:
    """typer.Option arguments for ``--family``/``--families`` taking a comma list of families or
    ``all``; completion completes the item after the last comma."""

    def parse(value: str) -> str:
        try:
            parse_families(value)
        except ValueError as exc:
            _fail(str(exc))
        return value

    def complete(incomplete: str) -> list[str]:
        head, comma, last = incomplete.rpartition(",")
        taken = set(head.split(",")) if comma else set()
        options = [f for f in FAMILIES if f not in taken] + ([] if comma else ["all"])
        return [head + comma + f for f in options if f.startswith(last)]

    return {"parser": parse, "metavar": f"[{'|'.join(FAMILIES)}][,...]|all", "autocompletion": complete}


DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="The data source.", **choice("dataset", DATASETS))]
SourceOpt = Annotated[Optional[str], typer.Option("--source", help="Data location: path, file:// or s3:// (folder/npz; "
                                                 "fashion-mnist defaults to GENMODELS_FASHION_MNIST_DIR).")]
FamilyOpt = Annotated[str, typer.Option("--family", "-f", help="The model family.", **choice("family", FAMILIES))]
FamiliesOpt = Annotated[str, typer.Option("--family", "-f", help="Comma list of families, or 'all'.", **family_list())]
PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="quick (minutes on CPU), cpu (2 cores, <= 90 min), "
                                        "full (quality targets, GPU).", **choice("preset", PRESETS))]
OutOpt = Annotated[Optional[str], typer.Option("--out", "-o", help="Storage root for snapshots, runs and reports: "
                                              "a path, file:// or s3://bucket/prefix. Default: GENMODELS_STORAGE "
                                              "or ./.genmodels/store.")]
QuantOpt = Annotated[str, typer.Option("--quantization", "-q", help="Pixel levels: binary (2) or 8bit (256).",
                                      **choice("quantization", QUANTIZATION_CHOICES))]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of splits, binarization and training.")]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Folder sources: resize to SIZE x SIZE.")]
ChannelsOpt = Annotated[str, typer.Option("--channels", help="Folder sources: L (grey) or RGB.",
                                         **choice("channels", CHANNELS))]


def friendly_errors(fn: Callable) -> Callable:
    """Expected failures (bad input, missing files, storage) become one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from genmodels.storage import StorageError

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, StorageError, NotImplementedError) as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(code=2) from None

    return wrapper


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


def train_overrides(epochs, batch_size, max_train_examples, device) -> dict:
    given = {"epochs": epochs, "batch_size": batch_size, "max_train_examples": max_train_examples, "device": device}
    return {k: v for k, v in given.items() if v is not None}


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
    epochs: Annotated[Optional[int], typer.Option(help="Override the preset's epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Override the preset's batch size.")] = None,
    max_train_examples: Annotated[Optional[int], typer.Option(help="Cap the training examples.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint and start over.")] = False,
) -> None:
    """Train one family (resumes from the run's last checkpoint unless --fresh)."""
    from genmodels.runs import train_family

    (family,) = _families(family)
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, image_size, channels)
    overrides = {"seed": seed, **train_overrides(epochs, batch_size, max_train_examples, device)}
    outcome = train_family(storage, snap, family, preset, overrides=overrides, fresh=fresh, progress=True)
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
) -> None:
    """Evaluate a trained run: likelihoods, domain FID/KID, class accuracy, pictures."""
    from genmodels.runs import evaluate_run, run_prefix

    (family,) = _families(family)
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, image_size, channels)
    run = storage.child(run_prefix(snap.dataset, family, preset))
    with console.status(f"evaluating {family}"):
        metrics = evaluate_run(storage, run, snap, preset, seed=seed)
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True))


@app.command("sample")
@friendly_errors
def sample_cmd(
    family: FamilyOpt = "vae", dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick",
    out: OutOpt = None, n: Annotated[int, typer.Option("--n", min=1, max=4096, help="Number of images.")] = 64,
    seed: SeedOpt = 0,
    label: Annotated[Optional[int], typer.Option(help="Class label (conditional models).")] = None,
    temperature: Annotated[float, typer.Option(min=1e-3, help="Sampling temperature (> 0).")] = 1.0,
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
    images = model.sample(n, labels=label, seed=seed, temperature=temperature)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(grid_png(images, nrow=max(1, int(round(n**0.5)))))
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
        pixels = np.asarray(picture.convert("L") if picture.mode == "1" else picture, dtype=np.uint8)
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
    seed: SeedOpt = 0,
    label: Annotated[Optional[int], typer.Option(help="The image's class (conditional models).")] = None,
    temperature: Annotated[float, typer.Option(min=1e-3, help="Sampling temperature (> 0).")] = 1.0,
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
    images = model.complete(x, known, n, seed=seed, temperature=temperature, labels=label)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(grid_png(images, nrow=max(1, int(round(n**0.5)))))
    console.print(f"{n} completions by {model.family} (seed {seed}) -> {png}")


@app.command("run")
@friendly_errors
def run_cmd(
    families: Annotated[str, typer.Option("--families", help="Comma list of families, or 'all'.",
                                          **family_list())] = DEFAULT_FAMILIES,
    dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick", source: SourceOpt = None,
    quantization: QuantOpt = "binary", seed: SeedOpt = 0, out: OutOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain even where a run already finished.")] = False,
    epochs: Annotated[Optional[int], typer.Option(help="Override the preset's epochs.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(
        help="Stop each family's training after the epoch that crosses this many minutes (checkpointed: "
             "running the same command again resumes).")] = None,
) -> None:
    """Prepare, train and evaluate several families; write grids, a comparison picture and a
    metrics table."""
    from genmodels.runs import evaluate_run, train_family, write_report

    names = _families(families)
    storage = _storage(out)
    snap = _snapshot(storage, dataset, source, quantization, seed, None, "L")
    overrides: dict = {"seed": seed}
    if epochs is not None:
        overrides["epochs"] = epochs
    if max_minutes is not None:
        overrides["max_seconds"] = 60.0 * max_minutes
    for family in names:
        console.rule(f"{family} ({preset})")
        outcome = train_family(storage, snap, family, preset, overrides=overrides, fresh=fresh, progress=True)
        with console.status(f"evaluating {family}"):
            evaluate_run(storage, outcome.run, snap, preset, seed=seed)
    report = write_report(storage, snap, preset, seed=seed)
    Console().print(Markdown(report.markdown))
    console.print(f"report: {storage.url_for(report.markdown_key)}; pictures under {storage.child(f'runs/{snap.dataset}').url}")


def _load_command_plugins() -> None:
    """Commands of the layers above the library (``pipelines``: retrain, schedule, generate;
    ``serving``: serve) register themselves on ``app`` when imported. They are found through
    the ``genmodels.cli`` entry points of the installed distribution, so this library never
    imports those layers by name."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="genmodels.cli"):
        entry.load()


_load_command_plugins()


if __name__ == "__main__":
    app()
