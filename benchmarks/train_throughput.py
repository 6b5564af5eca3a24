"""Training throughput (images/s) of a family's preset network, fp32 against bf16 autocast,
the channels-last memory layout, ``torch.compile`` of the forward pass and/or Adam's
implementation (variant names: ``fp32`` or ``bf16``, then any of ``-cl``, ``-compiled``, and
``-fused`` or ``-foreach`` for Adam's fused kernel or its multi-tensor loop; without either,
Adam's default per-tensor loop: ``bf16-cl``, ``bf16-cl-fused``, ``fp32-compiled``). Speedups are
against ``--baseline`` (default ``fp32``). A compiled variant's first step compiles; its seconds
are reported as ``<variant>_compile_s``.

One optimizer step per player per batch, as the training loop does, on a fixed random batch
of 28x28 images (binary, Fashion-MNIST's shape), after warm-up steps. Medians over repeats;
the variants alternate within each repeat so drift hits them alike.

    .venv/bin/python benchmarks/train_throughput.py --family pixelrnn --preset quick --threads 2
    .venv/bin/python benchmarks/train_throughput.py --family vae --preset quick --set res_blocks=1
    .venv/bin/python benchmarks/train_throughput.py --family cvae --variants bf16-cl,bf16-cl-fused --baseline bf16-cl

``--flops`` adds what a step computes and how much of the CPU that is: the matmul and conv
FLOPs of one training step (forward and backward, by ``torch.utils.flop_counter``), each
variant's GFLOP/s, and the GFLOP/s of one large square matmul at the same threads and precision,
the practical ceiling of these cores. A net that already runs near that ceiling gains nothing
from code; only fewer FLOPs or more hardware make it faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from genmodels.models import build_model
from genmodels.models.base import ImageSpec
from genmodels.training import TrainConfig, preset_configs


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


VARIANT_FLAGS = {"cl", "compiled", "fused", "foreach"}


def parse_variant(name: str) -> tuple[bool, set[str]]:
    """(bf16, flags) of a variant name such as ``bf16-cl-fused``."""
    precision, *flags = name.split("-")
    unknown = set(flags) - VARIANT_FLAGS
    if precision not in ("fp32", "bf16") or unknown or {"fused", "foreach"} <= set(flags):
        raise SystemExit(f"variant {name!r}: fp32 or bf16, then any of -cl, -compiled, and -fused or -foreach")
    return precision == "bf16", set(flags)


def steps_per_second(model, batch, cfg: TrainConfig, steps: int, bf16: bool, forward=None,
                     adam: str | None = None) -> tuple[float, float]:
    """Steps/s after one warm-up step, and the warm-up step's seconds (a compile, if any).
    ``adam``: "fused", "foreach" or None (Adam's default per-tensor loop on the CPU)."""
    forward = model if forward is None else forward
    implementation = {adam: True} if adam else {}
    optimizers = {name: torch.optim.Adam(params, lr=1e-4, betas=cfg.betas, **implementation)
                  for name, params in model.players().items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    model.train()

    def step() -> None:
        for player, opt in optimizers.items():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = forward(batch, player)["loss"]
            loss.float().backward()
            opt.step()
            model.after_step(player)

    t0 = time.perf_counter()
    step()
    warm_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0), warm_up


def step_flops(model, batch) -> int:
    """Matmul and conv FLOPs of one training step of every player, forward and backward."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        for player in model.players():
            model(batch, player)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(bf16: bool, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a [size, size] @ [size, size] matmul, median over repeats."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--set", action="append", default=[], help="model override key=value (JSON value)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="fp32,bf16",
                        help="comma-separated: fp32 or bf16 (autocast), then any of -cl (channels-last layout), "
                             "-compiled (torch.compile of the forward pass), -fused or -foreach (Adam)")
    parser.add_argument("--baseline", default="fp32", help="the variant the speedups are against")
    parser.add_argument("--flops", action="store_true",
                        help="also the step's FLOPs, each variant's GFLOP/s and the cores' matmul GFLOP/s")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    overrides, cfg = preset_configs(args.family, args.preset)
    overrides.update({k: _value(v) for k, v in (item.split("=", 1) for item in args.set)})
    image = ImageSpec(1, 28, 28, 2, 10)
    torch.manual_seed(0)
    model = build_model(args.family, image, **overrides)
    batch_size = args.batch_size or cfg.batch_size
    x = (torch.rand(batch_size, *image.shape) < 0.3).float()
    batch = {"x": x, "y": torch.randint(0, 10, (batch_size,))}
    variants = {name: parse_variant(name) for name in args.variants.split(",")}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    # One compiled wrapper per variant for every repeat: only its first step compiles.
    compiled = {name: torch.compile(model) for name, (_, flags) in variants.items() if "compiled" in flags}
    compile_s: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (bf16, flags) in variants.items():
            layout = torch.channels_last if "cl" in flags else torch.contiguous_format
            model.to(memory_format=layout)
            laid_out = {**batch, "x": x.contiguous(memory_format=layout)}
            adam = next((flag for flag in ("fused", "foreach") if flag in flags), None)
            rate, warm_up = steps_per_second(model, laid_out, cfg, args.steps, bf16, compiled.get(name), adam)
            if name in compiled and f"{name}_compile_s" not in compile_s:
                compile_s[f"{name}_compile_s"] = round(warm_up, 1)
            rates[name].append(rate * batch_size)
    medians = {f"{name}_images_per_s": round(statistics.median(r), 1) for name, r in rates.items()}
    medians.update(compile_s)
    base = medians.get(f"{args.baseline}_images_per_s")
    for name in rates:
        if base and name != args.baseline:
            medians[f"{name}_speedup"] = round(medians[f"{name}_images_per_s"] / base, 3)
    if args.flops:
        flops = step_flops(model.to(memory_format=torch.contiguous_format), batch)
        medians["step_gflop"] = round(flops / 1e9, 2)
        # One ceiling per precision: the layout and compile variants share it.
        ceilings = {bf16: matmul_gflops(bf16) for bf16, _ in variants.values()}
        for name, (bf16, _) in variants.items():
            achieved = medians[f"{name}_images_per_s"] / batch_size * flops / 1e9
            ceiling = ceilings[bf16]
            medians[f"{name}_gflops"] = round(achieved, 1)
            medians[f"{name}_matmul_gflops"] = round(ceiling, 1)
            medians[f"{name}_of_matmul"] = round(achieved / ceiling, 3)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"family": args.family, "preset": args.preset, "overrides": overrides, "batch": batch_size,
                      "threads": args.threads, "params": params, **medians}))


if __name__ == "__main__":
    main()
