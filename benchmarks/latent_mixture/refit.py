"""What sampling from a latent mixture buys a VAE/CVAE run trained without one: the run's
weights, the mixture fit exactly as training now ends (``finish_training``), then the sample
figures of the preset's evaluation and an IWAE bound on the same test images, under the
trained prior and under the mixture. Read-only on the store; one JSON line per variant.

    .venv/bin/python benchmarks/latent_mixture/refit.py --family cvae --preset cpu \\
        --out file:///work/main/.genmodels/cpu-runs --components 0,20 --iwae-k 10 --iwae-examples 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from _run import add_run_options, load_run  # the latent-mixture benchmarks' shared run options
from genmodels.data.loader import model_input
from genmodels.evaluation import domain_metrics, evaluation_settings
from genmodels.evaluation._common import head, split_of
from genmodels.models import family_class
from genmodels.training import finish_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--components", default="0,20", help="latent mixture sizes; 0 = the trained prior")
    parser.add_argument("--iwae-k", type=int, default=10)
    parser.add_argument("--iwae-examples", type=int, default=2000)
    args = parser.parse_args()

    storage, ckpt, snapshot, train_cfg = load_run(args)
    settings = evaluation_settings(args.preset)
    test = head(split_of(snapshot, "test"), args.iwae_examples)
    x, y = model_input(test, snapshot.image), torch.from_numpy(test.y).long()
    cls = family_class(args.family)
    for components in (int(c) for c in args.components.split(",")):
        config = dataclasses.replace(cls.config_class.from_dict(ckpt["config"]), latent_mixture=components)
        model = cls(config)
        trained = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("mixture_")}
        missing, unexpected = model.load_state_dict(trained, strict=False)
        assert not unexpected and all(k.startswith("mixture_") for k in missing), (missing, unexpected)
        t0 = time.perf_counter()
        finish_training(model, snapshot, train_cfg, torch.device("cpu"))
        fit_s = time.perf_counter() - t0
        model.eval()
        torch.manual_seed(0)
        labels = y if model.conditional else None
        bound = torch.cat([model.log_likelihood(x[s:s + 500], None if labels is None else labels[s:s + 500],
                                                k=args.iwae_k) for s in range(0, len(x), 500)])
        torch.manual_seed(0)
        metrics = domain_metrics(model, snapshot, storage=storage, n_samples=settings["n_samples"], seed=0,
                                 max_examples=settings["max_examples"])
        print(json.dumps({"family": args.family, "preset": args.preset, "latent_mixture": components,
                          "fit_s": round(fit_s, 1), f"iwae_k{args.iwae_k}_nll_first_{len(x)}": -float(bound.mean()),
                          **{k: v for k, v in metrics.items() if not k.startswith("classifier")}}, sort_keys=True),
              flush=True)


if __name__ == "__main__":
    main()
