"""Building blocks of PixelRNN: causal masks, masked convolutions and the two LSTM layers.

Every layer has two equivalent code paths over the same parameters:
- ``forward``: the whole image at once (training, likelihoods), vectorized over a row
  (Row LSTM) or a skewed column (Diagonal BiLSTM), looping only over rows / columns;
- ``step`` (and ``rl_row`` for the diagonal layer): one pixel (one row) from cached
  neighbour states, used by the cached sampler. The two must agree to float rounding;
  the tests check that they do.

Channel groups. With ``C = 3`` image channels, every feature map is split into C groups
(R, G, B) and a feature of group ``g`` at pixel (i, j) may only see sub-pixels of (i, j)
of channels ``< g`` (plus everything at earlier pixels). Masks of type "A" (the input
convolution) connect input group ``g'`` to output group ``g`` iff ``g' < g``; type "B"
(every later masked map) iff ``g' <= g``. With ``C = 1`` there is one group: "A" cuts the
current pixel off entirely, "B" keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Gate blocks of an LSTM pre-activation, in this order along the channel axis.
GATES = 4  # input, forget, output, candidate


def group_ids(total: int, block: int, channels: int) -> torch.Tensor:
    """Channel-group index of each of ``total`` features laid out as repeated blocks of ``block``.

    Within a block, features are split into ``channels`` equal contiguous groups: hidden maps
    use one block (``total == block``), gate maps use four blocks (one per gate) and the
    logits use ``block = C * levels`` so that group ``c`` holds channel ``c``'s levels.
    """
    if block % channels:
        raise ValueError(f"a block of {block} features cannot be split into {channels} channel groups")
    return (torch.arange(total) % block) // (block // channels)


def channel_mask(out_groups: torch.Tensor, in_groups: torch.Tensor, kind: str) -> torch.Tensor:
    """[out, in] 0/1 mask: which input features of the *current* pixel each output may see."""
    if kind == "A":
        allowed = in_groups[None, :] < out_groups[:, None]
    elif kind == "B":
        allowed = in_groups[None, :] <= out_groups[:, None]
    else:
        raise ValueError(f"mask kind must be 'A' or 'B', got {kind!r}")
    return allowed.float()


def causal_kernel_mask(
    out_groups: torch.Tensor, in_groups: torch.Tensor, kernel: tuple[int, int], kind: str
) -> torch.Tensor:
    """[out, in, kh, kw] mask of a kernel centred on the current pixel, raster-order causal.

    Rows above the centre are fully visible, the centre row up to the pixel on its left,
    the centre tap by the channel-group mask, everything after it not at all.
    """
    kh, kw = kernel
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"masked kernels need odd sizes, got {kh}x{kw}")
    ch, cw = kh // 2, kw // 2
    mask = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    mask[:, :, :ch, :] = 1.0
    mask[:, :, ch, :cw] = 1.0
    mask[:, :, ch, cw] = channel_mask(out_groups, in_groups, kind)
    return mask


class MaskedConv2d(nn.Conv2d):
    """Conv centred on each pixel (output size = input size) with a fixed causal weight mask.

    Masked taps are exactly zero, so gradients and outputs never leak from the future. The mask
    is rebuilt from the config, hence a non-persistent buffer (not in checkpoints).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel: tuple[int, int],
        kind: str,
        channels: int,
        in_block: int,
        out_block: int,
    ) -> None:
        super().__init__(in_features, out_features, kernel)  # padding is done in forward
        mask = causal_kernel_mask(
            group_ids(out_features, out_block, channels), group_ids(in_features, in_block, channels), kernel, kind
        )
        self.register_buffer("mask", mask, persistent=False)
        # Taps after the centre are always masked off: convolve with the visible part only
        # (the 7x7 mask-A conv runs as 4x7, a 1x3 as 1x2), padding top/left to stay centred.
        kh, kw = kernel
        ch, cw = kh // 2, kw // 2
        self._visible = (ch + 1, kw) if ch > 0 else (1, cw + 1)
        self._pad = (cw, kw - 1 - cw if ch > 0 else 0, ch, 0)  # F.pad order: left, right, top, bottom

    @property
    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self._visible
        w = self.weight[:, :, :rows, :cols] * self.mask[:, :, :rows, :cols]
        return F.conv2d(F.pad(x, self._pad), w, self.bias)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """A half-precision activation (a convolution's output under autocast) widened to fp32.

    What accumulates, the LSTM cells over the rows and the residual stream over the layers, stays
    fp32 under bf16 autocast, so only the convolutions run in bf16."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def lstm_cell(gates: torch.Tensor, c_prev: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM update with the gate blocks along ``dim``; elementwise, so it preserves channel groups.
    (One sigmoid over the three sigmoid gates measured no faster: benchmarks/pixelrnn_layers.py.)"""
    i, f, o, g = full_precision(gates).chunk(GATES, dim=dim)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def skew(x: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] -> [B, K, H, H+W-1], row i shifted right by i (zeros elsewhere).

    Pads each row to width W+H, flattens and re-cuts rows one shorter: each row then starts
    one element later than the one above. No Python loop, so it costs one copy.
    """
    b, k, h, w = x.shape
    flat = F.pad(x, (0, h)).flatten(2)[:, :, : h * (w + h - 1)]
    return flat.reshape(b, k, h, w + h - 1)


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`skew`: [B, K, H, H+W-1] -> [B, K, H, W]."""
    b, k, h, _ = x.shape
    flat = F.pad(x.flatten(2), (0, h))
    return flat.reshape(b, k, h, width + h)[:, :, :, :width]


def diagonal_scan(gates_in: torch.Tensor, state_to_state: torch.Tensor) -> torch.Tensor:
    """Left-to-right diagonal LSTM over a map of input-to-state pre-activations.

    gates_in [B, 4h, H, W], state_to_state [4h, h, 2] (taps: row above, same row). After the
    skew, the state at (i, j) reads the previous skewed column at rows i-1 and i, i.e. the
    pixels above (i-1, j) and left (i, j-1); one step handles a whole anti-diagonal.
    Returns h [B, h, H, W].
    """
    b, _, height, width = gates_in.shape
    hidden = state_to_state.shape[1]
    skewed = skew(full_precision(gates_in))
    # States outside the image (left and right of each skewed row) are zeroed so that the
    # left neighbour of column 0 is exactly zero, as in the cached sampler.
    valid = skew(gates_in.new_ones(1, 1, height, width))
    h = gates_in.new_zeros(b, hidden, height)
    c = gates_in.new_zeros(b, hidden, height)
    hs = []
    # unbind, not skewed[..., t]: the backward of T selects would build T full-size zero grads.
    for pre, m in zip(skewed.unbind(-1), valid.unbind(-1)):
        h, c = lstm_cell(pre + F.conv1d(F.pad(h, (1, 0)), state_to_state), c)
        h, c = h * m, c * m
        hs.append(h)
    return unskew(torch.stack(hs, dim=-1), width)


class RowLSTMLayer(nn.Module):
    """Row LSTM: a row at a time, each state seeing three states of the row above.

    input-to-state: masked 1x3 conv along the row (left neighbour fully, current pixel by
    mask B, right neighbour not at all); state-to-state: 1x3 conv over the previous row's h.
    The cell carries over from the same column of the previous row.
    """

    def __init__(self, hidden: int, channels: int, residual: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.residual = residual
        self.input_to_state = MaskedConv2d(hidden, GATES * hidden, (1, 3), "B", channels, hidden, hidden)
        # The previous row is entirely in the past: no mask.
        self.state_to_state = nn.Conv1d(hidden, GATES * hidden, 3, padding=1, bias=False)
        self.output = MaskedConv2d(hidden, hidden, (1, 1), "B", channels, hidden, hidden)

    def forward(self, inp: torch.Tensor, gate_bias: torch.Tensor | None) -> torch.Tensor:
        """inp [B, h, H, W], gate_bias [B, 4h] or None -> next layer's input [B, h, H, W]."""
        b, _, height, width = inp.shape
        pre = full_precision(self.input_to_state(inp))  # every row's input-to-state at once
        if gate_bias is not None:
            pre = pre + gate_bias[:, :, None, None]
        h = inp.new_zeros(b, self.hidden, width)
        c = inp.new_zeros(b, self.hidden, width)
        hs = []
        # A conv1d per row: on idle cores it beat one matmul over concatenated taps
        # (benchmarks/pixelrnn_layers.py: the matmul form ran at 0.79-0.85x of it).
        # unbind, not pre[:, :, i]: the backward of H selects would build H full-size zero grads.
        for pre_row in pre.unbind(2):
            h, c = lstm_cell(pre_row + self.state_to_state(h), c)
            hs.append(h)
        out = self.output(torch.stack(hs, dim=2))
        return inp + out if self.residual else out

    def step(
        self,
        inp: torch.Tensor,
        left_inp: torch.Tensor,
        above_h: torch.Tensor,
        above_c: torch.Tensor,
        gate_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pixel. inp / left_inp: this layer's input at (i, j) / (i, j-1), [B, h];
        above_h [B, h, 3]: h at (i-1, j-1..j+1); above_c [B, h]: c at (i-1, j).
        Returns (h, c, next layer's input), each [B, h]."""
        w = self.input_to_state.masked_weight  # [4h, h, 1, 3]; tap 2 (right) is masked off
        gates = (
            F.linear(left_inp, w[:, :, 0, 0])
            + F.linear(inp, w[:, :, 0, 1], self.input_to_state.bias)
            + F.linear(above_h.flatten(1), self.state_to_state.weight.flatten(1))
            + gate_bias
        )
        h, c = lstm_cell(gates, above_c)
        out = F.linear(h, self.output.masked_weight[:, :, 0, 0], self.output.bias)
        return h, c, (inp + out if self.residual else out)


class DiagonalBiLSTMLayer(nn.Module):
    """Diagonal BiLSTM: two diagonal LSTMs (left-to-right, right-to-left) over skewed maps.

    input-to-state is 1x1, state-to-state a 2x1 conv over the previous skewed column. The
    right-to-left direction runs on the mirrored map; its output is shifted down one row
    before it is added, because at (i, j) it has seen pixels to the right of j on row i.
    """

    def __init__(self, hidden: int, channels: int, residual: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.residual = residual
        self.input_to_state = MaskedConv2d(hidden, GATES * hidden, (1, 1), "B", channels, hidden, hidden)
        self.state_to_state = nn.Conv1d(hidden, GATES * hidden, 2, bias=False)
        # Unmasked: this direction only ever reaches the output one row later, when every
        # sub-pixel of its row is already known.
        self.rl_input_to_state = nn.Conv2d(hidden, GATES * hidden, 1)
        self.rl_state_to_state = nn.Conv1d(hidden, GATES * hidden, 2, bias=False)
        self.output = MaskedConv2d(hidden, hidden, (1, 1), "B", channels, hidden, hidden)

    def forward(self, inp: torch.Tensor, gate_bias: torch.Tensor | None) -> torch.Tensor:
        """inp [B, h, H, W], gate_bias [B, 2, 4h] (per direction) or None -> [B, h, H, W]."""
        pre_lr = self.input_to_state(inp)
        pre_rl = self.rl_input_to_state(inp)
        if gate_bias is not None:
            pre_lr = pre_lr + gate_bias[:, 0, :, None, None]
            pre_rl = pre_rl + gate_bias[:, 1, :, None, None]
        h_lr = diagonal_scan(pre_lr, self.state_to_state.weight)
        h_rl = diagonal_scan(pre_rl.flip(-1), self.rl_state_to_state.weight).flip(-1)
        h_rl = F.pad(h_rl[:, :, :-1], (0, 0, 1, 0))  # row i gets row i-1's right-to-left state
        out = self.output(h_lr + h_rl)
        return inp + out if self.residual else out

    def step(
        self,
        inp: torch.Tensor,
        left_h: torch.Tensor,
        left_c: torch.Tensor,
        above_h: torch.Tensor,
        rl_above: torch.Tensor,
        gate_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-to-right direction at one pixel. inp: this layer's input at (i, j);
        left_h / left_c: state at (i, j-1); above_h: left-to-right h at (i-1, j); rl_above:
        right-to-left h at (i-1, j); gate_bias: [B, 4h]. All [B, h]-like.
        Returns (h, c, next layer's input)."""
        w_ss = self.state_to_state.weight  # [4h, h, 2]: taps (row above, same row)
        gates = (
            F.linear(inp, self.input_to_state.masked_weight[:, :, 0, 0], self.input_to_state.bias)
            + F.linear(above_h, w_ss[:, :, 0])
            + F.linear(left_h, w_ss[:, :, 1])
            + gate_bias
        )
        h, c = lstm_cell(gates, left_c)
        out = F.linear(h + rl_above, self.output.masked_weight[:, :, 0, 0], self.output.bias)
        return h, c, (inp + out if self.residual else out)

    def rl_row(self, row_inp: torch.Tensor, rl_above: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
        """Right-to-left direction over one finished row.

        row_inp [B, h, W]: this layer's input along row i; rl_above [B, h, W]: this
        direction's h on row i-1; gate_bias [B, 4h]. Returns its h on row i, [B, h, W].
        """
        w_ss = self.rl_state_to_state.weight
        w_is = self.rl_input_to_state.weight[:, :, 0, 0]
        # Everything except the right neighbour is known for the whole row: one matmul.
        pre = (
            torch.einsum("oc,bcw->bow", w_is, row_inp)
            + torch.einsum("oc,bcw->bow", w_ss[:, :, 0], rl_above)
            + (self.rl_input_to_state.bias[None, :] + gate_bias)[:, :, None]
        )
        h = row_inp.new_zeros(row_inp.shape[0], self.hidden)
        c = torch.zeros_like(h)
        hs = []
        for pre_j in reversed(pre.unbind(-1)):
            h, c = lstm_cell(pre_j + F.linear(h, w_ss[:, :, 1]), c)
            hs.append(h)
        return torch.stack(hs[::-1], dim=-1)
