"""PixelRNN training step of one layer: the library's recurrences (one matmul per row/column,
fused gate math) against the previous implementation (a conv1d per row/column, one sigmoid per
gate), forward + backward on the same weights and input. Both compute the same function (checked
first); images/s are medians over repeats, the two alternating within each repeat.

    .venv/bin/python benchmarks/pixelrnn_layers.py --layer row --hidden 32 --batch 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from genmodels.models._pixelrnn_layers import GATES, DiagonalBiLSTMLayer, RowLSTMLayer, skew, unskew


def _previous_cell(gates: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, o, g = gates.chunk(GATES, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def previous_row(layer: RowLSTMLayer, inp: torch.Tensor) -> torch.Tensor:
    b, _, _, width = inp.shape
    pre = layer.input_to_state(inp)
    h = inp.new_zeros(b, layer.hidden, width)
    c = inp.new_zeros(b, layer.hidden, width)
    hs = []
    for pre_row in pre.unbind(2):
        h, c = _previous_cell(pre_row + layer.state_to_state(h), c)
        hs.append(h)
    out = layer.output(torch.stack(hs, dim=2))
    return inp + out if layer.residual else out


def _previous_scan(gates_in: torch.Tensor, state_to_state: torch.Tensor) -> torch.Tensor:
    b, _, height, width = gates_in.shape
    hidden = state_to_state.shape[1]
    skewed = skew(gates_in)
    valid = skew(gates_in.new_ones(1, 1, height, width))
    h = gates_in.new_zeros(b, hidden, height)
    c = gates_in.new_zeros(b, hidden, height)
    hs = []
    for pre, m in zip(skewed.unbind(-1), valid.unbind(-1)):
        h, c = _previous_cell(pre + F.conv1d(F.pad(h, (1, 0)), state_to_state), c)
        h, c = h * m, c * m
        hs.append(h)
    return unskew(torch.stack(hs, dim=-1), width)


def previous_diagonal(layer: DiagonalBiLSTMLayer, inp: torch.Tensor) -> torch.Tensor:
    h_lr = _previous_scan(layer.input_to_state(inp), layer.state_to_state.weight)
    h_rl = _previous_scan(layer.rl_input_to_state(inp).flip(-1), layer.rl_state_to_state.weight).flip(-1)
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
    previous = previous_row if args.layer == "row" else previous_diagonal
    inp = torch.randn(args.batch, args.hidden, args.size, args.size, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(inp, None), previous(layer, inp), rtol=1e-4, atol=1e-5)
    rates: dict[str, list[float]] = {"previous": [], "current": []}
    for _ in range(args.repeats):
        rates["previous"].append(images_per_s(lambda x: previous(layer, x), inp, args.steps))
        rates["current"].append(images_per_s(lambda x: layer(x, None), inp, args.steps))
    prev, cur = statistics.median(rates["previous"]), statistics.median(rates["current"])
    print(json.dumps({**vars(args), "previous_images_per_s": round(prev, 1), "current_images_per_s": round(cur, 1),
                      "speedup": round(cur / prev, 3)}))


if __name__ == "__main__":
    main()
