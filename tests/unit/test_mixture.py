"""Mixture model fit by EM: exact normalization, the discretized Gaussian against
high-precision references, EM's monotonicity and additivity, recovery of known components,
sampling that matches the likelihood, and checkpoints."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import mpmath
import numpy as np
import pytest
import torch

from genmodels.models import build_model, checkpoint_bytes, model_from_checkpoint
from genmodels.models.base import ImageSpec
from genmodels.models.mixture import MixtureConfig, MixtureModel, _truncated_normal_stats
from genmodels.models.base import make_noise_tensors
from genmodels.training import TrainConfig, train

BIN_2X2 = ImageSpec(channels=1, height=2, width=2, levels=2, num_classes=3)
GREY_1X2 = ImageSpec(channels=1, height=1, width=2, levels=256, num_classes=3)


def mixture(image: ImageSpec, **overrides) -> MixtureModel:
    return MixtureModel(MixtureConfig(image=image, **{"n_components": 3, **overrides}))


def all_binary_images(image: ImageSpec) -> torch.Tensor:
    bits = list(itertools.product([0.0, 1.0], repeat=image.dims))
    return torch.tensor(bits).view(-1, *image.shape)


def all_grey_images(image: ImageSpec) -> torch.Tensor:
    levels = torch.cartesian_prod(*[torch.arange(256)] * image.dims).view(-1, *image.shape)
    return levels.float() / 255


def random_binary(n: int, image: ImageSpec, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *image.shape, generator=gen) < 0.3).float()


def random_grey(n: int, image: ImageSpec, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *image.shape), generator=gen).float() / 255


def run_em(model: MixtureModel, batch: dict, iterations: int) -> list[float]:
    """EM on fixed data; the log-likelihood of the parameters before each M-step."""
    history = []
    for _ in range(iterations):
        stats = model.em_accumulate(batch)
        history.append(float(stats["loglik_sum"]))
        model.em_update(stats)
    return history


def set_gaussian(model: MixtureModel, means, stds, weights) -> None:
    with torch.no_grad():
        model.means.copy_(torch.tensor(means, dtype=torch.float64).view_as(model.means))
        model.stds.copy_(torch.tensor(stds, dtype=torch.float64).view_as(model.stds))
        model.log_weights.copy_(torch.tensor(weights, dtype=torch.float64).log().view_as(model.log_weights))
        model.initialized.fill_(True)


# --- exact likelihood ----------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True])
def test_binary_likelihood_sums_to_one_over_all_2x2_images(conditional):
    model = mixture(BIN_2X2, conditional=conditional)
    x = random_binary(60, BIN_2X2)
    y = torch.arange(60) % 3
    model.em_initialize(x, seed=0, y=y)
    run_em(model, {"x": x, "y": y}, 3)
    images = all_binary_images(BIN_2X2)
    for label in range(3 if conditional else 1):
        labels = torch.full((16,), label) if conditional else None
        total = model.log_likelihood(images, labels).exp().sum()
        assert abs(float(total) - 1.0) < 1e-5


def test_grey_likelihood_sums_to_one_over_all_1x2_images_after_em():
    model = mixture(GREY_1X2)
    x = random_grey(80, GREY_1X2)
    model.em_initialize(x, seed=0)
    run_em(model, {"x": x}, 3)
    ll = model.log_likelihood(all_grey_images(GREY_1X2))
    assert ll.dtype == torch.float64 and ll.shape == (65536,)
    assert abs(float(torch.logsumexp(ll, 0))) < 1e-5


def test_grey_likelihood_normalizes_in_the_tails():
    # Means far outside [0, 1], near the edges, and stds from the floor to wide: every level's
    # mass, even ~400 standard deviations out, must stay finite, and the 256 masses sum to one.
    image = ImageSpec(channels=1, height=1, width=1, levels=256, num_classes=1)
    levels = torch.arange(256, dtype=torch.float32).view(256, 1, 1, 1) / 255
    for mean, std in [(-3.0, 0.01), (0.001, 0.01), (0.5, 0.02), (0.999, 0.3), (4.0, 0.05)]:
        model = mixture(image, n_components=1)
        set_gaussian(model, means=[mean], stds=[std], weights=[1.0])
        ll = model.log_likelihood(levels)
        assert torch.isfinite(ll).all(), (mean, std)
        assert abs(float(torch.logsumexp(ll, 0))) < 1e-12, (mean, std)
        if mean == -3.0:
            assert float(ll[255]) < -7e4  # (255/256 + 3) / 0.01 ~ 400 standard deviations


@pytest.mark.parametrize("mean,std", [(0.3, 0.05), (0.02, 0.01), (0.9, 0.004), (-0.5, 0.02), (1.7, 0.1)])
def test_discretized_gaussian_matches_high_precision_reference(mean, std):
    image = ImageSpec(channels=1, height=1, width=1, levels=256, num_classes=1)
    model = mixture(image, n_components=1)
    set_gaussian(model, means=[mean], stds=[std], weights=[1.0])
    levels = [0, 1, 77, 128, 230, 254, 255]
    got = model.log_likelihood(torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1) / 255)
    mpmath.mp.dps = 60
    for k, value in zip(levels, got.tolist()):
        lo = mpmath.mpf(-math.inf) if k == 0 else (mpmath.mpf(k) / 256 - mean) / std
        hi = mpmath.mpf(math.inf) if k == 255 else (mpmath.mpf(k + 1) / 256 - mean) / std
        # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): take the side where both terms are tiny, so
        # 60 digits suffice (Phi(25) = 1 - 1e-138 would need 140).
        if lo > 0:
            lo, hi = -hi, -lo
        expected = mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo))
        assert value == pytest.approx(float(expected), rel=1e-9, abs=1e-9), (k, value, expected)


def test_truncated_normal_moments_match_high_precision_reference():
    edges = [(-math.inf, -2.0), (-0.3, 0.1), (1.5, 1.6), (8.0, 8.4), (-30.2, -30.0), (3.0, math.inf)]
    lo = torch.tensor([a for a, _ in edges], dtype=torch.float64)
    hi = torch.tensor([b for _, b in edges], dtype=torch.float64)
    log_mass, mean, second = _truncated_normal_stats(lo, hi)
    mpmath.mp.dps = 60
    for i, (a, b) in enumerate(edges):
        a, b = mpmath.mpf(a), mpmath.mpf(b)
        z = mpmath.ncdf(b) - mpmath.ncdf(a)
        m1 = mpmath.quad(lambda t: t * mpmath.npdf(t), [a, b]) / z
        m2 = mpmath.quad(lambda t: t * t * mpmath.npdf(t), [a, b]) / z
        assert float(log_mass[i]) == pytest.approx(float(mpmath.log(z)), rel=1e-10)
        assert float(mean[i]) == pytest.approx(float(m1), rel=1e-8)
        assert float(second[i]) == pytest.approx(float(m2), rel=1e-8)


def test_loss_is_mean_nll_and_validation_works_without_players():
    model = mixture(BIN_2X2)
    x = random_binary(20, BIN_2X2)
    model.em_initialize(x, seed=0)
    batch = {"x": x, "y": torch.zeros(20, dtype=torch.long)}
    expected = -model.log_likelihood(x).mean()
    assert model.players() == {}
    assert float(model.loss(batch)["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(model.loss(batch)["bits_per_dim"]) == pytest.approx(float(expected) / (4 * math.log(2)), rel=1e-6)
    assert float(model.validation_loss(batch)) == pytest.approx(float(expected), rel=1e-6)


# --- EM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image,data", [(BIN_2X2, random_binary), (ImageSpec(1, 2, 2, 256, 1), random_grey)])
def test_em_loglik_never_decreases(image, data):
    model = mixture(image, n_components=4, prior_count=0.0)
    x = data(120, image, seed=1)
    model.em_initialize(x, seed=3)
    history = run_em(model, {"x": x, "y": torch.zeros(120, dtype=torch.long)}, 15)
    steps = np.diff(history)
    assert np.all(steps >= -1e-9 * abs(history[0])), history
    assert history[-1] > history[0] + 1e-3  # it actually moved


def test_map_em_never_decreases_the_penalized_objective():
    # With prior_count a > 0, EM maximizes log-likelihood + log Dirichlet(a+1) + log Beta(a+1, a+1).
    a = 2.0
    model = mixture(BIN_2X2, n_components=4, prior_count=a)
    x = random_binary(40, BIN_2X2, seed=2)
    model.em_initialize(x, seed=0)
    objective = []
    for _ in range(12):
        stats = model.em_accumulate({"x": x})
        log_prior = a * model.log_weights.sum() + a * (model.probs.log() + (-model.probs).log1p()).sum()
        objective.append(float(stats["loglik_sum"] + log_prior))
        model.em_update(stats)
    assert np.all(np.diff(objective) >= -1e-9 * abs(objective[0])), objective


@pytest.mark.parametrize("image,data,conditional", [
    (BIN_2X2, random_binary, True),
    (GREY_1X2, random_grey, False),
    (GREY_1X2, random_grey, True),
])
def test_em_statistics_add_up_across_batches(image, data, conditional):
    model = mixture(image, conditional=conditional)
    x, y = data(50, image, seed=4), torch.arange(50) % 3
    model.em_initialize(x, seed=0, y=y)
    whole = model.em_accumulate({"x": x, "y": y})
    first = model.em_accumulate({"x": x[:17], "y": y[:17]})
    second = model.em_accumulate({"x": x[17:], "y": y[17:]})
    assert set(whole) >= {"loglik_sum", "count", "resp_sum", "sum_x"}
    assert float(whole["count"]) == 50
    for key in whole:
        assert whole[key].dtype == torch.float64
        torch.testing.assert_close(first[key] + second[key], whole[key], rtol=1e-12, atol=1e-10)


def test_em_recovers_well_separated_bernoulli_components():
    image = ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=1)
    gen = torch.Generator().manual_seed(0)
    protos = (torch.rand(3, 16, generator=gen) < 0.5).double()
    protos[0], protos[1] = 0.0, 1.0  # make sure the prototypes are far apart
    true_p = protos * 0.9 + 0.05
    true_w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    comp = torch.multinomial(true_w, 3000, replacement=True, generator=gen)
    x = (torch.rand(3000, 16, generator=gen, dtype=torch.float64) < true_p[comp]).float().view(-1, 1, 4, 4)
    model = mixture(image)
    model.em_initialize(x, seed=0)
    run_em(model, {"x": x}, 20)
    probs = model.probs[0]
    match = torch.cdist(true_p, probs).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    assert (probs[match] - true_p).abs().max() < 0.05
    assert (model.log_weights[0, match].exp() - true_w).abs().max() < 0.03


def test_em_recovers_well_separated_gaussian_components():
    image = ImageSpec(channels=1, height=1, width=2, levels=256, num_classes=1)
    gen = torch.Generator().manual_seed(1)
    true_mu = torch.tensor([[0.2, 0.7], [0.5, 0.2], [0.8, 0.8]], dtype=torch.float64)
    true_sd = torch.tensor([[0.03, 0.05], [0.04, 0.02], [0.05, 0.03]], dtype=torch.float64)
    comp = torch.randint(0, 3, (4000,), generator=gen)
    v = true_mu[comp] + true_sd[comp] * torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    x = (torch.floor(v * 256).clamp(0, 255) / 255).float().view(-1, 1, 1, 2)
    model = mixture(image)
    model.em_initialize(x, seed=0)
    run_em(model, {"x": x}, 25)
    means, stds = model.means[0], model.stds[0]
    match = torch.cdist(true_mu, means).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    assert (means[match] - true_mu).abs().max() < 0.005
    assert (stds[match] - true_sd).abs().max() < 0.005


def test_em_update_leaves_a_class_without_data_unchanged():
    model = mixture(BIN_2X2, conditional=True)
    x, y = random_binary(60, BIN_2X2), torch.arange(60) % 3
    model.em_initialize(x, seed=0, y=y)
    weights, probs = model.log_weights.clone(), model.probs.clone()
    seen = y != 2
    model.em_update(model.em_accumulate({"x": x[seen], "y": y[seen]}))
    assert torch.equal(model.log_weights[2], weights[2]) and torch.equal(model.probs[2], probs[2])
    assert not torch.equal(model.probs[0], probs[0])


def test_em_initialize_is_deterministic_per_seed():
    x = random_grey(200, GREY_1X2)
    a, b, c = mixture(GREY_1X2), mixture(GREY_1X2), mixture(GREY_1X2)
    a.em_initialize(x, seed=5)
    b.em_initialize(x, seed=5)
    c.em_initialize(x, seed=6)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.means, c.means)


def test_random_init_and_fewer_images_than_components_stay_finite():
    x = random_binary(2, BIN_2X2)  # 2 images, 5 components: 3 start without members
    for init in ("kmeans++", "random"):
        model = mixture(BIN_2X2, n_components=5, init=init)
        model.em_initialize(x, seed=0)
        run_em(model, {"x": x}, 2)
        assert torch.isfinite(model.log_likelihood(all_binary_images(BIN_2X2))).all()


# --- sampling ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_grey():
    model = mixture(GREY_1X2, conditional=True)
    x, y = random_grey(90, GREY_1X2, seed=7), torch.arange(90) % 3
    model.em_initialize(x, seed=0, y=y)
    run_em(model, {"x": x, "y": y}, 3)
    return model.eval()


@pytest.fixture(scope="module")
def fitted_binary():
    model = mixture(BIN_2X2)
    x = random_binary(90, BIN_2X2, seed=8)
    model.em_initialize(x, seed=0)
    run_em(model, {"x": x}, 3)
    return model.eval()


def test_samples_are_on_the_grid_and_reproducible(fitted_grey, fitted_binary):
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    grey = fitted_grey.sample(6, labels=labels, seed=11)
    assert grey.shape == (6, 1, 1, 2) and grey.dtype == torch.float32
    assert torch.equal(grey * 255, torch.round(grey * 255)) and grey.min() >= 0 and grey.max() <= 1
    assert torch.equal(grey, fitted_grey.sample(6, labels=labels, seed=11))
    binary = fitted_binary.sample(64, seed=3)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(binary, fitted_binary.sample(64, seed=3))
    assert not torch.equal(binary, fitted_binary.sample(64, seed=4))


def test_sampling_is_row_independent(fitted_grey):
    labels = torch.tensor([2, 0, 1, 1, 2])
    noise = make_noise_tensors(fitted_grey.noise_spec(), seed=9, count=5)
    together = fitted_grey.sample_from_noise(noise, labels)
    for i in range(5):
        alone = fitted_grey.sample_from_noise({k: v[i : i + 1] for k, v in noise.items()}, labels[i : i + 1])
        assert torch.equal(alone[0], together[i])
    # Rows 3..4 asked for on their own (start=3) are rows 3..4 of the batch.
    assert torch.equal(fitted_grey.sample(2, labels=labels[3:], seed=9, start=3), together[3:])


def test_sample_frequencies_match_the_likelihood(fitted_binary):
    n = 20000
    samples = fitted_binary.sample(n, seed=0).view(n, 4)
    codes = (samples * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(1).long()
    freq = torch.bincount(codes, minlength=16).double() / n
    images = all_binary_images(BIN_2X2)
    image_codes = (images.view(16, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(1).long()
    p = torch.zeros(16, dtype=torch.float64)
    p[image_codes] = fitted_binary.log_likelihood(images).exp()
    # Each frequency within 5 binomial standard errors of its probability.
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4), (freq, p)


def test_grey_sample_frequencies_match_the_likelihood():
    image = ImageSpec(channels=1, height=1, width=1, levels=256, num_classes=1)
    model = mixture(image, n_components=2)
    set_gaussian(model, means=[0.1, 0.6], stds=[0.05, 0.1], weights=[0.3, 0.7])
    n = 20000
    levels = torch.round(model.sample(n, seed=1).view(n) * 255).long()
    freq = torch.bincount(levels, minlength=256).double() / n
    p = model.log_likelihood(torch.arange(256, dtype=torch.float32).view(256, 1, 1, 1) / 255).exp()
    assert 0.5 * float((freq - p).abs().sum()) < 0.04  # total variation; ~0.02 from sampling error alone
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3)


def test_low_temperature_gives_the_likeliest_components_mode(fitted_binary):
    samples = fitted_binary.sample(32, seed=0, temperature=1e-3)
    best = int(fitted_binary.log_weights[0].argmax())
    mode = (fitted_binary.probs[0, best] > 0.5).float().view(1, 2, 2)
    assert torch.equal(samples, mode.expand(32, 1, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        fitted_binary.sample(2, temperature=0.0)


def test_label_errors(fitted_grey, fitted_binary):
    with pytest.raises(ValueError, match="unconditional"):
        fitted_binary.sample(2, labels=[0, 1])
    with pytest.raises(ValueError, match="labels are required"):
        fitted_grey.sample(2)
    with pytest.raises(ValueError, match="needs class labels"):
        fitted_grey.log_likelihood(random_grey(2, GREY_1X2))
    with pytest.raises(ValueError, match="em_initialize needs class labels"):
        mixture(GREY_1X2, conditional=True).em_initialize(random_grey(4, GREY_1X2), seed=0)
    with pytest.raises(ValueError, match="class 2 has no images"):
        mixture(GREY_1X2, conditional=True).em_initialize(random_grey(4, GREY_1X2), 0, y=torch.tensor([0, 1, 0, 1]))


def test_misuse_is_reported_clearly():
    model = mixture(BIN_2X2)
    with pytest.raises(RuntimeError, match="em_initialize"):
        model.em_accumulate({"x": random_binary(2, BIN_2X2)})
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 2, 2\]"):
        model.log_likelihood(torch.zeros(2, 1, 3, 3))
    with pytest.raises(KeyError, match="sum_x"):
        model.em_update({"resp_sum": torch.zeros(1, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="n_components"):
        MixtureConfig(image=BIN_2X2, n_components=0)
    with pytest.raises(ValueError, match="init"):
        MixtureConfig(image=BIN_2X2, init="kmeans")


# --- checkpoints and presets ----------------------------------------------------------------------
def test_checkpoint_round_trip(fitted_grey):
    restored = model_from_checkpoint(checkpoint_bytes(fitted_grey))
    assert isinstance(restored, MixtureModel) and restored.config == fitted_grey.config
    labels = torch.tensor([0, 1, 2, 0])
    assert torch.equal(restored.sample(4, labels=labels, seed=2), fitted_grey.sample(4, labels=labels, seed=2))
    x = random_grey(10, GREY_1X2, seed=3)
    y = torch.arange(10) % 3
    assert torch.equal(restored.log_likelihood(x, y), fitted_grey.log_likelihood(x, y))
    assert bool(restored.initialized)


def test_loading_new_parameters_refreshes_the_cached_tables(fitted_grey):
    other = mixture(GREY_1X2, conditional=True)
    x, y = random_grey(30, GREY_1X2, seed=5), torch.arange(30) % 3
    other.em_initialize(x, seed=1, y=y)
    before = other.log_likelihood(x, y)  # builds and caches other's tables
    other.load_state_dict(fitted_grey.state_dict())
    assert not torch.equal(before, other.log_likelihood(x, y))
    assert torch.equal(other.log_likelihood(x, y), fitted_grey.log_likelihood(x, y))


@pytest.mark.parametrize("preset", ["quick", "cpu", "full"])
def test_presets_build(preset):
    spec = MixtureModel.presets[preset]
    model = build_model("mixture", ImageSpec(1, 28, 28, 256, 10), **spec["model"])
    assert isinstance(model, MixtureModel) and model.fit_method == "em"
    TrainConfig.from_dict(spec["train"])


@pytest.mark.parametrize("levels, conditional", [(2, False), (256, False), (2, True)])
def test_fits_through_the_training_loop(levels, conditional):
    """The real loop: em_initialize, per-epoch E-step sums, M-step, validation, best model."""
    rng = np.random.default_rng(0)
    image = ImageSpec(channels=1, height=3, width=3, levels=levels, num_classes=2)
    protos = rng.integers(0, 256, size=(2, 1, 3, 3))
    x = np.clip(protos[rng.integers(0, 2, 200)] + rng.integers(-30, 30, (200, 1, 3, 3)), 0, 255).astype(np.uint8)
    y = rng.integers(0, 2, 200).astype(np.int64)
    val_binary = (rng.random((50, 1, 3, 3)) < x[:50] / 255).astype(np.uint8)
    splits = {"train": SimpleNamespace(x=x[50:], y=y[50:], x_binary=None),
              "val": SimpleNamespace(x=x[:50], y=y[:50], x_binary=val_binary)}
    snapshot = SimpleNamespace(image=image, splits=splits, dataset="tiny", hash="0" * 64)
    model = build_model("mixture", image, n_components=2, prior_count=0.0, conditional=conditional)
    result = train(model, snapshot, TrainConfig(epochs=4, batch_size=32, early_stopping_patience=None))
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert result.best_val_loss is not None and math.isfinite(result.best_val_loss)
    if conditional:  # the loop hands labels to em_initialize: every class gets its own mixture
        assert model.sample(4, labels=[0, 1, 0, 1], seed=0).shape == (4, 1, 3, 3)
    if levels == 256:  # fixed data (binary is re-binarized every epoch): ML EM never gets worse
        assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:])), losses
