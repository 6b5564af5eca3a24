"""PixelRNN training step of one layer: the library's recurrences (a conv1d per row / skewed
column) against alternatives tried for issue 10 and rejected, forward + backward on the same
weights and input: ``matmul``, each step as one matmul over the concatenated taps, channels
last; for the Diagonal BiLSTM also ``fused-conv`` / ``fused-matmul``, both directions in one scan
of 2W-1 steps instead of two (a grouped conv1d / a batched matmul per step: half the steps, for
a GPU's launch-bound loop). Each computes the same function (checked first); images/s are
medians over repeats, library and alternative alternating within each repeat.

    .venv/bin/python benchmarks/pixelrnn_layers.py --layer row --hidden 32 --batch 32 --threads 2
    .venv/bin/python benchmarks/pixelrnn_layers.py --layer diagonal --alternative fused-conv --hidden 64 --batch 16
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


def _fused_scan(gates_in: torch.Tensor, weight: torch.Tensor, grouped_conv: bool) -> torch.Tensor:
    """Both directions' diagonal LSTMs in one scan: gates_in [B, D, 4h, H, W], weight [D, 4h, h, 2]
    -> h [B, D, h, H, W]."""
    b, d, g4, height, width = gates_in.shape
    hidden = weight.shape[2]
    skewed = skew(gates_in.flatten(1, 2))
    valid = skew(gates_in.new_ones(1, 1, height, width))
    grouped = weight.flatten(0, 1)  # [D*4h, h, 2], groups=D
    taps = torch.cat([weight[..., 0], weight[..., 1]], dim=2)  # [D, 4h, 2h]: row above, same row
    h = gates_in.new_zeros(b, d, hidden, height)
    c = gates_in.new_zeros(b, d, hidden, height)
    hs = []
    for pre, m in zip(skewed.unbind(-1), valid.unbind(-1)):
        if grouped_conv:
            state = F.conv1d(F.pad(h.flatten(1, 2), (1, 0)), grouped, groups=d).view(b, d, g4, height)
        else:
            state = torch.matmul(taps, torch.cat([F.pad(h, (1, 0))[..., :height], h], dim=2))
        h, c = lstm_cell(pre.view(b, d, g4, height) + state, c, dim=2)
        h, c = h * m, c * m
        hs.append(h.flatten(1, 2))
    return unskew(torch.stack(hs, dim=-1), width).view(b, d, hidden, height, width)


def fused_diagonal(layer: DiagonalBiLSTMLayer, inp: torch.Tensor, grouped_conv: bool) -> torch.Tensor:
    pre = torch.stack([layer.input_to_state(inp), layer.rl_input_to_state(inp).flip(-1)], dim=1)
    weight = torch.stack([layer.state_to_state.weight, layer.rl_state_to_state.weight])
    hs = _fused_scan(pre, weight, grouped_conv)
    h_rl = F.pad(hs[:, 1].flip(-1)[:, :, :-1], (0, 0, 1, 0))
    out = layer.output(hs[:, 0] + h_rl)
    return inp + out if layer.residual else out


ALTERNATIVES = {
    "matmul": {"row": matmul_row, "diagonal": matmul_diagonal},
    "fused-conv": {"diagonal": lambda layer, x: fused_diagonal(layer, x, grouped_conv=True)},
    "fused-matmul": {"diagonal": lambda layer, x: fused_diagonal(layer, x, grouped_conv=False)},
}


def images_per_s(fn, inp: torch.Tensor, steps: int) -> float:
    fn(inp).sum().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(inp).sum().backward()
    return steps * inp.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=["row", "diagonal"], default="row")
    parser.add_argument("--alternative", choices=sorted(ALTERNATIVES), default="matmul")
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
    if args.layer not in ALTERNATIVES[args.alternative]:
        parser.error(f"--alternative {args.alternative} is for the {' or '.join(ALTERNATIVES[args.alternative])} layer")
    alternative = ALTERNATIVES[args.alternative][args.layer]
    inp = torch.randn(args.batch, args.hidden, args.size, args.size, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(inp, None), alternative(layer, inp), rtol=1e-4, atol=1e-5)
    rates: dict[str, list[float]] = {"library": [], "alternative": []}
    for _ in range(args.repeats):
        rates["library"].append(images_per_s(lambda x: layer(x, None), inp, args.steps))
        rates["alternative"].append(images_per_s(lambda x: alternative(layer, x), inp, args.steps))
    lib, alt = statistics.median(rates["library"]), statistics.median(rates["alternative"])
    print(json.dumps({**vars(args), "library_images_per_s": round(lib, 1), "alternative_images_per_s": round(alt, 1),
                      "alternative_vs_library": round(alt / lib, 3)}))


if __name__ == "__main__":
    main()
