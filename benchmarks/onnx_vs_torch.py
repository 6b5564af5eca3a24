"""Sampling speed per family: the ONNX sampler runtime (onnxruntime, what serving and bulk jobs
run) vs torch eager, on the same noise, at one batch size.

Models are the `quick` presets' networks on 28x28 binary images (weights do not change the
cost). Each variant is timed `--repeats` times after one warm-up call, alternating, medians.

    .venv/bin/python benchmarks/onnx_vs_torch.py --batch 64 --repeats 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", default="mixture,vae,cvae,gan,pixelrnn")
    args = parser.parse_args()

    import torch

    from genmodels.models import parse_families

    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} threads, medians of {args.repeats}")
    print("| family | torch eager ms | onnxruntime ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for family in parse_families(args.families):
        t, o, diff = time_family(family, args.batch, args.repeats, args.threads)
        print(f"| {family} | {t * 1e3:.1f} | {o * 1e3:.1f} | {t / o:.2f}x | {diff:.1e} |", flush=True)


def time_family(family: str, batch: int, repeats: int, threads: int) -> tuple[float, float, float]:
    """(torch s, onnxruntime s, max abs difference) of sampling ``batch`` images, medians."""
    import numpy as np
    import torch

    from genmodels.export import export_sampler
    from genmodels.models import ImageSpec, build_model
    from genmodels.models.base import make_noise_tensors
    from genmodels.sampling import OnnxSampler
    from genmodels.training import preset_configs

    image = ImageSpec(channels=1, height=28, width=28, levels=2, num_classes=10)
    model_cfg, _ = preset_configs(family, "quick")
    model = build_model(family, image, **model_cfg).eval()
    noise = make_noise_tensors(model.noise_spec(), seed=0, count=batch)
    labels = torch.arange(batch) % 10 if model.conditional else None
    with tempfile.TemporaryDirectory() as tmp:
        sampler = OnnxSampler(export_sampler(model, tmp, likelihood=False), intra_op_num_threads=threads)
    feeds = {k: v.numpy() for k, v in noise.items()}
    np_labels = None if labels is None else labels.numpy()

    def run_torch():
        with torch.no_grad():
            return model.sample_from_noise(noise, labels, 1.0).numpy()

    def run_onnx():
        return sampler.sample_from_noise(feeds, np_labels, 1.0)

    diff = float(np.abs(run_torch() - run_onnx()).max())  # also the warm-up
    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    for _ in range(repeats):
        for name, fn in (("torch", run_torch), ("onnx", run_onnx)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["torch"]), statistics.median(times["onnx"]), diff

if __name__ == "__main__":
    main()
