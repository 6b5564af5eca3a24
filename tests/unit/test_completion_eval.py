"""Completion in evaluation: log_marginal is the exact marginal (enumerated on 2x2 images), the
likelihood pass's completion NLL is -(log p(x) - log p(top half)), and the figure shows occluded /
completions / original for PixelRNN and mixture runs only."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from test_completion import ALL_2x2, make_mixture_2x2, make_pixelrnn_2x2
from tiny_models import make_model

from genmodels.data.prep import PrepConfig, prepare
from genmodels.evaluation.completion import completion_images, completion_png
from genmodels.evaluation.likelihood import likelihood_metrics
from genmodels.evaluation.pictures import render_pictures
from genmodels.models import build_model


@pytest.fixture(scope="module")
def digits():
    return prepare("digits", prep=PrepConfig(quantization="binary"))


def _enumerated_marginal(model, x, mask, labels=None) -> torch.Tensor:
    agrees = (ALL_2x2[:, 0][:, mask] == x[0][mask]).all(dim=1)
    lab = None if labels is None else torch.full((16,), int(labels))
    with torch.no_grad():
        ll = model.log_likelihood(ALL_2x2, lab).double()
    return torch.logsumexp(ll[agrees], dim=0)


@pytest.mark.parametrize("make", [lambda: make_pixelrnn_2x2("row"), lambda: make_pixelrnn_2x2("diagonal", True),
                                  make_mixture_2x2, lambda: make_mixture_2x2(True)])
def test_log_marginal_of_the_known_pixels_is_exact(make):
    model = make()
    label = 1 if model.conditional else None
    knowns = [0, 1, 2] + ([torch.tensor(b).view(2, 2) for b in itertools.product([False, True], repeat=4)]
                          if model.completes_any_mask else [])
    for known in knowns:
        mask = model.completion_mask(known)
        with torch.no_grad():
            got = model.log_marginal(ALL_2x2, known, None if label is None else torch.full((16,), label)).double()
        for b in range(16):
            want = _enumerated_marginal(model, ALL_2x2[b], mask, label)
            assert abs(float(got[b]) - float(want)) < 1e-5, (known, b)


@pytest.mark.parametrize("case", ["pixelrnn_row", "mixture_binary"])
def test_completion_nll_is_the_hidden_half_given_the_visible_one(case, digits):
    model = make_model(case)
    metrics = likelihood_metrics(model, digits, max_examples=20, batch_size=8)
    x = torch.from_numpy(digits.splits["test"].x_binary[:20]).float()
    # Same batches of 8 as the metric: fp32 conv kernels round differently per batch size.
    with torch.no_grad():
        full = torch.cat([model.log_likelihood(b).double() for b in x.split(8)])
        top = torch.cat([model.log_marginal(b, 4).double() for b in x.split(8)])
    want = float(-(full - top).mean())
    assert metrics["completion_examples"] == 20.0
    assert metrics["completion_nll_nats"] == pytest.approx(want, rel=1e-9)
    assert metrics["completion_bits_per_dim"] == pytest.approx(want / (32 * np.log(2)), rel=1e-9)
    # The same pass scores the whole image: its NLL is the one log_likelihood gives.
    assert metrics["nll_nats"] == pytest.approx(float(-full.mean()), rel=1e-9)
    assert 0 < metrics["completion_nll_nats"] < metrics["nll_nats"]  # the hidden half is part of the whole


@pytest.mark.parametrize("case", ["pixelrnn_row", "pixelrnn_diagonal", "mixture_binary"])
def test_likelihood_and_marginal_together_equal_each_alone(case, digits):
    """The PixelRNN scores both from one forward pass; they must be what each call gives alone."""
    model = make_model(case)
    x = torch.from_numpy(digits.splits["test"].x_binary[:6]).float()
    labels = torch.arange(6) % model.image.num_classes if model.conditional else None
    with torch.no_grad():
        full, top = model.log_likelihood_and_marginal(x, 3, labels)
        assert torch.equal(full, model.log_likelihood(x, labels))
        assert torch.equal(top, model.log_marginal(x, 3, labels))
        assert torch.all(top > full)  # a marginal of fewer pixels is likelier


def test_families_without_completion_get_no_completion_metric(digits):
    out = likelihood_metrics(make_model("vae"), digits, max_examples=10, iwae_k=2)
    assert "nll_nats" in out and not any(key.startswith("completion") for key in out)
    with pytest.raises(NotImplementedError, match="no exact image completion"):
        make_model("vae").log_likelihood_and_marginal(torch.zeros(1, 1, 8, 8), 4)


def test_completion_figure_rows_are_occluded_completions_original(digits):
    model = make_model("mixture_binary")
    x = torch.from_numpy(digits.splits["test"].x_binary[:3]).float()
    rows = completion_images(model, x, None, 4, n=5, seed=2).view(3, 7, 1, 8, 8)
    assert torch.equal(rows[:, 0, :, :4], x[:, :, :4]) and (rows[:, 0, :, 4:] == 0.5).all()
    assert torch.equal(rows[:, 1:6], model.complete(x, 4, 5, seed=2))
    assert torch.equal(rows[:, 6], x)
    png = completion_png(model, digits, seed=2, images=3, n=5)
    with Image.open(io.BytesIO(png)) as picture:
        width, height = picture.size
    assert width > height and round(width / height) == round(7 / 3)


def test_render_pictures_adds_the_completion_figure_for_completing_families(digits):
    assert "completion.png" in render_pictures(make_model("pixelrnn_row"), digits)
    assert "completion.png" in render_pictures(make_model("mixture_binary"), digits)
    vae = build_model("vae", digits.image, latent_dim=3, hidden=(16,)).eval()
    assert "completion.png" not in render_pictures(vae, digits)
