"""PixelRNN sampling: cached recurrent state vs a full forward pass per pixel.

Both samplers run in the same process on the same weights and noise; the figure is the ratio
of median wall times over repeats (and a check that they produced identical images).

    .venv/bin/python benchmarks/pixelrnn_sampling.py --size 28 --batch 16 --repeats 3

``--preset P`` samples the net of the PixelRNN's preset P (random weights: the cost does not
depend on them) and ``--no-naive`` times the cached sampler alone, in images/s (the naive one
takes hours at the batches an evaluation samples in):

    .venv/bin/python benchmarks/pixelrnn_sampling.py --preset cpu --batch 1000 --repeats 3 --no-naive
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genmodels.models import build_model
from genmodels.models.base import ImageSpec
from genmodels.models.pixelrnn import PixelRNN


def median_seconds(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", choices=["row", "diagonal"], default="row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--preset", choices=sorted(PixelRNN.presets), default=None,
                        help="the net of this preset (default: a 3x32 Row LSTM or Diagonal BiLSTM, head 64)")
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the naive sampler and compare the images")
    parser.add_argument("--input-width", type=int, default=None,
                        help="columns of the mask-A input kernel (default square; the quick preset: 2*size-1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = ImageSpec(channels=1, height=args.size, width=args.size, levels=2, num_classes=10)
    if args.preset:
        net = dict(PixelRNN.presets[args.preset]["model"])
    else:
        net = dict(layer=args.layer, num_layers=3, hidden_channels=32, head_hidden=64, input_width=args.input_width)
    model = build_model("pixelrnn", image, **net).eval()
    from genmodels.models.base import make_noise_tensors

    noise = make_noise_tensors(model.noise_spec(), seed=0, count=args.batch)
    model.sample_cached({"u": noise["u"][:8]})  # warm-up: the first call pays for kernel selection
    cached_s, cached = median_seconds(lambda: model.sample_cached(noise), args.repeats)
    if not args.naive:
        print(f"pixelrnn {net} {args.size}x{args.size} batch {args.batch} threads {args.threads}: "
              f"cached {cached_s:.2f} s, {args.batch / cached_s:.1f} images/s")
        return
    naive_s, naive = median_seconds(lambda: model.sample_naive(noise), args.repeats)
    print(f"pixelrnn {args.layer} {args.size}x{args.size} batch {args.batch} threads {args.threads}: "
          f"cached {cached_s:.2f} s, naive {naive_s:.2f} s, speed-up {naive_s / cached_s:.1f}x, "
          f"identical images: {torch.equal(cached, naive)}")


if __name__ == "__main__":
    main()
