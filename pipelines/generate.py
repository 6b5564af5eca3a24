"""The bulk generation flow: resolve the model's alias to a version and its ONNX graphs, then
write the shards and manifest with :func:`genmodels.bulk.run_job` (on Ray by default).

Re-running the flow with the same arguments resumes an interrupted job (or verifies a finished
one); the same output with other arguments fails before anything is written. ``alias`` is
resolved at the start of each run: if the champion moved since the first attempt, the job's
version differs and the resume is refused rather than mixing two models' samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from genmodels import bulk
from genmodels.config import get_settings
from pipelines.tasks import TRANSIENT_RETRIES


@task(name="resolve_model", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def resolve_model(model: str, alias: str) -> dict[str, Any]:
    """The version holding ``alias`` and its ONNX graphs' bytes (``run_job`` loads them first thing)."""
    from genmodels import registry

    registry.configure()
    mv, files = registry.fetch_graphs(model, alias)
    version = str(mv.version)
    get_run_logger().info("%s@%s is version %s (%s)", model, alias, version, ", ".join(sorted(files)))
    return {"name": model, "version": version, "files": files}


# Inputs hold the graphs' bytes and callables: nothing worth hashing for a cache key.
@task(name="write_shards", cache_policy=NO_CACHE)
def write_shards(spec: dict[str, Any], files: dict[str, bytes], workers: int, use_ray: bool,
                 on_progress: Callable[[int, int], None] | None = None,
                 storage: str | None = None) -> dict[str, Any]:
    """Every missing or damaged shard written, then the manifest; returns the manifest. The job is
    recorded under ``<storage>/jobs/`` as the serving API records its own (same id for the same
    spec), so ``genmodels status`` and ``GET /v1/jobs`` see it."""
    from genmodels.records import JobRecorder

    job = bulk.JobSpec.from_dict(spec)

    def progress(done: int, total: int) -> None:
        recorder.progress(done, total)
        if on_progress is not None:
            on_progress(done, total)

    with JobRecorder(storage or get_settings().storage_url, bulk.job_id(job), job.to_dict()) as recorder:
        manifest = bulk.run_job(job, files, workers=workers, on_progress=progress, use_ray=use_ray,
                                on_event=recorder.event)
        recorder.succeeded(f"{job.output.rstrip('/')}/{bulk.MANIFEST_KEY}", manifest["totals"])
    totals = manifest["totals"]
    get_run_logger().info("%d samples in %d shards (%d bytes) -> %s", totals["samples"], totals["shards"],
                          totals["bytes"], job.output)
    return manifest


@flow(name="generate", validate_parameters=False)
def generate(
    model: str,
    n: int,
    out: str,
    seed: int = 0,
    labels: int | list[int] | None = None,
    temperature: float = 1.0,
    shard_size: int = bulk.DEFAULT_SHARD_SIZE,
    format: str = "npz",
    workers: int = 1,
    alias: str = "champion",
    use_ray: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """Write ``n`` samples of ``models:/<model>@<alias>`` to ``out`` (s3:// or file://) as shards
    plus manifest.json; returns the manifest. ``on_progress(done, total)``: in-process callers
    (the CLI's progress bar) only. ``storage``: the platform storage whose ``jobs/`` records the
    job (default ``Settings().storage_url``, the one the serving API and ``genmodels status`` read)."""
    # The spec's own checks first (with a placeholder version): bad input fails before MLflow.
    bulk.JobSpec(model=model, version="?", n=n, output=out, seed=seed, labels=labels, temperature=temperature,
                 shard_size=shard_size, format=format)
    resolved = resolve_model(model, alias)
    spec = bulk.JobSpec(model=model, version=resolved["version"], n=n, output=out, seed=seed, labels=labels,
                        temperature=temperature, shard_size=shard_size, format=format)
    return write_shards(spec.to_dict(), resolved["files"], workers, use_ray, on_progress, storage)
