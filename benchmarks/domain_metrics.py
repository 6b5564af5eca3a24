"""Sample-quality figures of a trained run (domain FID/KID, precision/recall, class accuracy)
with its preset's evaluation settings, without the likelihood pass: the same numbers
``genmodels evaluate`` writes for them, in minutes where a ``cpu`` preset's IWAE k=5000 pass
takes hours on 2 cores. One JSON line to stdout, with the weights digests of the classifiers
the figures were measured with (``feature_network``, ``class_judge``); the storage's cached
classifiers are used (trained and cached there when missing).

    .venv/bin/python benchmarks/domain_metrics.py --family vae --preset cpu \\
        --out file:///work/main/.genmodels/cpu-runs

``--checkpoint FILE``: the model a copy of the run's ``checkpoint.pt`` (an earlier epoch) would
have shipped, had the run ended there.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genmodels.data.prep import snapshot_prefix
from genmodels.evaluation import domain_metrics, evaluation_settings
from genmodels.runs import load_model, load_snapshot, run_prefix
from genmodels.storage import open_storage
from genmodels.training import load_training_state, shipped_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", required=True, help="the storage root the run was trained under")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="a training checkpoint of the run (default: the run's model.pt)")
    args = parser.parse_args()

    storage = open_storage(args.out)
    epoch = None
    if args.checkpoint:
        with open(args.checkpoint, "rb") as f:
            state = load_training_state(f.read())
        snapshot = load_snapshot(storage, snapshot_prefix(args.dataset, state["meta"]["snapshot_hash"]))
        model, epoch = shipped_model(state, snapshot, torch.device("cpu")), state["train_state"]["epoch"]
    else:
        model, meta = load_model(storage.child(run_prefix(args.dataset, args.family, args.preset)))
        snapshot = load_snapshot(storage, snapshot_prefix(args.dataset, meta["snapshot_hash"]))
    settings = evaluation_settings(args.preset)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    provenance: dict[str, str] = {}
    metrics = domain_metrics(model, snapshot, storage=storage, n_samples=settings["n_samples"], seed=args.seed,
                             max_examples=settings["max_examples"], provenance=provenance)
    print(json.dumps({"family": args.family, "preset": args.preset, "snapshot": snapshot.hash[:16], "epoch": epoch,
                      "seconds": round(time.perf_counter() - t0, 1), **metrics, **provenance}, sort_keys=True))


if __name__ == "__main__":
    main()
