"""IWAE evaluation throughput (decoder samples/s) of a VAE-family preset at several decoder
batches (images x importance samples per decoder call), the first the baseline of the speedups;
``default`` in the output is ``IWAE_DECODER_BATCH``'s for the CPU.

Random weights (channels-last, as the families keep them) and binary images of Fashion-MNIST's
shape, ``--images`` per call as the evaluation's batch; the variants alternate within each
repeat so drift hits them alike; medians over repeats. A decoder batch under ``--images`` is
not reachable (the IWAE splits importance samples, not images).

    .venv/bin/python benchmarks/iwae_throughput.py --family vae --preset full --decoder-batches 1024 512 256

Its first version (2cd6eff) compared NCHW weights at 100 samples per image per call against
channels-last at 1,024: benchmarks/RESULTS.md, section "Channels-last conv weights and a resumable IWAE pass".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from genmodels.models import build_model
from genmodels.models.base import ImageSpec
from genmodels.models.vae import IWAE_DECODER_BATCH
from genmodels.training import preset_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="vae", choices=["vae", "cvae"])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--images", type=int, default=256, help="images per IWAE call (the evaluation's batch)")
    parser.add_argument("--k", type=int, default=40, help="importance samples per image in each timed call")
    parser.add_argument("--decoder-batches", type=int, nargs="+", default=[1024, 512, 256],
                        help="decoder batches to compare; the first is the baseline of the speedups")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    too_small = [b for b in args.decoder_batches if b < args.images or b % args.images]
    if too_small:
        parser.error(f"--decoder-batches {too_small}: each must be a multiple of --images ({args.images})")

    torch.set_num_threads(args.threads)
    overrides, _ = preset_configs(args.family, args.preset)
    torch.manual_seed(0)
    model = build_model(args.family, ImageSpec(1, 28, 28, 2, 10), **overrides).eval()
    model.to(memory_format=torch.channels_last)
    x = (torch.rand(args.images, 1, 28, 28) < 0.3).float()
    labels = torch.arange(args.images) % 10 if model.conditional else None
    rates: dict[int, list[float]] = {b: [] for b in args.decoder_batches}
    with torch.inference_mode():
        model.iwae(x[:8], None if labels is None else labels[:8], k=4)  # warm-up
        for _ in range(args.repeats):
            for decoder_batch in rates:
                t0 = time.perf_counter()
                model.iwae(x, labels, k=args.k, chunk=decoder_batch // args.images)
                rates[decoder_batch].append(args.images * args.k / (time.perf_counter() - t0))
    medians = {b: statistics.median(r) for b, r in rates.items()}
    baseline = medians[args.decoder_batches[0]]
    print(json.dumps({"family": args.family, "preset": args.preset, "images": args.images, "k": args.k,
                      "threads": args.threads, "repeats": args.repeats, "default": IWAE_DECODER_BATCH["cpu"],
                      "samples_per_s": {str(b): round(m) for b, m in medians.items()},
                      "speedup": {str(b): round(m / baseline, 2) for b, m in medians.items()}}))


if __name__ == "__main__":
    main()
