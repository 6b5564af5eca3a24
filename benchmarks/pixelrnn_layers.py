"""PixelRNN training step of one layer: the library's recurrences (a conv1d per row / skewed
column) against the alternative tried for issue 10 and rejected (each step as one matmul over
the concatenated taps, channels last), forward + backward on the same weights and input. Both
compute the same function (checked first); images/s are medians over repeats, the two
alternating within each repeat.

    .venv/bin/python benchmarks/pixelrnn_layers.py --layer row --hidden 32 --batch 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from genmodels.models._pixelrnn_layers import DiagonalBiLSTMLayer, RowLSTMLayer, lstm_cell, skew, unskew


def _taps_weight(state_to_state: torch.Tensor) -> torch.Tensor:
    """conv1d weight [4h, h, k] -> [k*h, 4h] over tap-major concatenated inputs."""
    out_f, in_f, k = state_to_state.shape
    return state_to_state.permute(2, 1, 0).reshape(k * in_f, out_f)


def matmul_row(layer: RowLSTMLayer, inp: torch.Tensor) -> torch.Tensor:
    b, _, _, width = inp.shape
    pre = layer.input_to_state(inp).permute(0, 2, 3, 1)
    weight = _taps_weight(layer.state_to_state.weight)
    h = inp.new_zeros(b, width, layer.hidden)
    c = inp.new_zeros(b, width, layer.hidden)
    hs = []
    for pre_row in pre.unbind(1):
        padded = F.pad(h, (0, 0, 1, 1))
        taps = torch.cat([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=2)
        h, c = lstm_cell(pre_row + taps @ weight, c, dim=2)
        hs.append(h)
    out = layer.output(torch.stack(hs, dim=1).permute(0, 3, 1, 2))
    return inp + out if layer.residual else out


def _matmul_scan(gates_in: torch.Tensor, state_to_state: torch.Tensor) -> torch.Tensor:
    b, _, height, width = gates_in.shape
    hidden = state_to_state.shape[1]
    skewed = skew(gates_in).permute(0, 3, 2, 1)
    valid = skew(gates_in.new_ones(1, 1, height, width)).permute(0, 3, 2, 1)
    weight = _taps_weight(state_to_state)
    h = gates_in.new_zeros(b, height, hidden)
    c = gates_in.new_zeros(b, height, hidden)
    hs = []
    for pre, m in zip(skewed.unbind(1), valid.unbind(1)):
        above = F.pad(h, (0, 0, 1, 0))[:, :height]
        h, c = lstm_cell(pre + torch.cat([above, h], dim=2) @ weight, c, dim=2)
        h, c = h * m, c * m
        hs.append(h)
    return unskew(torch.stack(hs, dim=1).permute(0, 3, 2, 1), width)


def matmul_diagonal(layer: DiagonalBiLSTMLayer, inp: torch.Tensor) -> torch.Tensor:
    h_lr = _matmul_scan(layer.input_to_state(inp), layer.state_to_state.weight)
    h_rl = _matmul_scan(layer.rl_input_to_state(inp).flip(-1), layer.rl_state_to_state.weight).flip(-1)
    h_rl = F.pad(h_rl[:, :, :-1], (0, 0, 1, 0))
    out = layer.output(h_lr + h_rl)
    return inp + out if layer.residual else out


def images_per_s(fn, inp: torch.Tensor, steps: int) -> float:
    fn(inp).sum().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(inp).sum().backward()
    return steps * inp.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=["row", "diagonal"], default="row")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = (RowLSTMLayer if args.layer == "row" else DiagonalBiLSTMLayer)(args.hidden, 1, True)
    alternative = matmul_row if args.layer == "row" else matmul_diagonal
    inp = torch.randn(args.batch, args.hidden, args.size, args.size, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(inp, None), alternative(layer, inp), rtol=1e-4, atol=1e-5)
    rates: dict[str, list[float]] = {"library": [], "matmul": []}
    for _ in range(args.repeats):
        rates["library"].append(images_per_s(lambda x: layer(x, None), inp, args.steps))
        rates["matmul"].append(images_per_s(lambda x: alternative(layer, x), inp, args.steps))
    lib, alt = statistics.median(rates["library"]), statistics.median(rates["matmul"])
    print(json.dumps({**vars(args), "library_images_per_s": round(lib, 1), "matmul_images_per_s": round(alt, 1),
                      "matmul_vs_library": round(alt / lib, 3)}))


if __name__ == "__main__":
    main()
