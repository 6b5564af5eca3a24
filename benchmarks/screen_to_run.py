"""Make a one-process screen's weights (``weight_averaging.py --work DIR``) the run of its preset in a
store, so that ``genmodels evaluate`` scores them exactly as it scores a retrain: likelihood on the
preset's test images, completion, domain FID/KID, precision/recall, pictures.

The screen's checkpoint names no snapshot (a local run's does not): the run is written against the
snapshot ``prepare`` makes from the same dataset files, the one the screen trained on. Its moving
averages are left out; the live weights are what the screen scored as ``live_nll``.

    .venv/bin/python benchmarks/screen_to_run.py --work /tmp/head256/work --preset cpu --out file:///tmp/h256
    .venv/bin/genmodels evaluate --family pixelrnn --preset cpu --out file:///tmp/h256

(Copy ``snapshots/`` and ``classifiers/`` of an earlier store into ``--out`` first to skip preparing the
data and training the domain classifier again.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genmodels.data.prep import prepare
from genmodels.models import checkpoint_bytes
from genmodels.runs import plan_run, run_prefix
from genmodels.storage import open_storage
from genmodels.training import load_training_state

from weight_averaging import live_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the screen's --work (holds checkpoint.pt)")
    parser.add_argument("--out", required=True, help="the store to write the run into")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--family", default="pixelrnn")
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()

    checkpoint = Path(args.work) / "checkpoint.pt"
    state = load_training_state(checkpoint.read_bytes())
    trained = state["train_state"]
    snapshot = prepare(args.dataset)
    # The run's metadata as a retrain of this preset writes it; the training config is the screen's own
    # (its --set overrides included), not the preset's.
    _fresh, _preset_cfg, meta = plan_run(snapshot, args.family, args.preset)
    prefix = run_prefix(snapshot.dataset, args.family, args.preset)
    run = open_storage(args.out).child(prefix)
    if run.exists("model.pt"):
        raise SystemExit(f"{args.out} already holds a {args.family}-{args.preset} run: choose another store")
    run.put_bytes("model.pt", checkpoint_bytes(live_model(state), {
        **meta, "train_config": trained["train_config"], "epochs": trained["epoch"], "screen": str(checkpoint)}))
    run.put_bytes("history.json", json.dumps(trained["history"], indent=2).encode())
    print(json.dumps({"run": prefix, "epochs": trained["epoch"], "snapshot": snapshot.hash[:16]}))


if __name__ == "__main__":
    main()
