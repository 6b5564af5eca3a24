"""Exact-likelihood models of one snapshot (runs' ``model.pt``) scored on the same test images, each
against the first, paired image by image. Per-image NLLs spread by ~75 nats on Fashion-MNIST, so two
runs' levels carry +-0.75 nats each on 10,000 images while their paired difference is precise to a
few hundredths: the way to tell two recipes apart when their runs are not screens of one process
(``weight_averaging.py --against`` pairs those).

    .venv/bin/python benchmarks/paired_nll.py --store /tmp/base/store \\
        /tmp/rb/hard/hard-seed0/runs/fashion-mnist/pixelrnn-quick/model.pt \\
        /tmp/rb/soft/soft-seed0/runs/fashion-mnist/pixelrnn-quick/model.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from genmodels.data import read_snapshot
from genmodels.data.loader import model_input
from genmodels.data.prep import snapshot_prefix
from genmodels.evaluation._common import head, split_of
from genmodels.models import load_checkpoint, model_from_checkpoint
from genmodels.storage import open_storage

from generalization_gap import mean_and_error, per_image_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="runs' model.pt files; the first is the baseline")
    parser.add_argument("--store", required=True, help="the store holding the runs' dataset snapshot")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--examples", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoints = [load_checkpoint(Path(path)) for path in args.models]
    models = [model_from_checkpoint(ckpt).eval() for ckpt in checkpoints]
    for path, model in zip(args.models, models):
        if not model.has_likelihood or model.has_latent:
            raise SystemExit(f"{path}: a {model.family} has no exact likelihood to pair")
    hashes = {ckpt["meta"]["snapshot_hash"] for ckpt in checkpoints}
    if len(hashes) != 1:
        raise SystemExit(f"the models were trained on different snapshots: {sorted(hashes)}")
    snapshot = read_snapshot(open_storage(args.store), snapshot_prefix(args.dataset, hashes.pop()))
    test = split_of(snapshot, "test")
    if args.examples is not None:
        test = head(test, args.examples)
    x, y = model_input(test, models[0].image), torch.as_tensor(test.y, dtype=torch.long)

    baseline = None
    for path, model in zip(args.models, models):
        nll = per_image_nll(model, x, y)
        row = {"model": path, "examples": len(nll), "test_nll": mean_and_error(nll)}
        if baseline is not None:
            row["minus_first"] = mean_and_error(nll - baseline)
        print(json.dumps(row), flush=True)
        baseline = nll if baseline is None else baseline


if __name__ == "__main__":
    main()
