"""Wall time of a trained VAE/CVAE run's end-of-training step (``finish_training``: one posterior
draw per training image, then the latent mixture's EM fit), and of the EM fit alone, medians over
repeats in this process. Read-only on the store; prints one JSON line. Run it at two commits
(``PYTHONPATH=<checkout>``) on the same store to compare their fits: the line carries a digest
of the fitted mixture, equal where the fits agree to float64 round-off in the digits kept.

    .venv/bin/python benchmarks/latent_mixture/fit_time.py --family vae --preset quick \\
        --out file:///tmp/mr37/store --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

import torch

import genmodels.models.vae as vae_module
from _run import add_run_options, load_run  # the latent-mixture benchmarks' shared run options
from genmodels.models import model_from_checkpoint
from genmodels.training import finish_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    _, ckpt, snapshot, train_cfg = load_run(args)

    fit = vae_module.fit_gaussian_mixture
    fit_seconds: list[float] = []

    def timed_fit(*a, **kw):
        t0 = time.perf_counter()
        out = fit(*a, **kw)
        fit_seconds.append(time.perf_counter() - t0)
        return out

    vae_module.fit_gaussian_mixture = timed_fit  # the name the VAE calls, so the fit alone is timed
    totals, fits = [], []
    for _ in range(args.repeats):
        model = model_from_checkpoint(ckpt)
        fit_seconds.clear()
        t0 = time.perf_counter()
        finish_training(model, snapshot, train_cfg, torch.device("cpu"))
        totals.append(time.perf_counter() - t0)
        fits.append(sum(fit_seconds))
    digest = hashlib.sha256()
    for name in ("mixture_weights", "mixture_means", "mixture_scale_tril"):
        digest.update(getattr(model, name).double().numpy().round(10).tobytes())
    print(json.dumps({"family": args.family, "preset": args.preset, "threads": torch.get_num_threads(),
                      "finish_training_s": round(statistics.median(totals), 2),
                      "fit_s": round(statistics.median(fits), 2), "fits_per_run": len(fit_seconds),
                      "repeats": args.repeats, "mixture_digest": digest.hexdigest()[:16]}))


if __name__ == "__main__":
    main()
