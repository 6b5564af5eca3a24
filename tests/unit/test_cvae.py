"""CVAE: labels required and used, analogies, IWAE with labels, sampling, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from digits_data import DIGITS, binary_digits

from genmodels.models import (
    build_model,
    checkpoint_bytes,
    family_class,
    model_from_checkpoint,
)
from genmodels.models.base import ImageSpec
from genmodels.models.cvae import CVAE, CVAEConfig
from genmodels.models.vae import VAE, VAEConfig


def tiny_cvae(image: ImageSpec = DIGITS, **overrides) -> CVAE:
    torch.manual_seed(0)
    cfg = dict(latent_dim=4, hidden=(32,), conv_channels=(4, 8), iwae_k=20)
    return CVAE(CVAEConfig(image=image, **{**cfg, **overrides}))


@pytest.fixture(scope="module")
def digits():
    return binary_digits()


def fit(model: CVAE, digits, steps: int) -> CVAE:
    """Adam(3e-3) on random batches of 128 digits, seeded; the model in eval mode."""
    x, y = digits
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=gen)
            opt.zero_grad()
            model.loss({"x": x[idx], "y": y[idx]})["loss"].backward()
            opt.step()
    return model.eval()


def nearest_mean_classes(samples: torch.Tensor, digits) -> torch.Tensor:
    """The class whose mean digit is nearest to each sample."""
    x, y = digits
    class_means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])
    return torch.cdist(samples.flatten(1), class_means).argmin(1)


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny MLP CVAE fit to the digits for a few hundred steps (~2 s)."""
    return fit(tiny_cvae(hidden=(64,), latent_dim=4), digits, 500)


def test_family_registry_and_contract():
    assert family_class("cvae") is CVAE and issubclass(CVAE, VAE)
    model = tiny_cvae()
    assert model.family == "cvae" and model.conditional and model.has_latent and not model.samples_on_grid
    assert set(model.noise_spec()) == {"z"} and model.noise_spec()["z"].shape == (4,)
    with pytest.raises(ValueError, match="class-conditional"):
        CVAE(CVAEConfig(image=DIGITS, conditional=False))
    with pytest.raises(ValueError, match="num_classes"):
        CVAEConfig(image=ImageSpec(height=8, width=8, num_classes=0))


def test_labels_are_required_and_validated(digits):
    model = tiny_cvae()
    x = digits[0][:4]
    with pytest.raises(ValueError, match="labels are required"):
        model.sample(4)
    with pytest.raises(ValueError, match="labels are required"):
        model.sample_from_noise({"z": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="labels are required"):
        model.encode(x)
    with pytest.raises(ValueError, match="labels are required"):
        model.analogies(x, None)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model.sample(2, labels=[3, 10])
    with pytest.raises(ValueError, match="labels must be one int or 4 ints"):
        model.elbo(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="no 'y' labels"):
        model.loss({"x": x})


@torch.no_grad()
def test_both_networks_see_the_label(digits):
    model = tiny_cvae()
    x = digits[0][:5]
    zeros, ones = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    assert not torch.allclose(model.encode(x, zeros)[0], model.encode(x, ones)[0])
    z = torch.randn(5, 4)
    assert not torch.allclose(model.decode(z, zeros), model.decode(z, ones))
    # The training loss reads batch["y"].
    torch.manual_seed(0)
    a = model.loss({"x": x, "y": zeros})["loss"]
    torch.manual_seed(0)
    b = model.loss({"x": x, "y": ones})["loss"]
    assert a != b
    # One int stands for every row.
    torch.testing.assert_close(model.decode(z, 1), model.decode(z, ones))


def test_analogies_shape_and_own_label_column_is_the_reconstruction(digits):
    model = tiny_cvae().eval()
    x, y = digits[0][:6], digits[1][:6]
    grid = model.analogies(x, y)
    assert grid.shape == (6, 10, 1, 8, 8)
    torch.testing.assert_close(grid[torch.arange(6), y], model.reconstruct(x, y), rtol=0, atol=1e-6)
    # Column c is z decoded with label c, z being the posterior mean of (x, its own label).
    mu, _ = model.encode(x, y)
    for c in (0, 7):
        torch.testing.assert_close(grid[:, c], model.decode(mu, c), rtol=0, atol=1e-6)


def test_same_seed_same_samples_and_row_independence():
    model = tiny_cvae(architecture="conv").eval()
    labels = torch.tensor([0, 3, 3, 9, 5])
    a = model.sample(5, labels=labels, seed=7)
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, model.sample(5, labels=labels, seed=7))
    torch.testing.assert_close(model.sample(3, labels=labels[2:], seed=7, start=2), a[2:], rtol=0, atol=1e-6)
    z = torch.randn(5, 4)
    out = model.sample_from_noise({"z": z}, labels)
    for i in range(5):
        other_z, other_y = torch.randn(5, 4), torch.randint(0, 10, (5,))
        other_z[i], other_y[i] = z[i], labels[i]
        torch.testing.assert_close(model.sample_from_noise({"z": other_z}, other_y)[i], out[i], rtol=0, atol=1e-6)


@torch.no_grad()
def test_iwae_with_labels(trained, digits):
    # Each image 4 times: the k=5 -> 50 gain of this small-latent model is ~0.05 nats, and
    # 4x the draws halve the standard error it is compared against.
    x, y = digits[0].repeat(4, 1, 1, 1), digits[1].repeat(4)
    torch.manual_seed(0)
    elbo = trained.elbo(x, y)
    bounds = {k: trained.iwae(x, y, k=k) for k in (1, 5, 50)}

    def significantly_above(a, b):
        d = a - b
        return float(d.mean()) > 4 * float(d.std()) / math.sqrt(len(d))

    d = bounds[1] - elbo
    assert abs(float(d.mean())) < 4 * float(d.std()) / math.sqrt(len(d))
    assert significantly_above(bounds[5], bounds[1]) and significantly_above(bounds[50], bounds[5])
    torch.manual_seed(1)
    chunked = trained.iwae(x[:20], y[:20], k=30, chunk=4)
    torch.manual_seed(1)
    torch.testing.assert_close(chunked, trained.iwae(x[:20], y[:20], k=30, chunk=30), rtol=0, atol=1e-4)
    # Telling the model the right class explains the image better than a wrong one.
    torch.manual_seed(0)
    wrong = trained.iwae(x, (y + 1) % 10, k=5)
    assert significantly_above(bounds[5], wrong)


@torch.no_grad()
def test_trained_samples_follow_their_label(trained, digits):
    labels = torch.arange(10).repeat_interleave(30)
    predicted = nearest_mean_classes(trained.sample(len(labels), labels=labels, seed=0), digits)
    # Nearest class mean classifies the real digits at 0.88; decoded samples are prototypical
    # (0.98 to 1.0 over training and sampling seeds).
    assert float((predicted == labels).float().mean()) > 0.9


def test_checkpoint_round_trip(digits):
    model = tiny_cvae(architecture="conv").eval()
    loaded = model_from_checkpoint(checkpoint_bytes(model))
    assert type(loaded) is CVAE and loaded.config == model.config and loaded.config.conditional
    labels = torch.arange(4)
    assert torch.equal(loaded.sample(4, labels=labels, seed=3), model.sample(4, labels=labels, seed=3))
    x = digits[0][:4]
    assert torch.equal(loaded.analogies(x, labels), model.analogies(x, labels))


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_optimizer_steps_decrease_loss(architecture, digits):
    model = tiny_cvae(architecture=architecture)
    batch = {"x": digits[0][:32], "y": digits[1][:32]}

    def fixed_loss() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(model.loss(batch)["loss"])

    before = fixed_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    assert fixed_loss() < before * 0.9


@pytest.mark.parametrize("preset", ["quick", "cpu", "full"])
def test_presets_build_and_run_on_fashion_mnist_shape(preset):
    from genmodels.training import preset_configs

    overrides, train_cfg = preset_configs("cvae", preset)
    model = build_model("cvae", ImageSpec(), **overrides)
    assert isinstance(model, CVAE) and model.conditional and train_cfg.epochs >= 1
    # The VAE's schedule, bf16 setting included.
    assert train_cfg == preset_configs("vae", preset)[1]
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    out = model.loss({"x": x, "y": torch.tensor([1, 8])})
    assert torch.isfinite(out["loss"])
    assert model.analogies(x, torch.tensor([1, 8])).shape == (2, 10, 1, 28, 28)


@torch.no_grad()
def test_conv_decoder_sees_the_label_at_every_stage_and_follows_it(digits):
    """The conv recipe feeds the label as feature maps into every decoder stage; trained on
    the digits, the label decides the class of what it samples."""
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(image=DIGITS, architecture="conv", conv_channels=(8, 16), hidden=(32,), latent_dim=4))
    ups = list(model.decoder.ups)
    assert len(ups) == 2 and all(up.in_channels == c + 10 for up, c in zip(ups, (16, 8)))
    fit(model, digits, 400)
    labels = torch.arange(10).repeat_interleave(30)
    predicted = nearest_mean_classes(model.sample(len(labels), labels=labels, seed=0), digits)
    assert float((predicted == labels).float().mean()) > 0.9
    # The same noise with another label is another class.
    shifted = nearest_mean_classes(model.sample(len(labels), labels=(labels + 1) % 10, seed=0), digits)
    assert float((shifted == labels).float().mean()) < 0.2


def test_class_prior_kl_iwae_sampling_and_analogies(digits):
    """A learned N(mu_y, sigma_y^2) prior per class: the closed-form KL is the exact KL, the
    IWAE bound uses it, samples come from the class's own prior, and analogies carry a style
    (its standardized position in its class's prior) to every class's prior."""
    x, y = digits[0][:6], digits[1][:6]
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(image=DIGITS, latent_dim=4, hidden=(16,), class_prior=True)).eval()
    plain = CVAE(CVAEConfig(image=DIGITS, latent_dim=4, hidden=(16,)))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prior_")})
    torch.manual_seed(1)
    # At its zero initialization the class prior is N(0, I): the same bound as the plain CVAE.
    torch.manual_seed(2)
    a = model.iwae(x, y, k=50)
    torch.manual_seed(2)
    assert torch.allclose(a, plain.eval().iwae(x, y, k=50), atol=1e-5)
    with torch.no_grad():
        model.prior_mu.normal_()
        model.prior_logvar.normal_(0.0, 0.5)
    onehot = model._onehot(y)
    mu, logvar = model.encoder(x, onehot)
    p_mu, p_logvar = model.prior(onehot)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(p_mu, torch.exp(0.5 * p_logvar))
    ).sum(-1)
    torch.testing.assert_close(model.kl(mu, logvar, onehot), exact, rtol=1e-5, atol=1e-5)
    # IWAE stays a bound that tightens with k (up to Monte-Carlo noise) and stays below the ELBO-free log 1.
    torch.manual_seed(3)
    k1 = model.iwae(x, y, k=1).mean()
    torch.manual_seed(3)
    k200 = model.iwae(x, y, k=200).mean()
    assert k200 > k1 and torch.isfinite(k200)
    noise = {"z": torch.randn(6, 4)}
    expected = model.decode(p_mu + torch.exp(0.5 * p_logvar) * noise["z"] * 0.5, y)
    torch.testing.assert_close(model.sample_from_noise(noise, y, temperature=0.5), expected)
    grid = model.analogies(x, y)
    style = (mu - p_mu) * torch.exp(-0.5 * p_logvar)
    for c in (0, 7):
        c_mu, c_logvar = model.prior(model._onehot(torch.full((6,), c)))
        torch.testing.assert_close(grid[:, c], model.decode(c_mu + torch.exp(0.5 * c_logvar) * style, torch.full((6,), c)))
    with pytest.raises(ValueError, match="class_prior"):
        VAEConfig(image=DIGITS, class_prior=True)


def test_film_and_encoder_label_maps_start_as_the_plain_recipe_and_follow_the_label(digits):
    """label_film: a per-class scale and shift of every decoder stage's channels, zero-initialized
    (the plain label-map decoder at the start); label_encoder_maps: the label as feature maps into
    every encoder stage. Trained on the digits, the label decides the class of what it samples."""
    kw = dict(image=DIGITS, architecture="conv", conv_channels=(8, 16), hidden=(32,), latent_dim=4)
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(**kw, label_film=True, label_encoder_maps=True))
    assert [film.table.shape for film in model.decoder.films] == [(10, 32), (10, 16)]
    assert [stage[0].in_channels for stage in model.encoder.stages] == [1 + 10, 8 + 10]
    plain = CVAE(CVAEConfig(**kw))
    plain.decoder.load_state_dict({k: v for k, v in model.decoder.state_dict().items() if not k.startswith("films.")})
    z, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 7, 8, 9])
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z, labels), plain.decode(z, labels), rtol=0, atol=0)
    for bad in ({"label_film": True, "architecture": "mlp"}, {"label_encoder_maps": True, "conditional": False}):
        with pytest.raises(ValueError, match="needs a conditional model with the conv architecture"):
            VAEConfig(**{**kw, **bad})
    fit(model, digits, 400)
    assert all(bool(film.table.detach().abs().max() > 0) for film in model.decoder.films)  # FiLM is trained
    labels = torch.arange(10).repeat_interleave(30)
    with torch.no_grad():
        predicted = nearest_mean_classes(model.sample(len(labels), labels=labels, seed=0), digits)
        shifted = nearest_mean_classes(model.sample(len(labels), labels=(labels + 1) % 10, seed=0), digits)
    assert float((predicted == labels).float().mean()) > 0.9
    assert float((shifted == labels).float().mean()) < 0.2  # the same noise with another label: another class
