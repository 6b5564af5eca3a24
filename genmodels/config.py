"""Typed settings, read from environment variables (``GENMODELS_*``) with embedded defaults.

Everything defaults to one machine and zero servers: a work directory ``./.genmodels``
holding ``file://`` object storage. Point ``GENMODELS_STORAGE`` at ``s3://bucket/prefix``
(with ``AWS_ENDPOINT_URL`` for MinIO-style endpoints) to scale out.

Only genmodels' own variables are fields here. The servers and clouds are configured by the
variables their libraries read themselves, which genmodels passes through untouched:
``RAY_ADDRESS`` (Ray), ``MLFLOW_TRACKING_URI`` and ``MLFLOW_S3_ENDPOINT_URL`` (MLflow),
``PREFECT_API_URL`` (Prefect), ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (boto3, pyarrow). README.md ("Configuration")
has the one table of all of them.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a config dataclass, refusing keys it does not know (a typo must not be ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENMODELS_", extra="ignore")

    work_dir: Path = Field(default=Path(".genmodels"), description="Local state: storage, caches, runs.")
    storage: str | None = Field(default=None, description="Object-store root; default file://<work_dir>/store.")
    fashion_mnist_dir: str = Field(
        default="/usr/share/datasets/fashion-mnist", description="Fashion-MNIST IDX directory (path, file:// or s3://)."
    )
    # repr=False: a Settings object printed in a log or a traceback must not show the key.
    api_key: str | None = Field(
        default=None, repr=False,
        description="Bearer key every /v1 route of the serving API requires; unset or empty: no auth.",
    )
    git_commit: str | None = Field(
        default=None, description="Commit tagged on MLflow runs; unset: asked of git (images have no .git).",
    )
    # Bulk jobs of the serving API (the CLI is bound by none of these: it writes as its user).
    job_output_roots: str | None = Field(
        default=None, description="Comma-separated URL prefixes (file:// or s3://) under which the API accepts "
                                  "a job's output; unset: <storage>/outputs/.",
    )
    max_active_jobs: int = Field(default=2, ge=1, description="Jobs running at once per server; later ones queue.")
    max_queued_jobs: int = Field(default=100, ge=0, description="Jobs waiting for a free slot per server, at "
                                                                "most; a submission beyond is refused (429).")
    job_max_samples: int = Field(default=10_000_000, ge=1, description="Samples (n) per job, at most.")
    job_max_shards: int = Field(default=10_000, ge=1, description="Shards per job (n / shard_size), at most.")
    job_max_bytes: int = Field(default=50 * 2**30, ge=1, description="Uncompressed image bytes per job "
                                                                     "(n x C x H x W), at most.")
    job_max_shard_bytes: int = Field(default=2**30, ge=1, description="Uncompressed image bytes per shard "
                                     "(shard_size x C x H x W), at most: a writer holds a shard in memory, "
                                     "encoded beside raw (about 3x).")
    jobs_kept_in_memory: int = Field(default=100, ge=0, description="Ended jobs a server keeps in memory; older "
                                                                    "ones are answered from their records.")

    @field_validator("api_key", "git_commit", "storage", "job_output_roots")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # docker compose passes `VAR=${VAR:-}` through as an empty string, which means "not set".
        return value or None

    @cached_property
    def storage_url(self) -> str:
        """The storage root as an absolute URL: a plain path becomes ``file:///abs/path``, so job
        output roots derived from it compare with the URLs clients send, and Ray replicas (another
        working directory) open the same folder."""
        if not self.storage:
            return (self.work_dir.resolve() / "store").as_uri()
        from genmodels.storage import open_storage

        return open_storage(self.storage).url

    @cached_property
    def output_roots(self) -> list[str]:
        """Where the serving API lets bulk jobs write (:func:`genmodels.bulk.check_output_root`)."""
        if self.job_output_roots:
            return [r.strip() for r in self.job_output_roots.split(",") if r.strip()]
        return [self.storage_url.rstrip("/") + "/outputs/"]

    @cached_property
    def default_tracking_uri(self) -> str:
        """MLflow's embedded default (``MLFLOW_TRACKING_URI``, read by MLflow itself, wins)."""
        return f"sqlite:///{self.work_dir.resolve() / 'mlflow.db'}"


def get_settings() -> Settings:
    """The settings of this process's environment; a value that does not parse is a ValueError
    naming the variable the operator set (pydantic names the field, ``max_active_jobs``)."""
    try:
        return Settings()
    except ValidationError as exc:
        prefix = Settings.model_config["env_prefix"]
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            shown = Settings.model_fields[field].repr if field in Settings.model_fields else False
            value = f"={error['input']!r}" if shown else ""  # never echo a secret
            problems.append(f"{prefix}{field.upper()}{value}: {error['msg']}")
        raise ValueError("; ".join(problems)) from None
