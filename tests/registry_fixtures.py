"""A test's own MLflow registry: unit and integration modules alike register models in one.

``registry_env(root)`` points this process at an MLflow sqlite registry under ``root`` and
undoes it on exit; ``register_untrained_champion`` puts a freshly built (untrained) tiny model
there as ``<dataset>-<family>`` with the ``champion`` alias, for tests that serve or sample a
registered model and do not care what it learned.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: The default URI every ``configure`` here is given: it must lose to MLFLOW_TRACKING_URI.
UNUSED_DEFAULT_URI = "sqlite:///must-not-be-used.db"


@contextmanager
def registry_env(root: Path) -> Iterator[str]:
    """MLflow on sqlite under ``root``, configured for this process; a fixed git commit tag (no
    `git` subprocess per registration); no API key (a module that wants auth turns it on itself).
    Yields the tracking URI; on exit the environment is as it was."""
    from genmodels import registry

    tracking_uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv("GENMODELS_GIT_COMMIT", "0123456789abcdef")
        mp.delenv("GENMODELS_API_KEY", raising=False)
        # configure() hands boto3's S3 endpoint to MLflow through os.environ; recording the
        # variable here makes the exit remove whatever it set.
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", "")
        mp.delenv("MLFLOW_S3_ENDPOINT_URL")
        assert registry.configure(None, UNUSED_DEFAULT_URI) == tracking_uri
        yield tracking_uri


def register_untrained_champion(root: Path, dataset: str, family: str, image, **model_kwargs) -> None:
    """Build ``family`` at seed 0 (untrained), export its sampler under ``root/family`` and
    register it as the ``champion`` of ``<dataset>-<family>`` in the configured registry."""
    import torch

    from genmodels import registry
    from genmodels.export import export_sampler
    from genmodels.models import build_model

    torch.manual_seed(0)
    model = build_model(family, image, **model_kwargs).eval()
    paths = export_sampler(model, root / family, likelihood=False)
    checkpoint = io.BytesIO()
    torch.save({"family": family, "weights": model.state_dict()}, checkpoint)
    reg = registry.register(dataset=dataset, family=family, preset="quick", checkpoint=checkpoint.getvalue(),
                            onnx_files=paths, metrics={"nll_nats": 30.0}, params={}, snapshot_hash="0" * 64,
                            artifact_root=(root / "mlflow").as_uri())
    registry.promote(reg.name, reg.version)
