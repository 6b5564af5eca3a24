"""A normal `make run` prints no ERROR and no traceback (issue 14): Prefect's embedded-mode
settings are in place before Prefect reads its settings, and registering a model raises no
MLflow warning of ours."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_READ_SETTINGS = ("import pipelines.flows\n"  # imports prefect
                  "from prefect.settings import get_current_settings\n"
                  "s = get_current_settings().server\n"
                  "print(s.analytics_enabled, s.services.triggers.enabled, s.ephemeral.startup_timeout_seconds)\n")


def _prefect_settings(tmp_path, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-c", _READ_SETTINGS], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**clean, "PREFECT_HOME": str(tmp_path / "prefect"), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_embedded_mode_turns_telemetry_and_automations_off_before_prefect_reads_its_settings(tmp_path):
    assert _prefect_settings(tmp_path) == ["False", "False", "120"]
    # An explicit setting wins over the embedded default.
    assert _prefect_settings(tmp_path, PREFECT_SERVER_ANALYTICS_ENABLED="true")[0] == "True"


def test_a_prefect_server_keeps_its_own_settings(tmp_path):
    assert _prefect_settings(tmp_path, PREFECT_API_URL="http://127.0.0.1:4200/api") == ["True", "True", "20"]


def test_registering_a_model_warns_nothing_about_predict_type_hints(tmp_path, monkeypatch):
    from genmodels import registry, runs
    from genmodels.data import PrepConfig
    from genmodels.storage import open_storage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("GENMODELS_GIT_COMMIT", "0123456789abcdef")
    registry.configure(None, "sqlite:///must-not-be-used.db")
    store = open_storage(tmp_path / "store")
    snap = runs.snapshot_for(store, "digits", None, PrepConfig(seed=0))
    run = runs.train_family(store, snap, "mixture", "quick", overrides={"epochs": 1, "max_train_examples": 64},
                            model_overrides={"n_components": 2}).run
    runs.export_run(run)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = registry.register(dataset="quiet", family="mixture", preset="quick", checkpoint=run.get_bytes("model.pt"),
                                onnx_files=runs.fetch_onnx(run, tmp), metrics={"nll_nats": 40.0}, params={},
                                snapshot_hash=snap.hash, artifact_root=(tmp_path / "mlflow").as_uri())
    assert reg.created
    assert not [str(w.message) for w in caught if "type hints" in str(w.message)]
