"""What the latent-mixture benchmarks share: the options that name a trained VAE/CVAE run, and
that run's checkpoint, snapshot and training config read from its store."""

from __future__ import annotations

import argparse
from typing import Any

from genmodels.data.prep import snapshot_prefix
from genmodels.models import load_checkpoint
from genmodels.runs import load_snapshot, run_prefix
from genmodels.storage import open_storage
from genmodels.training import TrainConfig


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", required=True, choices=["vae", "cvae"])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", required=True, help="the storage root the run was trained under")


def load_run(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, TrainConfig]:
    """(the store, the run's checkpoint, the snapshot it trained on, its training config)."""
    storage = open_storage(args.out)
    ckpt = load_checkpoint(storage.child(run_prefix(args.dataset, args.family, args.preset)).get_bytes("model.pt"))
    snapshot = load_snapshot(storage, snapshot_prefix(args.dataset, ckpt["meta"]["snapshot_hash"]))
    return storage, ckpt, snapshot, TrainConfig.from_dict(ckpt["meta"]["train_config"])
