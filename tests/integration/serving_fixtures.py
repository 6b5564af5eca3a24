"""Helpers for tests that serve tiny registered models over real Ray Serve on 127.0.0.1.

``register_champions`` trains tiny models on 8x8 digits, exports them to ONNX and registers
each as ``<dataset>-<family>`` version 1 with the ``champion`` alias, in an MLflow sqlite
registry under ``root``. ``serve_on_free_port`` starts Ray and Serve and yields the base URL.
Callers wrap both in their own module-scoped fixtures (training costs seconds: once per module).
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Small enough to train in about a second on 2 cores, big enough to export every graph.
TINY = {"latent_dim": 3, "hidden": (16,)}
#: Families whose configs take other knobs (the rest get TINY).
TINY_BY_FAMILY = {"pixelrnn": {"num_layers": 1, "hidden_channels": 8, "head_hidden": 8},
                  "mixture": {"n_components": 4}}
APP = "genmodels"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_champions(root: Path, dataset: str, families: Sequence[str],
                       metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Train, export and register one tiny model per family as ``champion``, in the registry
    ``registry_fixtures.registry_env(root)`` configured (the caller holds it open)."""
    from mlflow import MlflowClient

    from genmodels import registry, runs
    from genmodels.data import PrepConfig
    from genmodels.storage import open_storage

    store = open_storage(root / "store")
    snap = runs.snapshot_for(store, "digits", None, PrepConfig(seed=0))
    for family in families:
        outcome = runs.train_family(store.child(family), snap, family, "quick",
                                    overrides={"epochs": 1, "max_train_examples": 128, "seed": 0},
                                    model_overrides=TINY_BY_FAMILY.get(family, TINY))
        run = outcome.run
        runs.export_run(run)
        _, meta = runs.load_model(run)
        with tempfile.TemporaryDirectory() as tmp:
            reg = registry.register(dataset=dataset, family=family, preset="quick",
                                    checkpoint=run.get_bytes("model.pt"), onnx_files=runs.fetch_onnx(run, tmp),
                                    metrics=dict((metrics or {}).get(family, {})), params={"family": family},
                                    snapshot_hash=meta["snapshot_hash"], artifact_root=(root / "mlflow").as_uri())
        MlflowClient().set_registered_model_alias(registry.registered_name(dataset, family), "champion", reg.version)


def deploy(tracking_uri: str, models: Sequence[str], **args) -> None:
    """(Re)deploy the application; a redeploy with other args replaces the running one."""
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({"models": list(models), "tracking_uri": tracking_uri, "reload_interval_s": 60.0, **args}),
              name=APP, route_prefix="/")


@contextmanager
def serve_on_free_port(tracking_uri: str, models: Sequence[str], **args) -> Iterator[str]:
    """Ray + Serve on 127.0.0.1 with the application deployed; yields ``http://127.0.0.1:<port>``."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from genmodels.ray_runtime import ensure_ray, stop_ray

    from serving.app import SERVE_ENV

    with pytest.MonkeyPatch.context() as mp:
        for key, value in SERVE_ENV.items():  # the Ray Serve settings `genmodels serve` runs with
            mp.setenv(key, value)
        ensure_ray(num_cpus=4)  # logical CPUs: the Sampler replica reserves one
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(tracking_uri, models, **args)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        stop_ray()
