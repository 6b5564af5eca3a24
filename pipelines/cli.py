"""`genmodels retrain | schedule | generate | status`: the commands over the Prefect flows (status
only reads their records). ``genmodels.cli`` finds :func:`register` through the ``genmodels.cli``
entry point."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from genmodels.bulk import FORMATS
from genmodels.cli_options import (
    TEMPERATURE_HELP, ChannelsOpt, DatasetOpt, FamiliesOpt, ImageSizeOpt, OutOpt, PresetOpt, QuantOpt, SeedOpt,
    SourceOpt, choice, console, friendly_errors, train_overrides,
)
from genmodels.config import get_settings
from genmodels.models import parse_families

WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", "-w", min=1, help="Ray Train workers (DDP), each taking an equal part of the global batch. Default: "
    "each family's preset's, as many as the cluster holds.")]


@friendly_errors
def retrain_cmd(
    family: FamiliesOpt = "all",
    dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick", source: SourceOpt = None,
    quantization: QuantOpt = "binary", seed: SeedOpt = 0, out: OutOpt = None, workers: WorkersOpt = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Override the preset's epochs.")] = None,
    max_train_examples: Annotated[Optional[int], typer.Option(min=1, help="Cap the training examples.")] = None,
    if_no_champion: Annotated[bool, typer.Option("--if-no-champion", help="Skip families that already have a "
                                                 "champion.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore the runs' checkpoints and start over.")] = False,
    image_size: ImageSizeOpt = None, channels: ChannelsOpt = "L",
) -> None:
    """The retrain pipeline (Prefect flow): prepare data, train on Ray, evaluate, export ONNX,
    register in MLflow, promote champions. Embedded defaults unless RAY_ADDRESS, PREFECT_API_URL,
    MLFLOW_TRACKING_URI, GENMODELS_STORAGE point elsewhere."""
    from pipelines.flows import RetrainFailed, check_plan, retrain

    names = parse_families(family)
    storage_url = out or get_settings().storage_url
    overrides = train_overrides(epochs, None, max_train_examples, None)
    # Fail fast, before Prefect and Ray start.
    check_plan(names, preset, workers, storage_url, overrides, dataset=dataset, source=source)
    try:
        outcomes = retrain(families=",".join(names), dataset=dataset, preset=preset, workers=workers, source=source,
                           quantization=quantization, seed=seed, if_no_champion=if_no_champion, fresh=fresh,
                           overrides=overrides or None, storage=storage_url, image_size=image_size,
                           channels=channels)
    except RetrainFailed as exc:
        _print_outcomes(exc.outcomes)
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=1) from None
    if not outcomes:
        console.print("every family asked for already has a champion: nothing to retrain")
    _print_outcomes(outcomes)


def _print_outcomes(outcomes: dict) -> None:
    from rich.table import Table

    if not outcomes:
        return
    table = Table("model", "version", "gate metric", "alias", "why")
    table.columns[0].no_wrap = True
    for o in outcomes.values():
        reg, promo = o["registered"], o["promotion"]
        table.add_row(reg["name"], str(reg["version"]) + ("" if reg["created"] else " (existing)"),
                      f"{reg['gate_metric']} {reg['gate_value']:.4f}", promo["alias"], promo["reason"])
    Console().print(table)


@friendly_errors
def schedule_cmd(
    cron: Annotated[str, typer.Option("--cron", help="Cron expression, e.g. '0 3 * * *' (daily at 03:00).")],
    family: FamiliesOpt = "all",
    dataset: DatasetOpt = "fashion-mnist", preset: PresetOpt = "quick", workers: WorkersOpt = None,
    source: SourceOpt = None, image_size: ImageSizeOpt = None, channels: ChannelsOpt = "L",
    timezone: Annotated[str, typer.Option(help="Timezone of the cron schedule.")] = "UTC",
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "scheduled",
) -> None:
    """Serve the retrain deployment on a cron schedule against a Prefect server (blocks; runs
    each scheduled retrain in this process). Needs PREFECT_API_URL: schedules cannot live in
    Prefect's ephemeral server."""
    import os

    from prefect import serve

    from pipelines.flows import check_plan, deployment

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("schedules need a Prefect server: start one with `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")
    names = parse_families(family)
    # Each scheduled run checks its plan only when it fires, hours later and unattended, and fails
    # the same way every time: the same checks refuse it now. The runs write the default storage.
    check_plan(names, preset, workers, get_settings().storage_url, dataset=dataset, source=source)
    params = {"families": ",".join(names), "dataset": dataset, "preset": preset, "workers": workers,
              "source": source, "image_size": image_size, "channels": channels}
    to_serve = deployment(name, cron, params, timezone=timezone)
    console.print(f"serving retrain/{name} ({cron} {timezone}) for {', '.join(names)}; Ctrl-C stops")
    serve(to_serve)


@friendly_errors
def generate_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Registered model, e.g. fashion-mnist-vae.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples (1..100000000).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output prefix: s3://bucket/prefix or file:///abs/dir.")],
    seed: Annotated[int, typer.Option("--seed", help="Sample i of a seed is the same image in every run.")] = 0,
    label: Annotated[Optional[list[int]], typer.Option("--label", help="Class label (conditional models); "
                                                       "repeat it to cycle: sample i gets label i mod count.")] = None,
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 1.0,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard object.")] = 10_000,
    fmt: Annotated[str, typer.Option("--format", help="Shard format (png: a webdataset-style tar; parquet: rows of "
                                     "index, label, PNG bytes, read by pandas/pyarrow/Ray Data from <out>/shards/).",
                                     **choice("format", FORMATS))] = "npz",
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Ray actors writing shards.")] = 1,
    alias: Annotated[str, typer.Option("--alias", help="Registry alias to sample from.")] = "champion",
    ray: Annotated[bool, typer.Option("--ray/--no-ray", help="Write shards on Ray (default) or in this "
                                      "process (small jobs).")] = True,
) -> None:
    """Bulk generation (Prefect flow): n samples of a registered model written as shards plus
    manifest.json. Re-running the same command resumes an interrupted job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from genmodels.bulk import JobSpec
    from pipelines.generate import generate

    labels = None if not label else (label[0] if len(label) == 1 else list(label))
    # Bad input fails here, before Prefect, MLflow and Ray start (the version is resolved later).
    JobSpec(model=model, version="?", n=n, output=out, seed=seed, labels=labels, temperature=temperature,
            shard_size=shard_size, format=fmt)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"{model} -> {out}", total=n)
        manifest = generate(model=model, n=n, out=out, seed=seed, labels=labels, temperature=temperature,
                            shard_size=shard_size, format=fmt, workers=workers, alias=alias, use_ray=ray,
                            on_progress=lambda done, total: progress.update(bar, completed=done, total=total))
    totals = manifest["totals"]
    console.print(f"{totals['samples']} samples of {model} v{manifest['model']['version']} in {totals['shards']} "
                  f"shards ({totals['bytes']} bytes) -> {out.rstrip('/')}/manifest.json")


@friendly_errors
def status_cmd(
    out: OutOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of tables.")] = False,
) -> None:
    """Champions per registered model, the last retrain's outcome, queued and running bulk jobs.
    Reads the registry (MLFLOW_TRACKING_URI or the work dir's sqlite) and the storage's records;
    starts no server. Exit code 1 if a part could not be read."""
    import json
    import os

    from genmodels.status import collect
    from genmodels.storage import open_storage

    if out is not None:
        # A malformed --out is the user's error (exit 2), not a storage that cannot be read (1).
        open_storage(out)
    # Fail in seconds, not minutes, when a tracking server is down: this only reads.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    report = collect(out)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        _print_status(report)
    for section, message in report["errors"].items():
        console.print(f"[bold red]error:[/] cannot read {section}: {message}")
    if report["errors"]:
        raise typer.Exit(code=1)


def _print_status(report: dict) -> None:
    from rich.table import Table

    out = Console()
    out.print(f"storage [bold]{report['storage']}[/]  registry [bold]{report['tracking_uri']}[/]")
    if report["models"]:
        table = Table("model", "champion", "gate metric", "challenger", "versions", title="models")
        for m in report["models"]:
            champ, chall = m["champion"], m["challenger"]
            table.add_row(m["name"], f"v{champ['version']}" if champ else "-", _gate(champ),
                          f"v{chall['version']} ({_gate(chall)})" if chall else "-", str(m["versions"]))
        out.print(table)
    elif "models" not in report["errors"]:
        out.print("no models yet: `genmodels retrain` trains and registers them")

    last = report["last_retrain"]
    if last is None:
        if "last_retrain" not in report["errors"]:
            out.print("no retrain recorded yet")
    else:
        color = {"succeeded": "green", "running": "yellow"}.get(last["status"], "red")
        # A running retrain (or one whose heartbeat stopped) has no end yet: when it started.
        when = last["ended_at"] or f"started {last['started_at']}"
        out.print(f"last retrain [{color}]{last['status']}[/] {when} ({last.get('seconds', 0):.0f} s): "
                  f"{last['dataset']}, preset {last['preset']}, run {last['run_id']}")
        if last.get("error"):
            out.print(f"  [red]{last['error']}[/]")
        table = Table("family", "outcome", "model", "gate metric", "alias", "note")
        for family, o in last["outcomes"].items():
            if o["status"] == "registered":
                table.add_row(family, "promoted" if o["promoted"] else "registered",
                              f"{o['model']} v{o['version']}" + ("" if o["new_version"] else " (existing)"),
                              f"{o['gate_metric']} {o['gate_value']:.4f}", o["alias"], o.get("reason") or "")
            else:
                table.add_row(family, o["status"], "", "", "", o.get("error") or o.get("reason") or "")
        out.print(table)

    if report["jobs"]:
        table = Table("job", "status", "model", "done", "output", "updated", title="bulk jobs in progress")
        for j in report["jobs"]:
            note = " [red](no heartbeat: its server may have stopped)[/]" if j["stale"] else ""
            table.add_row(j["job_id"][:12], j["status"], f"{j['model']} v{j['version']}",
                          f"{j['done']}/{j['total']}", j["output"], f"{j.get('updated_at')}{note}")
        out.print(table)
    elif "jobs" not in report["errors"]:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(report["job_counts"].items()))
        out.print("no queued or running bulk jobs" + (f" (recorded: {counts})" if counts else ""))


def _gate(version: dict | None) -> str:
    if not version or version.get("gate_value") is None:
        return "-"
    return f"{version['gate_metric']} {version['gate_value']:.4f}"


def register(app: typer.Typer) -> None:
    """Add these commands to ``app`` (the ``genmodels`` command, through the ``genmodels.cli`` entry point)."""
    app.command("retrain")(retrain_cmd)
    app.command("schedule")(schedule_cmd)
    app.command("generate")(generate_cmd)
    app.command("status")(status_cmd)
