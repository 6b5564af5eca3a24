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

from genmodels.data.loader import model_input
from genmodels.evaluation._common import head, split_of
from genmodels.models import load_checkpoint

from generalization_gap import exact_models_of_one_snapshot, mean_and_error, per_image_nll


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
    models, snapshot = exact_models_of_one_snapshot(args.models, checkpoints, args.store, args.dataset)
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
