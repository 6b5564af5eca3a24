"""IWAE evaluation throughput (decoder samples/s) of a VAE-family preset: the layout and decoder
batch before 543193d (NCHW weights, 100 importance samples per image per decoder call) against
the current ones (channels-last weights, decoder batches near ``IWAE_DECODER_BATCH``).

Random weights and binary images of Fashion-MNIST's shape; the two variants alternate within
each repeat so drift hits them alike; medians over repeats.

    .venv/bin/python benchmarks/iwae_throughput.py --family vae --preset cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from genmodels.models import build_model
from genmodels.models.base import ImageSpec
from genmodels.training import preset_configs

VARIANTS = {"nchw_chunk100": (torch.contiguous_format, 100), "channels_last_default_chunk": (torch.channels_last, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="vae", choices=["vae", "cvae"])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--images", type=int, default=256, help="images per IWAE call (the evaluation's batch)")
    parser.add_argument("--k", type=int, default=40, help="importance samples per image in each timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    overrides, _ = preset_configs(args.family, args.preset)
    torch.manual_seed(0)
    model = build_model(args.family, ImageSpec(1, 28, 28, 2, 10), **overrides).eval()
    x = (torch.rand(args.images, 1, 28, 28) < 0.3).float()
    labels = torch.arange(args.images) % 10 if model.conditional else None
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (layout, chunk) in VARIANTS.items():
            model.to(memory_format=layout)
            with torch.inference_mode():
                model.iwae(x[:8], None if labels is None else labels[:8], k=args.k, chunk=chunk)  # warm-up
                t0 = time.perf_counter()
                model.iwae(x, labels, k=args.k, chunk=chunk)
                rates[name].append(args.images * args.k / (time.perf_counter() - t0))
    medians = {f"{name}_samples_per_s": round(statistics.median(r)) for name, r in rates.items()}
    speedup = medians["channels_last_default_chunk_samples_per_s"] / medians["nchw_chunk100_samples_per_s"]
    print(json.dumps({"family": args.family, "preset": args.preset, "images": args.images, "k": args.k,
                      "threads": args.threads, **medians, "speedup": round(speedup, 2)}))


if __name__ == "__main__":
    main()
