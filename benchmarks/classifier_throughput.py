"""Training images/s of the evaluation's domain classifier (Fashion-MNIST's shape) in the
default memory layout against channels-last, the layout it now uses. Same weights and batch;
one Adam step per batch as ``train_classifier`` does; the layouts alternate within each
repeat; medians over repeats.

    .venv/bin/python benchmarks/classifier_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from genmodels.evaluation.classifier import ClassifierConfig, DomainClassifier


def images_per_second(layout: torch.memory_format, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    network = DomainClassifier(ClassifierConfig(1, 28, 28, 10)).to(memory_format=layout).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, 28, 28).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        # features() itself asks for channels-last: time the whole network from the layer after it.
        logits = network.head(network.embed(network.body(x)))
        loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.repeats):
        for name, layout in layouts.items():
            rates[name].append(images_per_second(layout, args.batch, args.steps))
    medians = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    print(json.dumps({"threads": args.threads, "batch": args.batch, "images_per_s": medians,
                      "channels_last_speedup": round(medians["channels_last"] / medians["contiguous"], 3)}))


if __name__ == "__main__":
    main()
