"""One family's preset (plus overrides) trained and evaluated with several seeds: is the recipe
stable run to run? Each (variant, seed) trains in its own storage root under ``--out`` (the
snapshot and the cached classifiers are copied from ``--store``, so no run retrains them), with
the preset's own evaluation; one JSON line per run goes to stdout and ``<out>/results.jsonl``.
Runs go ``--parallel`` at a time, each with ``--threads`` torch threads.

    .venv/bin/python benchmarks/recipe_seeds.py --family gan --preset quick --seeds 0 1 2 \\
        --variant base '{}' --variant b128 '{"train": {"batch_size": 128}}' --out /tmp/gan-seeds
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SUMMARY_KEYS = ("nll_nats", "fid", "precision", "recall", "class_accuracy", "val_loss", "train_seconds", "eval_seconds")


def run_one(store: str, out: str, dataset: str, family: str, preset: str, variant: str, spec: dict, seed: int,
            threads: int, evaluate: bool = True) -> dict:
    import torch

    from genmodels import runs
    from genmodels.data import read_snapshot
    from genmodels.storage import open_storage

    # The one snapshot of the dataset in --store: with several, which one a run used would be a guess.
    manifests = sorted((Path(store) / "snapshots" / dataset).glob("*/manifest.json"))
    if len(manifests) != 1:
        raise ValueError(f"{store}/snapshots/{dataset}/ holds {len(manifests)} snapshots; this needs exactly one")
    torch.set_num_threads(threads)
    root = Path(out) / f"{variant}-seed{seed}"
    for part in ("snapshots", "classifiers"):
        if not (root / part).exists():
            shutil.copytree(Path(store) / part, root / part)
    storage = open_storage(root.resolve().as_uri())
    snapshot = read_snapshot(storage, str(manifests[0].parent.relative_to(Path(store))))
    t0 = time.perf_counter()
    outcome = runs.train_family(storage, snapshot, family, preset, overrides={**spec.get("train", {}), "seed": seed},
                                model_overrides=spec.get("model", {}))
    wall = time.perf_counter() - t0
    metrics = runs.evaluate_model(storage, outcome.result.model.eval(), snapshot, preset, seed=0) if evaluate else {}
    metrics["val_loss"] = outcome.result.history[-1].get("val_loss")
    metrics["train_seconds"] = sum(h.get("seconds", 0.0) for h in outcome.result.history)
    metrics["train_wall_seconds"] = wall
    row = {"variant": variant, "seed": seed, "spec": spec, **metrics}
    (root / "metrics.json").write_text(json.dumps(row, indent=1, sort_keys=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"),
                        help='a name and {"model": {...}, "train": {...}} over the preset; repeatable')
    parser.add_argument("--store", default=".genmodels/store", help="storage root holding the snapshot and classifiers")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true",
                        help="skip the evaluation (compare exact models with paired_nll.py afterwards)")
    args = parser.parse_args()
    variants = [(name, json.loads(spec)) for name, spec in (args.variant or [("base", "{}")])]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(v, spec, s) for v, spec in variants for s in args.seeds]
    with ProcessPoolExecutor(args.parallel) as pool, open(Path(args.out) / "results.jsonl", "a") as log:
        futures = [pool.submit(run_one, args.store, args.out, args.dataset, args.family, args.preset, v, spec, s,
                               args.threads, not args.train_only)
                   for v, spec, s in jobs]
        for future in futures:
            row = future.result()
            log.write(json.dumps(row, sort_keys=True) + "\n")
            log.flush()
            print(json.dumps({k: row[k] for k in ("variant", "seed", *SUMMARY_KEYS) if k in row}), flush=True)


if __name__ == "__main__":
    main()
