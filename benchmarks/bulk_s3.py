"""Bulk generation throughput: samples/s of a job written to S3 over HTTP (moto's server in its
own process on 127.0.0.1, as an S3 endpoint would be: boto3, real PUTs) vs sampling the same
images in memory, on the same cores.

The model is the quick VAE's network on 28x28 binary images (untrained: weights do not change
the cost); shards are npz. In-memory = ``OnnxSampler.sample`` over the same shard plan, with
nothing encoded or written. Runs alternate; medians over repeats.

    .venv/bin/python benchmarks/bulk_s3.py --n 200000 --shard-size 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="vae")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray-workers", type=int, default=2, help="also run the job on Ray with this many actors "
                                                                  "(0: skip)")
    args = parser.parse_args()

    import socket
    import subprocess
    import sys

    import boto3

    from genmodels.bulk import JobSpec, run_job, shard_plan
    from genmodels.export import export_sampler
    from genmodels.models import ImageSpec, build_model
    from genmodels.sampling import OnnxSampler
    from genmodels.training import preset_configs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            break
        except Exception:  # not listening yet
            time.sleep(0.2)

    model_cfg, _ = preset_configs(args.family, "quick")
    model = build_model(args.family, ImageSpec(1, 28, 28, 2, 10), **model_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(p) for p in export_sampler(model, tmp, likelihood=False)]
        files = {p.name: p.read_bytes() for p in paths}
        sampler = OnnxSampler(paths)
    labels = 0 if sampler.conditional else None

    def in_memory() -> None:
        for start, end in shard_plan(args.n, args.shard_size):
            sampler.sample(end - start, seed=0, labels=labels, start=start)

    def job(use_ray: bool, workers: int) -> None:
        spec = JobSpec(model="bench", version="1", n=args.n, output=f"s3://bench/{uuid.uuid4().hex}", seed=0,
                       labels=labels, shard_size=args.shard_size, format="npz")
        run_job(spec, files, use_ray=use_ray, workers=workers)

    variants = {"in-memory sampling": in_memory, "job to S3, in-process": lambda: job(False, 1)}
    if args.ray_workers:
        from genmodels.ray_runtime import ensure_ray

        ensure_ray()
        variants[f"job to S3, Ray x{args.ray_workers}"] = lambda: job(True, args.ray_workers)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    server.terminate()
    server.wait(timeout=30)

    base = args.n / statistics.median(times["in-memory sampling"])
    print(f"\n{args.family}, {args.n} samples in shards of {args.shard_size}, {os.cpu_count()} CPUs, "
          f"medians of {args.repeats}")
    print("| variant | samples/s | vs in-memory |")
    print("|---|---|---|")
    for name, ts in times.items():
        rate = args.n / statistics.median(ts)
        print(f"| {name} | {rate:,.0f} | {rate / base:.0%} |")


if __name__ == "__main__":
    main()
