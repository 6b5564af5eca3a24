"""How far the IWAE estimate of a trained VAE/CVAE moves with k: the NLL (nats) of the first
``--examples`` test images at each k, same draws per k (torch seed 0), and the seconds each took.
What the quick evaluation's k was chosen from.

    .venv/bin/python benchmarks/iwae_k.py --store .genmodels/store --families vae cvae --k 100 250 1000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genmodels import runs
from genmodels.data import read_snapshot
from genmodels.data.prep import snapshot_prefix
from genmodels.data.loader import model_input
from genmodels.evaluation._common import head, split_of
from genmodels.storage import open_storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=".genmodels/store")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--families", nargs="+", default=["vae", "cvae"])
    parser.add_argument("--k", type=int, nargs="+", default=[100, 250, 1000])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per IWAE call (default: all at once, the draws of the figures recorded "
                             "before it existed); 256, the evaluation's, keeps the decoder's batches in cache")
    args = parser.parse_args()
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    torch.set_num_threads(args.threads)
    storage = open_storage(args.store)
    for family in args.families:
        model, meta = runs.load_model(storage.child(runs.run_prefix(args.dataset, family, args.preset)))
        model.eval()
        snapshot = read_snapshot(storage, snapshot_prefix(args.dataset, meta["snapshot_hash"]))
        data = head(split_of(snapshot, "test"), args.examples)
        x = model_input(data, model.image)
        step = args.batch_size or len(x)
        labels = torch.as_tensor(data.y) if model.conditional else None
        for k in args.k:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            with torch.no_grad():
                log_px = torch.cat([model.iwae(x[i : i + step], None if labels is None else labels[i : i + step], k=k)
                                    for i in range(0, len(x), step)])
            nll = -float(log_px.double().mean())
            print(json.dumps({"family": family, "k": k, "examples": len(x), "nll_nats": round(nll, 3),
                              "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
