"""What the `genmodels` commands share with the commands of the layers above (``pipelines``,
``serving``): the console, options with fixed choices, the error handling, training overrides.
Those layers register their commands on the app (``register(app)``, found through the
``genmodels.cli`` entry points) and import these, never the app itself."""

from __future__ import annotations

import functools
from typing import Annotated, Callable, Optional, Sequence

import typer
from rich.console import Console

from genmodels.checks import MAX_TEMPERATURE, MIN_TEMPERATURE
from genmodels.data.prep import QUANTIZATIONS
from genmodels.data.sources import source_names
from genmodels.models import FAMILIES, family_class, parse_families

console = Console(stderr=True)

DEFAULT_FAMILIES = ",".join(FAMILIES)

# --- options with fixed choices -------------------------------------------------------------------
#: Every family's presets, in the families' order (quick, cpu, full): the models define them.
PRESETS: tuple[str, ...] = tuple(dict.fromkeys(p for f in FAMILIES for p in family_class(f).presets))
DATASETS: tuple[str, ...] = tuple(source_names())
QUANTIZATION_CHOICES: tuple[str, ...] = tuple(QUANTIZATIONS)
CHANNELS: tuple[str, ...] = ("L", "RGB")
#: ``--temperature``'s help: the bounds every sampler checks (genmodels.checks.check_temperature).
TEMPERATURE_HELP = f"Sampling temperature, in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]."


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


def device_choice() -> dict:
    """typer.Option arguments for ``--device``: auto, cpu, cuda or cuda:N, refused at parse time
    when torch cannot use it here (training would fail with torch's traceback only after the data
    is prepared and the run's lease taken)."""

    def parse(value: str) -> str:
        import torch

        if value == "auto":
            return value
        try:
            device = torch.device(value)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            _fail(f"unknown device {value!r}; choose one of auto, cpu, cuda, cuda:N")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            _fail(f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s) torch can use")
        return value

    return {"parser": parse, "metavar": "[auto|cpu|cuda|cuda:N]"}


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
SamplingSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampling noise: same seed, same images.")]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", min=1,
                                                     help="Folder sources: resize to SIZE x SIZE.")]
ChannelsOpt = Annotated[str, typer.Option("--channels", help="Folder sources: L (grey) or RGB.",
                                         **choice("channels", CHANNELS))]


def friendly_errors(fn: Callable) -> Callable:
    """Expected failures (bad input, unusable paths, storage, a model or alias the registry does
    not hold or refuses as a name, a model whose loss or figures are not finite) become one red
    line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from genmodels.lease import LeaseBusy
        from genmodels.storage import StorageError

        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, StorageError, NotImplementedError, LeaseBusy, FloatingPointError) as exc:
            # OSError: a path the user gave (missing, a directory, not writable); its text names it.
            # FloatingPointError: training diverged, or a model's samples or likelihoods are NaN; its
            # text names the family and the figure.
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(code=2) from None
        except LookupError as exc:
            # The registry's answer to an unknown model or alias (registry.fetch_graphs). KeyError
            # and IndexError are LookupErrors too, but from our own code they are bugs: their
            # traceback is what finds them.
            if isinstance(exc, (KeyError, IndexError)):
                raise
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(code=2) from None

    return wrapper


def train_overrides(epochs, batch_size, max_train_examples, device) -> dict:
    given = {"epochs": epochs, "batch_size": batch_size, "max_train_examples": max_train_examples, "device": device}
    return {k: v for k, v in given.items() if v is not None}
