"""How much evaluation each preset's figures rest on: test images, samples, IWAE k.

Owned here, below both the training runs that measure with it and the registry that tags each
version with it: figures measured under different settings do not compare.
"""

from __future__ import annotations

from typing import Any

# Quick runs evaluate on a subset so `make run` stays in minutes; `cpu` and full runs use the
# whole test split and k=5000 importance samples like the published figures. Quick's k=250 costs
# a quarter of k=1000 and reads 0.1-0.2 nats higher (quick VAE 232.26 vs 232.09, CVAE 228.86 vs
# 228.77 on 300 test images; benchmarks/RESULTS.md).
EVAL_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"max_examples": 1000, "n_samples": 1000, "iwae_k": 250},
    "cpu": {"max_examples": None, "n_samples": 10000, "iwae_k": 5000},
    "full": {"max_examples": None, "n_samples": 10000, "iwae_k": 5000},
}


def evaluation_settings(preset: str) -> dict[str, Any]:
    """How much evaluation a preset's figures rest on (test images, samples, IWAE k); presets
    without an entry get quick's. Figures measured under different settings do not compare."""
    return dict(EVAL_SETTINGS.get(preset, EVAL_SETTINGS["quick"]))
