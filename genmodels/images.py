"""Images as PNG bytes: one PNG per image (the serving API's payloads) and upscaled grids.

numpy and Pillow only, so that serving encodes without importing the evaluation package (and
its classifier and metrics); torch tensors are accepted as they are. Tiny images (8x8 digits,
28x28 clothes) are upscaled in grids with nearest-neighbour so the pixels stay crisp.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["BACKGROUND", "MIN_TILE_PX", "grid_png", "image_pngs", "labelled_rows_png"]

#: Tiles are upscaled by an integer factor until their longer side reaches this many pixels.
MIN_TILE_PX = 64
#: Grey between tiles: visible against both the black and the white of binary images.
BACKGROUND = 0.5


def _float32(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    # float32 arithmetic and round-half-to-even: grids and single images get identical pixels.
    return np.round(x * np.float32(255.0)).astype(np.uint8)


def _grid_array(images: Any, nrow: int | None, scale: int | None, padding: int) -> np.ndarray:
    x = _float32(images)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels to be drawn, got {c}")
    if np.isnan(x).any():
        raise ValueError("images contain NaN")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow (images per row) must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    scale = max(1, math.ceil(MIN_TILE_PX / max(h, w))) if scale is None else scale
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    th, tw = h * scale, w * scale
    tiles = np.clip(x, 0.0, 1.0).repeat(scale, axis=2).repeat(scale, axis=3)
    canvas = np.full((c, rows * th + (rows + 1) * padding, cols * tw + (cols + 1) * padding), BACKGROUND, np.float32)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = padding + r * (th + padding), padding + col * (tw + padding)
        canvas[:, top : top + th, left : left + tw] = tiles[i]
    return _to_uint8(canvas).transpose(1, 2, 0)


def _png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG ("L" for one channel, "RGB" for three)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: Any, nrow: int | None = None, *, scale: int | None = None, padding: int = 2) -> bytes:
    """PNG of ``images`` [N, C, H, W] in [0, 1] (clamped), ``nrow`` images per row (None: the
    squarest grid, ``ceil(sqrt(N))`` per row: the API's ``grid.png`` and the CLI's ``--png``).

    Size: ``cols*W*s + (cols+1)*padding`` by ``rows*H*s + (rows+1)*padding`` with
    ``cols = min(nrow, N)``, ``rows = ceil(N / nrow)`` and ``s`` the upscale factor (default:
    the smallest integer making tiles at least ``MIN_TILE_PX`` pixels on their longer side).
    """
    return _png(_grid_array(images, nrow, scale, padding))


def labelled_rows_png(images: Any, labels: list[str], *, scale: int | None = None, padding: int = 2) -> bytes:
    """``grid_png`` with one row per label and the label written left of its row: ``images``
    [len(labels) * k, C, H, W] in [0, 1], ``k`` images a row. For pictures that compare rows (the
    families side by side), which read wrongly without saying which row is which."""
    x = _float32(images)
    if not labels or x.ndim != 4 or x.shape[0] % len(labels):
        raise ValueError(f"{len(labels)} row labels need a batch of a multiple of {len(labels) or 1} images, got shape "
                         f"{tuple(x.shape)}")
    per_row = x.shape[0] // len(labels)
    grid = _grid_array(x, per_row, scale, padding)
    rows = len(labels)
    tile_h = (grid.shape[0] - (rows + 1) * padding) // rows
    font = ImageFont.load_default()
    boxes = [font.getbbox(text) for text in labels]
    margin = max(right for _, _, right, _ in boxes) + 4 * padding + 4
    canvas = np.full((grid.shape[0], margin + grid.shape[1], grid.shape[2]), _to_uint8(np.float32(BACKGROUND)),
                     np.uint8)
    canvas[:, margin:] = grid
    picture = Image.fromarray(canvas[:, :, 0] if canvas.shape[2] == 1 else canvas)
    draw = ImageDraw.Draw(picture)
    for r, (text, (_, top, _, bottom)) in enumerate(zip(labels, boxes)):
        centre = padding + r * (tile_h + padding) + tile_h // 2
        draw.text((2 * padding, centre - (top + bottom) // 2), text, fill=0 if picture.mode == "L" else (0, 0, 0),
                  font=font)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def image_pngs(images: Any) -> list[bytes]:
    """One PNG per image of ``images`` [N, C, H, W] in [0, 1] (clamped), each at its own size:
    the bytes of ``grid_png(image[None], nrow=1, scale=1, padding=0)``, without the canvas.

    The serving hot path: the batch is quantized to uint8 in one vectorized step, so encoding
    costs little more than zlib itself."""
    x = _float32(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be an [N, C, H, W] batch with 1 (grey) or 3 (RGB) channels, got shape "
                         f"{x.shape}")
    if np.isnan(x).any():
        raise ValueError("images contain NaN")
    pixels = _to_uint8(np.clip(x, 0.0, 1.0)).transpose(0, 2, 3, 1)
    return [_png(p) for p in pixels]
