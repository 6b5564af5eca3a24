"""`genmodels complete` from a checkpoint: known rows/mask, same seed same PNG, clear errors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tiny_models import make_model
from typer.testing import CliRunner

from genmodels.cli import app
from genmodels.models import save_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _write_png(path, pixels: np.ndarray):
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def test_complete_writes_the_completions_grid_reproducibly(tmp_path):
    model = make_model("pixelrnn_row")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt)
    x = model.sample(1, seed=2)[0]
    image = _write_png(tmp_path / "in.png", (x[0].numpy() * 255).astype(np.uint8))
    common = ["complete", "--family", "pixelrnn", "--checkpoint", ckpt, "--image", image, "--known-rows", 4,
              "--n", 4]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for png, seed in ((a, 5), (b, 5), (c, 6)):
        result = invoke(*common, "--seed", seed, "--png", png)
        assert result.exit_code == 0, result.output
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert "4 completions by pixelrnn (seed 6)" in " ".join(result.output.split())
    from genmodels.evaluation import grid_png

    want = grid_png(model.complete(x, 4, 4, seed=5), nrow=2)
    assert a.read_bytes() == want


def test_complete_takes_a_mask_for_the_mixture(tmp_path):
    model = make_model("mixture_binary")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt)
    x = model.sample(1, seed=2)[0]
    image = _write_png(tmp_path / "in.png", (x[0].numpy() * 255).astype(np.uint8))
    known = np.add.outer(np.arange(8), np.arange(8)) % 2 == 0
    mask = _write_png(tmp_path / "mask.png", np.where(known, 255, 0).astype(np.uint8))
    out = tmp_path / "out.png"
    result = invoke("complete", "--family", "mixture", "--checkpoint", ckpt, "--image", image, "--mask", mask,
                    "--n", 3, "--seed", 1, "--png", out)
    assert result.exit_code == 0, result.output
    from genmodels.evaluation import grid_png

    assert out.read_bytes() == grid_png(model.complete(x, torch.from_numpy(known), 3, seed=1), nrow=2)


def test_bad_completion_requests_exit_2_with_the_reason(tmp_path):
    vae = make_model("vae")
    ckpt = tmp_path / "vae.pt"
    save_checkpoint(vae, ckpt)
    rnn_ckpt = tmp_path / "rnn.pt"
    save_checkpoint(make_model("pixelrnn_row"), rnn_ckpt)
    good = _write_png(tmp_path / "in.png", np.zeros((8, 8), np.uint8))
    big = _write_png(tmp_path / "big.png", np.zeros((9, 8), np.uint8))
    rgb = _write_png(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    noisy = _write_png(tmp_path / "noisy.png", np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8))
    truncated = tmp_path / "truncated.png"  # its header reads, its pixels do not
    truncated.write_bytes(noisy.read_bytes()[:-40])
    (tmp_path / "folder").mkdir()
    cases = [
        ([ckpt, good, "--known-rows", 3], "the vae family has no exact image completion"),
        ([rnn_ckpt, good], "exactly one of --known-rows and --mask"),
        ([rnn_ckpt, good, "--known-rows", 9], "known rows must be in [0, 8]"),
        ([rnn_ckpt, big, "--known-rows", 3], "takes 8x8 images, got 8x9"),
        ([rnn_ckpt, rgb, "--known-rows", 3], "PNG mode 'RGB'"),
        ([rnn_ckpt, good, "--mask", good], "completes after known rows only"),
        ([rnn_ckpt, truncated, "--known-rows", 3], "truncated.png: unreadable PNG"),
        ([rnn_ckpt, good, "--known-rows", 3, "--png", tmp_path / "folder"], "Is a directory"),
    ]
    for (ckpt_path, image, *rest), message in cases:
        out = [] if "--png" in rest else ["--png", tmp_path / "o.png"]
        result = invoke("complete", "--checkpoint", ckpt_path, "--image", image, *rest, *out)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and message in " ".join(result.output.split()), result.output
