"""Ray Train overhead: the same training (VAE, quick preset's network) as a plain in-process loop
and on Ray Train with 1 and 2 workers, on the same cores.

Reports the median epoch time (the loop's own timing, recorded in the run history: data,
forward, backward, optimizer, DDP all-reduce) and the wall time of each whole run including
Ray's start-up of the worker group. Runs alternate (plain, ray-1, ray-2, plain, ...) so that
drift in the machine's load hits every variant alike.

    .venv/bin/python benchmarks/ray_overhead.py --dataset fashion-mnist --examples 12000 --epochs 3 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--family", default="vae")
    parser.add_argument("--examples", type=int, default=12000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import torch

    from genmodels.config import get_settings
    from genmodels.data import PrepConfig
    from genmodels.distributed import RayScaling, train_on_ray
    from genmodels.ray_runtime import ensure_ray, stop_ray
    from genmodels.runs import snapshot_for, train_family
    from genmodels.storage import open_storage

    source = get_settings().fashion_mnist_dir if args.dataset == "fashion-mnist" else None
    overrides = {"epochs": args.epochs, "max_train_examples": args.examples, "max_val_examples": 1000,
                 "early_stopping_patience": None}
    ensure_ray(num_cpus=args.cpus)
    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, history: list[dict], wall: float) -> None:
        r = results.setdefault(name, {"epoch_s": [], "images_per_s": [], "wall_s": []})
        # Epoch 1 pays one-time costs (allocator warm-up, DDP bucket set-up): steady state only.
        steady = history[1:] or history
        r["epoch_s"].append(statistics.median(h["seconds"] for h in steady))
        r["images_per_s"].append(statistics.median(h["images_per_s"] for h in steady))
        r["wall_s"].append(wall)

    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(tmp)
        snapshot = snapshot_for(storage, args.dataset, source, PrepConfig())
        for repeat in range(args.repeats):
            # Each repeat trains from scratch: a fresh run (no checkpoint to resume).
            torch.set_num_threads(args.cpus)
            t0 = time.perf_counter()
            out = train_family(storage, snapshot, args.family, "quick", overrides=overrides, fresh=True)
            record("plain loop", out.result.history, time.perf_counter() - t0)
            for workers in (1, 2):
                t0 = time.perf_counter()
                out = train_on_ray(storage, snapshot, args.family, "quick", fresh=True, overrides=overrides,
                                   scaling=RayScaling(num_workers=workers, cpus_per_worker=args.cpus // workers))
                record(f"ray {workers} worker{'s' * (workers > 1)}", out.result.history, time.perf_counter() - t0)
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    stop_ray()

    base = statistics.median(results["plain loop"]["epoch_s"])
    one = statistics.median(results["ray 1 worker"]["images_per_s"])
    print(f"\n{args.family}, {args.dataset}, {args.examples} images/epoch x {args.epochs} epochs, {args.cpus} CPUs, "
          f"medians of {args.repeats}")
    print("| variant | epoch s | vs plain | images/s | vs 1 worker | run wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        epoch, ips = statistics.median(r["epoch_s"]), statistics.median(r["images_per_s"])
        print(f"| {name} | {epoch:.2f} | {epoch / base:.3f} | {ips:.0f} | {ips / one:.2f} | "
              f"{statistics.median(r['wall_s']):.1f} |")


if __name__ == "__main__":
    main()
