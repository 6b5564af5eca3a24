"""Image completion (PixelRNN after a raster prefix, mixture given any mask): exact on a 2x2
binary space against distributions enumerated from log_likelihood; known pixels untouched;
cached == naive; same seed same bytes; batching invariance; clear refusals."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from genmodels.models import build_model
from genmodels.models.base import ImageSpec
from genmodels.models.mixture import MixtureConfig, MixtureModel
from genmodels.models.base import make_noise_tensors
from test_pixelrnn import make_model as make_pixelrnn
from tiny_models import make_model as make_tiny

KINDS = ("row", "diagonal")
SAMPLES = 4000
ALL_2x2 = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 1, 2, 2)


def make_mixture_2x2(conditional: bool = False) -> MixtureModel:
    image = ImageSpec(channels=1, height=2, width=2, levels=2, num_classes=2)
    model = MixtureModel(MixtureConfig(image=image, n_components=3, conditional=conditional))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # Well-separated components, so that the posterior given the known pixels matters.
        probs = torch.tensor([[0.9, 0.8, 0.9, 0.85], [0.1, 0.2, 0.05, 0.1], [0.9, 0.15, 0.1, 0.8]])
        model.probs.copy_(torch.stack([probs, probs.flip(0)])[: model.groups].double())
        model.log_weights.copy_(torch.log_softmax(torch.randn(model.log_weights.shape, generator=gen,
                                                              dtype=torch.float64), dim=1))
        model.initialized.fill_(True)
    return model.eval()


def make_pixelrnn_2x2(kind: str, conditional: bool = False) -> torch.nn.Module:
    """A 2x2 PixelRNN whose pixels depend strongly on each other: freshly initialized weights
    give a nearly independent model, against which a test would not tell a conditional from
    a marginal. Scaling the weights (found by enumeration) makes |p(bottom | top) - p(bottom)|
    reach ~0.2 (row) / ~0.14 (diagonal) with every image still likely enough to be sampled."""
    model = make_pixelrnn(kind, height=2, width=2, conditional=conditional, seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_({"row": 4.0, "diagonal": 2.0}[kind])
    return model


def exact_conditional(model, x: torch.Tensor, known: torch.Tensor, labels=None) -> torch.Tensor:
    """p(image | the pixels of x where known) over the 16 binary 2x2 images, from log_likelihood."""
    agrees = (ALL_2x2[:, 0][:, known] == x[0][known]).all(dim=1)
    lab = None if labels is None else torch.full((16,), int(labels))
    with torch.no_grad():
        ll = model.log_likelihood(ALL_2x2, lab).double()
    ll = torch.where(agrees, ll, torch.full_like(ll, -math.inf))
    return torch.softmax(ll, dim=0)


def empirical(completions: torch.Tensor) -> torch.Tensor:
    """Frequencies of the 16 images among completions [n, 1, 2, 2]."""
    index = (completions.flatten(1) * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(1).long()
    return torch.bincount(index, minlength=16).double() / completions.shape[0]


def assert_matches(freq: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    # 4.5 binomial standard deviations per cell (deterministic seeds; tight enough that the
    # wrong distributions in test_exactness_tests_can_fail fail it).
    tol = 4.5 * torch.sqrt(exact * (1 - exact) / SAMPLES) + 2.0 / SAMPLES
    bad = (freq - exact).abs() > tol
    assert not bad.any(), f"{what}: empirical {freq[bad].tolist()} vs exact {exact[bad].tolist()}"


def prefix_mask(p: int) -> torch.Tensor:
    return (torch.arange(4) < p).view(2, 2)


# --- exactness on 2x2 binary images -----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional", [False, True])
def test_pixelrnn_completion_after_every_raster_prefix_is_exact(kind, conditional):
    model = make_pixelrnn_2x2(kind, conditional)
    label = 2 if conditional else None
    noise = make_noise_tensors(model.noise_spec(), 11, SAMPLES)
    for p in range(4):
        # One image per distinct prefix, completed in one batch.
        xs = ALL_2x2[:: 2 ** (4 - p)]
        tiled = {"u": noise["u"].repeat(xs.shape[0], 1, 1, 1)}
        labels = None if label is None else torch.full((xs.shape[0],), label)
        out = model.complete_prefix_cached(xs, p, tiled, labels)
        for b in range(xs.shape[0]):
            exact = exact_conditional(model, xs[b], prefix_mask(p), label)
            assert_matches(empirical(out[b]), exact, f"{kind} prefix {p} image {b}")


@pytest.mark.parametrize("kind", KINDS)
def test_pixelrnn_complete_known_rows_is_exact(kind):
    model = make_pixelrnn_2x2(kind)
    for x in ALL_2x2[::4]:  # the four first rows
        out = model.complete(x, 1, SAMPLES, seed=4)
        assert_matches(empirical(out), exact_conditional(model, x, prefix_mask(2)), f"{kind} row 0 = {x[0, 0]}")


@pytest.mark.parametrize("conditional", [False, True])
def test_mixture_completion_for_every_mask_is_exact(conditional):
    model = make_mixture_2x2(conditional)
    label = 1 if conditional else None
    for bits in itertools.product([False, True], repeat=4):
        mask = torch.tensor(bits).view(2, 2)
        xs = ALL_2x2[[0, 6, 9, 15]]  # images differing in every pixel somewhere
        out = model.complete(xs, mask, SAMPLES, seed=5, labels=label)
        for b in range(xs.shape[0]):
            exact = exact_conditional(model, xs[b], mask, label)
            assert_matches(empirical(out[b]), exact, f"mask {bits} image {b}")


def test_exactness_tests_can_fail():
    """The tolerance tells the right conditional from the obvious wrong ones."""
    model = make_mixture_2x2()
    x, mask = ALL_2x2[6], prefix_mask(2)
    out = model.complete(x, mask, SAMPLES, seed=5)
    # Prior instead of posterior over components: same unknown pixels' marginal, wrong answer.
    prior = model.sample(SAMPLES, seed=5)
    prior[:, :, mask] = x[:, mask]
    with pytest.raises(AssertionError):
        assert_matches(empirical(prior), exact_conditional(model, x, mask), "prior")
    assert_matches(empirical(out), exact_conditional(model, x, mask), "posterior")
    rnn = make_pixelrnn_2x2("row")
    with pytest.raises(AssertionError):  # unconditional samples, prefix pasted in
        fake = rnn.sample(SAMPLES, seed=3)
        fake[:, :, 0] = x[:, 0]
        assert_matches(empirical(fake), exact_conditional(rnn, x, mask), "pasted")


# --- invariants ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 256)])
def test_pixelrnn_cached_completion_equals_naive_for_every_prefix(kind, channels, levels):
    model = make_pixelrnn(kind, channels=channels, height=3, width=3, levels=levels, conditional=True)
    x = model.sample(2, labels=[0, 1], seed=8)
    noise = make_noise_tensors(model.noise_spec(), 9, 6)  # n = 3 per image
    labels = torch.tensor([0, 1])
    for p in range(10):
        cached = model.complete_prefix_cached(x, p, noise, labels)
        assert torch.equal(cached, model.complete_prefix_naive(x, p, noise, labels)), p
        flat = cached.flatten(3)
        assert torch.equal(flat[..., :p], x.flatten(2)[:, None, :, :p].expand(-1, 3, -1, -1))


@pytest.mark.parametrize("kind", KINDS)
def test_pixelrnn_completion_from_no_known_pixel_is_sampling(kind):
    model = make_pixelrnn(kind, height=3, width=4)
    noise = make_noise_tensors(model.noise_spec(), 2, 5)
    x = torch.ones(1, 1, 3, 4)
    assert torch.equal(model.complete_prefix_cached(x, 0, noise)[0], model.sample_cached(noise))


@pytest.mark.parametrize("case", ["pixelrnn_row", "pixelrnn_diagonal", "mixture_binary", "mixture_8bit"])
def test_known_pixels_kept_same_seed_same_bytes_whatever_the_batching(case):
    model = make_tiny(case)
    labels = [0, 2, 1] if model.conditional else None
    x = model.sample(3, labels=labels, seed=1)
    knowns = [4] + ([torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.4]
                    if model.completes_any_mask else [])
    for known in knowns:
        mask = model.completion_mask(known)
        out = model.complete(x, known, 4, seed=7, labels=labels)
        assert out.shape == (3, 4, *model.image.shape)
        assert torch.equal(out[..., mask], x[:, None][..., mask].expand(-1, 4, -1, -1))
        assert not torch.equal(out[:, 0], out[:, 1])  # the unknown pixels are drawn
        assert torch.equal(out, model.complete(x, known, 4, seed=7, labels=labels))
        assert out.numpy().tobytes() == model.complete(x, known, 4, seed=7, labels=labels).numpy().tobytes()
        assert not torch.equal(out, model.complete(x, known, 4, seed=8, labels=labels))
        # One image alone, fewer completions, a later start: the same completions.
        one = model.complete(x[1], known, 2, seed=7, labels=None if labels is None else labels[1])
        assert torch.equal(one, out[1, :2])
        later = model.complete(x[2:], known, 2, seed=7, labels=None if labels is None else labels[2:], start=2)
        assert torch.equal(later[0], out[2, 2:])


def test_completion_rounds_known_pixels_to_the_grid():
    model = make_tiny("mixture_binary")
    x = torch.full((1, 8, 8), 0.7)
    out = model.complete(x, 3, 2, seed=0)
    assert torch.equal(out[:, :, :3], torch.ones(2, 1, 3, 8))


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["vae", "cvae", "gan"])
def test_families_without_exact_completion_say_so(case):
    model = make_tiny(case)
    family = model.family
    with pytest.raises(NotImplementedError, match=f"the {family} family has no exact image completion"):
        model.complete(torch.zeros(1, 8, 8), 4, 2)


def test_bad_completion_requests_are_refused():
    rnn, mix = make_tiny("pixelrnn_row"), make_tiny("mixture_binary")
    x = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="known rows only"):
        rnn.complete(x, torch.ones(8, 8, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match=r"known rows must be in \[0, 8\]"):
        mix.complete(x, 9, 2)
    with pytest.raises(ValueError, match=r"bool \[8, 8\]"):
        mix.complete(x, torch.ones(4, 8, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        rnn.complete(x, 4, 0)
    with pytest.raises(ValueError, match="expected an image"):
        mix.complete(torch.zeros(2, 8), 4, 2)
    with pytest.raises(ValueError, match=r"temperature must be in \[0.001, 100\]"):
        mix.complete(x, 4, 2, temperature=0)
    with pytest.raises(ValueError, match="unconditional"):
        mix.complete(x, 4, 2, labels=1)


def test_every_family_declares_its_completion():
    assert {f: build_model(f, ImageSpec(height=8, width=8), **({"hidden_channels": 4, "head_hidden": 4}
                                                                 if f == "pixelrnn" else {})).can_complete
            for f in ("mixture", "pixelrnn", "vae", "cvae", "gan")} == {
        "mixture": True, "pixelrnn": True, "vae": False, "cvae": False, "gan": False}
