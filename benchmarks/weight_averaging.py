"""Would an exponential moving average of the weights (Polyak averaging) buy an exact-likelihood
model nats, at no extra training? Trains one preset of a family in this process with moving
averages of several decays kept beside the live weights, then scores the live weights and every
average on the same test images: the differences are paired image by image, so they are precise
where the levels themselves carry the test set's spread.

The averages are buffers of the model, so each epoch's checkpoint holds them and an interrupted
run resumes with them intact (``--work`` keeps the checkpoint). Each epoch's validation NLL of every
average is printed as it comes. At step t an average moves by 1 - min(decay, t / (t + 1)): the plain
mean of all steps until 1 / (1 - decay) of them, a moving average after, so early steps do not pin
it to the random start. (The GAN's warm-up, (1 + t) / (10 + t), would hold every decay above
0.998 at the same value for the ~7k steps of a `cpu` PixelRNN.)

    GENMODELS_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist .venv/bin/python benchmarks/weight_averaging.py \
        --work /tmp/ema/work --preset cpu --decays 0.998 0.999 0.9995

On the `cpu` PixelRNN (benchmarks/RESULTS.md, "A moving average of the PixelRNN's weights") the averages
led by up to 1.3 nats while the learning rate was high and lost to the last step's weights once the
per-step cosine had annealed it to zero.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from genmodels.data.loader import model_input
from genmodels.data.prep import prepare
from genmodels.evaluation._common import head, split_of
from genmodels.models import family_class, model_from_checkpoint
from genmodels.runs import plan_run
from genmodels.storage import open_storage
from genmodels.training import LocalContext, load_training_state, train

from generalization_gap import mean_and_error, per_image_nll


def averaged(model: torch.nn.Module, decays: list[float]) -> torch.nn.Module:
    """``model`` with one moving average of its parameters per decay, kept as buffers and updated
    after every optimizer step."""
    live = dict(model.named_parameters())
    keys = {name: name.replace(".", "__") for name in live}
    for i in range(len(decays)):
        for name, param in live.items():
            model.register_buffer(f"average{i}__{keys[name]}", param.detach().clone())
    # A buffer, so a resumed run's count comes back with the checkpoint.
    model.register_buffer("average_steps", torch.zeros((), dtype=torch.long))

    def after_step(player: str) -> None:
        t = int(model.average_steps)
        model.average_steps.add_(1)
        params = [p.detach() for p in live.values()]
        with torch.no_grad():
            for i, decay in enumerate(decays):
                shadows = [getattr(model, f"average{i}__{keys[name]}") for name in live]
                torch._foreach_lerp_(shadows, params, 1.0 - min(decay, t / (t + 1.0)))

    model.after_step = after_step
    model.average_weights = lambda i: {name: getattr(model, f"average{i}__{keys[name]}") for name in live}
    return model


def scored_with(model, weights, x, y) -> torch.Tensor:
    """Per-image NLL of ``model`` with ``weights`` in place of its parameters (restored after)."""
    params = dict(model.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
        try:
            return per_image_nll(model.eval(), x, y)
        finally:
            for name, value in saved.items():
                params[name].copy_(value)


def live_weights_of(path: str) -> torch.nn.Module:
    """The model of another run of this script at ``path``, without its averages. (A local run's
    checkpoint names no snapshot: ``prepare`` makes the same one from the same dataset files.)"""
    return live_model(load_training_state(Path(path).read_bytes()))


def live_model(state: dict) -> torch.nn.Module:
    """The model of a loaded checkpoint of this script, without its averages."""
    weights = {k: v for k, v in state["state_dict"].items() if not k.startswith("average")}
    return model_from_checkpoint({**state, "state_dict": weights})


def key_values(items: list[str]) -> dict:
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="where the resumable checkpoint goes (a path)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--family", default="pixelrnn")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--decays", type=float, nargs="+", default=[0.998, 0.999, 0.9995])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a TrainConfig override, e.g. epochs=1 or max_train_examples=2000")
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=JSON",
                        help="a model config override, e.g. head_hidden=256")
    parser.add_argument("--val-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", nargs="+", default=[], metavar="CHECKPOINT",
                        help="other runs' checkpoints (another --work's checkpoint.pt, e.g. another learning rate): "
                             "their live weights scored on the same test images, paired with this run's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not family_class(args.family).has_likelihood or family_class(args.family).has_latent:
        raise SystemExit(f"a {args.family} has no exact likelihood to compare averages by")

    snapshot = prepare(args.dataset)
    model, cfg, _ = plan_run(snapshot, args.family, args.preset,
                             overrides={"workers": 1, **key_values(args.set)},
                             model_overrides=key_values(args.model_set))
    model = averaged(model, args.decays)
    # Loaded now, so that a wrong path fails before the hour of training, not after it.
    rivals = {path: live_weights_of(path) for path in args.against}
    val = head(split_of(snapshot, "val"), args.val_examples)
    val_x, val_y = model_input(val, model.image), torch.as_tensor(val.y, dtype=torch.long)

    def on_epoch(record) -> None:
        row = {"epoch": record["epoch"], "seconds": round(record["seconds"], 1), "val_loss": record.get("val_loss")}
        for i, decay in enumerate(args.decays):
            row[f"val_nll_average_{decay}"] = mean_and_error(scored_with(model, model.average_weights(i), val_x, val_y))
        print(json.dumps(row), flush=True)
        model.train()

    started = time.perf_counter()
    result = train(model, snapshot, cfg, LocalContext(open_storage(args.work), on_epoch=on_epoch), finish=False)
    print(json.dumps({"trained_s": round(time.perf_counter() - started), "epochs": result.epochs_completed,
                      "resumed_from_epoch": result.resumed_from_epoch}), flush=True)

    test = head(split_of(snapshot, "test"), args.test_examples)
    x, y = model_input(test, model.image), torch.as_tensor(test.y, dtype=torch.long)
    live = per_image_nll(model.eval(), x, y)
    summary = {"test_images": len(y), "live_nll": mean_and_error(live)}
    for i, decay in enumerate(args.decays):
        nll = scored_with(model, model.average_weights(i), x, y)
        summary[f"average_{decay}"] = {"nll": mean_and_error(nll), "minus_live": mean_and_error(nll - live)}
    for path, rival in rivals.items():
        nll = per_image_nll(rival, x, y)
        summary[path] = {"nll": mean_and_error(nll), "minus_live": mean_and_error(nll - live)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
