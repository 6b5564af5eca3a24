"""Cost per image of one onnxruntime sampling call by the rows it holds: what the serving
batcher's cap on rows per merged call should be for a family. Requests of ``--n`` images each are
merged into calls of ``rows`` (``OnnxSampler.sample_many``, as the Sampler replica does); the
sizes alternate within each repeat; medians over repeats.

    .venv/bin/python benchmarks/sampler_rows.py .genmodels/store/runs/fashion-mnist/pixelrnn-quick/onnx \\
        --rows 16 64 128 256 1024 --n 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from genmodels.sampling import OnnxSampler, Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_dir")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256, 1024])
    parser.add_argument("--n", type=int, default=16, help="images per merged request")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (the Sampler replica's CPUs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-rows", type=int, default=1024, help="images sampled per size per repeat, at least")
    args = parser.parse_args()
    sampler = OnnxSampler.from_dir(args.onnx_dir, intra_op_num_threads=args.threads)
    sampler.sample_many([Request(args.n, 0, None)], 1.0)  # warm-up
    per_image: dict[int, list[float]] = {rows: [] for rows in args.rows}
    for _ in range(args.repeats):
        for rows in args.rows:
            requests = [Request(args.n, seed, None) for seed in range(max(1, rows // args.n))]
            calls = max(1, args.min_rows // rows)
            t0 = time.perf_counter()
            for _ in range(calls):
                sampler.sample_many(requests, 1.0)
            per_image[rows].append((time.perf_counter() - t0) / (calls * len(requests) * args.n))
    for rows, times in per_image.items():
        print(json.dumps({"family": sampler.family, "rows_per_call": rows, "n": args.n, "threads": args.threads,
                          "ms_per_image": round(1000 * statistics.median(times), 3),
                          "repeats_ms": [round(1000 * t, 3) for t in times]}))


if __name__ == "__main__":
    main()
