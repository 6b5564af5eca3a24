"""Seconds per onnxruntime PixelRNN sampling call for trained models side by side (the serving
path: export_sampler's step graphs under OnnxPixelRNNSampler), alternated call by call so that
host drift hits each alike; medians over repeats.

    .venv/bin/python benchmarks/pixelrnn_onnx_sampling.py --n 16 --repeats 5 \\
        base=/tmp/screen1/base-seed0/runs/fashion-mnist/pixelrnn-quick/model.pt \\
        w55=/tmp/screen1/w55-seed0/runs/fashion-mnist/pixelrnn-quick/model.pt
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from genmodels.export import OnnxPixelRNNSampler, export_sampler
from genmodels.models import load_checkpoint, model_from_checkpoint
from genmodels.models.base import make_noise_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL_PT")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    samplers = {}
    # onnxruntime has read each graph once its session exists: the files need not outlive the loop.
    with tempfile.TemporaryDirectory() as graphs:
        for spec in args.models:
            name, path = spec.split("=", 1)
            model = model_from_checkpoint(load_checkpoint(Path(path).read_bytes())).eval()
            files = export_sampler(model, Path(graphs) / name)
            u = make_noise_tensors(model.noise_spec(), seed=0, count=args.n)["u"].numpy()
            samplers[name] = (OnnxPixelRNNSampler(files, intra_op_num_threads=args.threads), u)
    seconds: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(args.repeats):
        for name, (sampler, u) in samplers.items():
            t0 = time.perf_counter()
            sampler.sample(u)
            seconds[name].append(time.perf_counter() - t0)
    first = statistics.median(next(iter(seconds.values())))
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name}: n={args.n}, {args.threads} thread(s): median {median:.3f} s "
              f"({args.n / median:.0f} images/s), {median / first:.2f}x the first")


if __name__ == "__main__":
    main()
