"""The sampler runtime stands without the training stack: noise, input checks, the ONNX sampler,
images, bulk jobs, the registry client, the MLflow model and the serving layer import (and draw
noise) in a process where torch, scikit-learn, Prefect, Ray Train and the ONNX exporter cannot be
imported, which is what the ``serving`` install extra and the slim serving image hold."""

from __future__ import annotations

import subprocess
import sys

#: What the `serving` extra does not install (pyproject.toml): any import of these fails below.
TRAINING_ONLY = ("torch", "sklearn", "prefect", "ray.train", "onnx", "onnxscript", "scipy", "torchmetrics")
RUNTIME = ("genmodels.noise", "genmodels.checks", "genmodels.sampling", "genmodels.images", "genmodels.bulk",
           "genmodels.registry", "genmodels.mlflow_model", "serving.api", "serving.models", "serving.jobs",
           "serving.app")


def test_the_runtime_imports_and_draws_noise_without_the_training_stack():
    code = "\n".join([
        "import importlib, sys",
        f"for name in {TRAINING_ONLY!r}: sys.modules[name] = None  # importing it now raises ImportError",
        f"for name in {RUNTIME!r}: importlib.import_module(name)",
        "from genmodels.noise import NoiseField, interpolation_noise, make_noise",
        "spec = {'z': NoiseField((4,), 'normal'), 'u': NoiseField((1, 2, 2), 'uniform')}",
        "walk = interpolation_noise(spec, 1, 2, 5)",
        "assert walk['z'].shape == (5, 4) and (walk['z'][0] == make_noise(spec, 1, 1)['z'][0]).all()",
        "assert (walk['z'][-1] == make_noise(spec, 2, 1)['z'][0]).all()",
        "assert make_noise(spec, 1, 3)['u'].dtype.name == 'float32'",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_cli_without_the_training_stack_says_what_to_install():
    code = "import sys; sys.modules['torch'] = None\nimport genmodels.cli"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "needs torch" in done.stderr and "pip install 'genmodels[pipelines]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
