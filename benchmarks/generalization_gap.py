"""Does an exact-likelihood model (PixelRNN, mixture) fit its training images better than held-out
ones, and does that gap grow from one epoch's checkpoint to the next?

Two figures per checkpoint, on ``--examples`` random training images (one fixed binarization drawn
here, as the loader draws them) and the first ``--examples`` validation images (the snapshot's own
binarization):
- the level gap, validation NLL minus training NLL: unpaired, so it carries the sampling noise of
  two image sets (per-image NLLs spread by ~75 nats on Fashion-MNIST: +-1.4 nats on 3,000 images);
- the change of each set's NLL from the previous checkpoint: paired image by image, so it is
  precise. Memorization shows as training images improving more than validation images.

    .venv/bin/python benchmarks/generalization_gap.py --store /tmp/cpu6x48/store --examples 3000 \
        /tmp/cpu6x48/store/ray/fashion-mnist/pixelrnn-cpu-*/epoch-0000[34]/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from genmodels.data import read_snapshot
from genmodels.data.loader import model_input
from genmodels.data.prep import snapshot_prefix
from genmodels.evaluation._common import head, split_of
from genmodels.models import model_from_checkpoint
from genmodels.storage import open_storage
from genmodels.training import load_training_state


def per_image_nll(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([-model.log_likelihood(x[i:i + batch_size], y[i:i + batch_size] if model.conditional else None)
                          .double() for i in range(0, len(x), batch_size)])


def exact_models_of_one_snapshot(paths: list[str], checkpoints: list[dict], store: str, dataset: str):
    """The checkpoints' models and the one snapshot they were all trained on; refused where a model
    has no exact likelihood or the snapshots differ, since per-image NLLs would not compare."""
    models = [model_from_checkpoint(ckpt) for ckpt in checkpoints]
    for path, model in zip(paths, models):
        if not model.has_likelihood or model.has_latent:
            raise SystemExit(f"{path}: a {model.family} has no exact likelihood to compare")
    hashes = {ckpt["meta"]["snapshot_hash"] for ckpt in checkpoints}
    if len(hashes) != 1:
        raise SystemExit(f"the checkpoints were trained on different snapshots: {sorted(hashes)}")
    return models, read_snapshot(open_storage(store), snapshot_prefix(dataset, hashes.pop()))


def mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    return round(float(values.mean()), 3), round(float(values.std() / len(values) ** 0.5), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="training checkpoints (epoch-N/checkpoint.pt), oldest first")
    parser.add_argument("--store", required=True, help="the store holding the run's dataset snapshot")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    states = [load_training_state(Path(path).read_bytes()) for path in args.checkpoints]
    models, snapshot = exact_models_of_one_snapshot(args.checkpoints, states, args.store, args.dataset)
    rng = np.random.default_rng(args.seed)
    train = split_of(snapshot, "train")
    picked = np.sort(rng.choice(len(train.y), size=min(args.examples, len(train.y)), replace=False))
    grey = torch.from_numpy(train.x[picked]).float() / 255.0
    train_x = torch.bernoulli(grey, generator=torch.Generator().manual_seed(args.seed))
    train_y = torch.as_tensor(train.y[picked], dtype=torch.long)
    val = head(split_of(snapshot, "val"), args.examples)
    val_x, val_y = model_input(val, models[0].image), torch.as_tensor(val.y, dtype=torch.long)

    previous = None
    for path, state, model in zip(args.checkpoints, states, models):
        nll = {"train": per_image_nll(model, train_x, train_y), "val": per_image_nll(model, val_x, val_y)}
        row = {"checkpoint": path, "epoch": state["train_state"]["epoch"],
               "train_nll": mean_and_error(nll["train"]), "val_nll": mean_and_error(nll["val"]),
               "gap": round(float(nll["val"].mean() - nll["train"].mean()), 3)}
        if previous is not None:
            row["train_change"] = mean_and_error(nll["train"] - previous["train"])
            row["val_change"] = mean_and_error(nll["val"] - previous["val"])
        print(json.dumps(row), flush=True)
        previous = nll


if __name__ == "__main__":
    main()
