"""The latent mixture a VAE/CVAE samples from after training: EM that recovers a known mixture,
a density that normalizes, components drawn with their weights, the unfitted mixture equal to
the prior, and a fit that training makes once, deterministically."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from digits_data import DIGITS, binary_digits
from torch import distributions as D

from genmodels.models import build_model
from genmodels.models import latent_mixture
from genmodels.models.base import ImageSpec
from genmodels.models.latent_mixture import fit_gaussian_mixture, mixture_draw, mixture_log_prob, points_per_component
from genmodels.evaluation.pictures import interpolate
from genmodels.models.base import noise_tensors
from genmodels.noise import interpolation_noise, make_noise
from genmodels.training import LocalContext, TrainConfig, train

IMAGE = ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=3)


def known_mixture(n: int = 6000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of 0.3 N((-2, 0), diag(0.25, 1)) + 0.7 N((2, 1), [[1, 0.8], [0.8, 1]]), and the
    true component of each."""
    gen = torch.Generator().manual_seed(seed)
    which = (torch.rand(n, generator=gen) >= 0.3).long()
    chol = torch.stack([torch.diag(torch.tensor([0.5, 1.0])), torch.linalg.cholesky(torch.tensor([[1.0, 0.8], [0.8, 1.0]]))])
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    eps = torch.randn(n, 2, generator=gen)
    return means[which] + (chol[which] @ eps.unsqueeze(-1)).squeeze(-1), which


def test_em_recovers_a_known_mixture():
    x, _ = known_mixture()
    fit = fit_gaussian_mixture(x, 2, seed=0)
    order = torch.argsort(fit.means[:, 0])
    assert torch.allclose(fit.weights[order], torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.02)
    assert torch.allclose(fit.means[order], torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64), atol=0.08)
    cov = fit.scale_tril @ fit.scale_tril.transpose(1, 2)
    want = torch.tensor([[[0.25, 0.0], [0.0, 1.0]], [[1.0, 0.8], [0.8, 1.0]]], dtype=torch.float64)
    assert torch.allclose(cov[order], want, atol=0.08)


def test_em_is_deterministic_for_a_seed_and_fits_no_more_components_than_the_points_support():
    x, _ = known_mixture(200)
    a, b = fit_gaussian_mixture(x, 5, seed=3), fit_gaussian_mixture(x, 5, seed=3)
    assert all(torch.equal(p, q) for p, q in zip((a.weights, a.means, a.scale_tril), (b.weights, b.means, b.scale_tril)))
    assert points_per_component(2) == 6  # weight, 2 means, 3 covariance entries
    assert len(fit_gaussian_mixture(x[:30], 8, seed=0).weights) == 5
    few = fit_gaussian_mixture(x[:3], 8, seed=0)
    assert len(few.weights) == 1 and torch.isfinite(few.scale_tril).all()
    with pytest.raises(ValueError, match="components must be >= 1"):
        fit_gaussian_mixture(x, 0)
    with pytest.raises(ValueError, match=r"needs x \[N >= 2, D\]"):
        fit_gaussian_mixture(x[:1], 2)


def test_mixture_density_is_torch_distributions_and_normalizes():
    x, _ = known_mixture(3000)
    fit = fit_gaussian_mixture(x, 3, seed=1)
    reference = D.MixtureSameFamily(D.Categorical(probs=fit.weights),
                                    D.MultivariateNormal(fit.means, scale_tril=fit.scale_tril))
    points = torch.randn(50, 2, dtype=torch.float64) * 3
    assert torch.allclose(mixture_log_prob(points, fit.weights, fit.means, fit.scale_tril), reference.log_prob(points),
                          atol=1e-9)
    # Riemann sum over a grid that holds all but a sliver of the mass.
    step = 0.05
    axis = torch.arange(-9.0, 9.0, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    total = torch.exp(mixture_log_prob(grid, fit.weights, fit.means, fit.scale_tril)).sum() * step**2
    assert abs(float(total) - 1.0) < 1e-3


def test_the_chunked_e_and_m_steps_equal_their_definitions_across_chunk_boundaries():
    # More rows than two chunks and a ragged last one: every row lands in exactly one chunk.
    n = 2 * latent_mixture._ROWS_PER_CHUNK + 7
    x, _ = known_mixture(n, seed=4)
    x = x.double()
    fit = fit_gaussian_mixture(x, 3, seed=2)
    reference = D.MultivariateNormal(fit.means, scale_tril=fit.scale_tril).log_prob(x.unsqueeze(1))  # [N, M]
    component = latent_mixture._component_log_probs(x, fit.means, fit.scale_tril)
    assert component.shape == (n, 3) and torch.allclose(component, reference, atol=1e-9)
    resp = torch.softmax(component + torch.log(fit.weights), dim=1)
    covariances = latent_mixture._weighted_covariances(x, resp, fit.means)
    for m in range(3):
        diff = x - fit.means[m]
        assert torch.allclose(covariances[m], (resp[:, m : m + 1] * diff).T @ diff, rtol=1e-10, atol=1e-9)


def test_draws_pick_each_component_over_its_weights_share_of_the_uniform():
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    means = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]])
    tril = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]]).expand(1, 3, 2, 2)
    u = ((torch.arange(1000) + 0.5) / 1000).reshape(-1, 1)  # midpoints: no row on a CDF boundary
    eps = torch.randn(1000, 2)
    z = mixture_draw(eps, u, weights.expand(1000, 3), means.expand(1000, 3, 2), tril.expand(1000, 3, 2, 2))
    picked = torch.searchsorted(torch.tensor([0.2, 0.7, 1.0]), u.flatten(), right=True)
    assert torch.allclose(z, means[0, picked] + eps @ tril[0, 0].T, atol=1e-5)
    assert torch.equal(torch.bincount(picked, minlength=3), torch.tensor([200, 500, 300]))


def vae_pair(family: str, **extra):
    """(with a 3-component latent mixture, without), the same weights."""
    kw = {"latent_dim": 2, "hidden": (8,), **extra}
    torch.manual_seed(0)
    mixed = build_model(family, IMAGE, latent_mixture=3, **kw).eval()
    plain = build_model(family, IMAGE, **kw).eval()
    plain.load_state_dict({k: v for k, v in mixed.state_dict().items() if not k.startswith("mixture_")})
    if getattr(mixed.config, "class_prior", False):
        with torch.no_grad():  # zero-initialized class priors would all be N(0, I)
            for model in (mixed, plain):
                model.prior_mu.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0], [-2.0, 0.5]]))
                model.prior_logvar.copy_(torch.tensor([[0.2, -0.4], [0.0, 0.3], [-0.5, 0.1]]))
    return mixed, plain


def training_batches(n: int = 90, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, *IMAGE.shape, generator=gen) > 0.5).float()
    y = torch.arange(n) % IMAGE.num_classes
    return [{"x": x[i : i + 30], "y": y[i : i + 30]} for i in range(0, n, 30)]


@pytest.mark.parametrize("family,extra", [("vae", {}), ("cvae", {"class_prior": True})])
def test_an_unfitted_mixture_is_exactly_the_prior(family, extra):
    mixed, plain = vae_pair(family, **extra)
    labels = [0, 1, 2, 1] if mixed.conditional else None
    assert torch.equal(mixed.sample(4, labels=labels, seed=7, temperature=0.8),
                       plain.sample(4, labels=labels, seed=7, temperature=0.8))
    x = training_batches()[0]["x"][:4]
    torch.manual_seed(1)
    with_mixture = mixed.log_likelihood(x, labels, k=20)
    torch.manual_seed(1)
    assert torch.allclose(with_mixture, plain.log_likelihood(x, labels, k=20), atol=1e-4)
    # The seed's z noise is the one the prior sampler draws; the component comes after it.
    assert sorted(mixed.noise_spec()) == ["z", "z_component"] and sorted(plain.noise_spec()) == ["z"]
    assert np.array_equal(make_noise(mixed.noise_spec(), 7, 4)["z"], make_noise(plain.noise_spec(), 7, 4)["z"])


@pytest.mark.parametrize("family,extra", [("vae", {}), ("cvae", {"class_prior": True})])
def test_the_fit_is_deterministic_and_the_likelihood_is_of_the_mixture_prior(family, extra):
    mixed, _ = vae_pair(family, **extra)
    twin, _ = vae_pair(family, **extra)
    before = mixed.sample(6, labels=[0, 1, 2] * 2 if mixed.conditional else None, seed=2)
    mixed.after_training(training_batches(), seed=5)
    twin.after_training(training_batches(), seed=5)
    for key, value in mixed.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    assert not torch.allclose(mixed.mixture_weights, torch.full_like(mixed.mixture_weights, 1 / 3))
    assert not torch.allclose(before, mixed.sample(6, labels=[0, 1, 2] * 2 if mixed.conditional else None, seed=2))
    # log p(z|y) of the importance weights: the class's mixture in the prior's standardized
    # coordinates, with the change of variables' Jacobian (checked against torch.distributions).
    z = torch.randn(3, 5, 2)
    labels = torch.tensor([2, 0, 2]) if mixed.conditional else None
    onehot = mixed._onehot(labels)
    prior = mixed.prior(onehot)
    got = mixed._log_prior(z, prior, labels) - 0.5 * 2 * math.log(2 * math.pi)
    for row in range(3):
        g = 0 if labels is None else int(labels[row])
        mixture = D.MixtureSameFamily(D.Categorical(probs=mixed.mixture_weights[g]),
                                      D.MultivariateNormal(mixed.mixture_means[g], scale_tril=mixed.mixture_scale_tril[g]))
        if prior is None:
            want = mixture.log_prob(z[row])
        else:
            sigma = torch.exp(0.5 * prior[1][row])
            want = mixture.log_prob((z[row] - prior[0][row]) / sigma) - torch.log(sigma).sum()
        assert torch.allclose(got[row], want, atol=1e-4)


@pytest.mark.parametrize("family,extra", [("vae", {}), ("cvae", {"class_prior": True})])
def test_the_reported_elbo_is_of_the_mixture_prior_the_nll_is_of(family, extra):
    """With a fitted mixture, elbo_nats bounds the likelihood of the model whose NLL is reported:
    the mean of the IWAE's own log-weights, so per image it can never exceed the IWAE bound; the
    closed-form KL against N(0, I) (what training optimizes) is another model's bound."""
    from genmodels.evaluation.likelihood import likelihood_metrics

    mixed, plain = vae_pair(family, **extra)
    mixed.after_training(training_batches(), seed=5)
    snapshot = tiny_snapshot()
    snapshot.splits["test"] = snapshot.splits["val"]
    got = likelihood_metrics(mixed, snapshot, iwae_k=40, seed=3)
    from genmodels.data.loader import model_input
    from genmodels.evaluation._common import seeded_torch
    from genmodels.evaluation.likelihood import batch_seed

    x = model_input(snapshot.splits["test"], IMAGE)
    labels = torch.as_tensor(snapshot.splits["test"].y) if mixed.conditional else None

    with torch.no_grad(), seeded_torch(batch_seed(3, 0)):
        iwae, mean_log_w = mixed.iwae(x, labels, k=40, with_elbo=True)
    assert (mean_log_w <= iwae + 1e-5).all()
    assert got["elbo_nats"] == pytest.approx(float(mean_log_w.double().mean()), abs=1e-4)
    assert got["iwae_k40_nats"] == pytest.approx(float(iwae.double().mean()), abs=1e-4)
    assert got["elbo_nats"] <= got["iwae_k40_nats"]
    with torch.no_grad():  # the Gaussian prior's closed-form ELBO differs: it is not this model's
        torch.manual_seed(0)
        closed_form = float(mixed.elbo(x, labels).double().mean())
    assert abs(closed_form - got["elbo_nats"]) > 0.05
    plain_got = likelihood_metrics(plain, snapshot, iwae_k=40, seed=3)  # no mixture: the closed form, as before
    with torch.no_grad(), seeded_torch(batch_seed(3, 0)):
        plain.iwae(x, labels, k=40)
        assert plain_got["elbo_nats"] == pytest.approx(float(plain.elbo(x, labels).double().mean()), abs=1e-4)


def test_a_conditional_mixture_is_fit_per_class_and_samples_its_own_class_region():
    mixed, _ = vae_pair("cvae", class_prior=True)
    # Class 1's images are all "on" and its posteriors sit apart from the others'.
    batches = training_batches()
    for batch in batches:
        batch["x"][batch["y"] == 1] = 1.0
    mixed.after_training(batches, seed=0)
    assert not torch.allclose(mixed.mixture_means[1], mixed.mixture_means[0])
    with pytest.raises(ValueError, match="class 2 needs >= 2 training images"):
        lonely = [{"x": b["x"][b["y"] < 2], "y": b["y"][b["y"] < 2]} for b in batches]
        vae_pair("cvae", class_prior=True)[0].after_training(lonely, seed=0)


def test_interpolation_noise_switches_other_fields_halfway_so_both_ends_are_the_seeds_samples():
    mixed, _ = vae_pair("vae")
    mixed.after_training(training_batches(), seed=0)
    spec = mixed.noise_spec()
    walk = interpolation_noise(spec, 3, 4, steps=5)
    a, b = make_noise(spec, 3, 1), make_noise(spec, 4, 1)
    assert np.array_equal(walk["z_component"][:3], np.repeat(a["z_component"], 3, axis=0))
    assert np.array_equal(walk["z_component"][3:], np.repeat(b["z_component"], 2, axis=0))
    ends = mixed.sample_from_noise({k: torch.from_numpy(v[[0, -1]]) for k, v in walk.items()})
    assert torch.allclose(ends, torch.cat([mixed.sample(1, seed=3), mixed.sample(1, seed=4)]), atol=1e-6)


@pytest.mark.parametrize("family,extra", [("vae", {}), ("cvae", {"class_prior": True})])
def test_sampling_is_the_decode_of_the_standardized_latent_bit_for_bit(family, extra):
    mixed, plain = vae_pair(family, **extra)
    mixed.after_training(training_batches(), seed=0)
    labels = torch.tensor([0, 1, 2, 1]) if mixed.conditional else None
    for model in (mixed, plain):
        noise = noise_tensors(make_noise(model.noise_spec(), 7, 4))
        with torch.no_grad():
            u = model.standardized_latent(noise, labels, 0.8)
            assert u.shape == (4, 2)
            assert torch.equal(model.decode_standardized(u, labels), model.sample_from_noise(noise, labels, 0.8))
        assert model.has_latent_mixture is (model is mixed)


def trained_digits_model(family: str):
    """A tiny MLP (C)VAE fit to the digits for 300 steps, its 5-component mixture fitted (~2 s)."""
    x, y = binary_digits()
    torch.manual_seed(0)
    model = build_model(family, DIGITS, latent_dim=4, hidden=(32,), iwae_k=20, latent_mixture=5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        model.loss({"x": x[idx], "y": y[idx]})["loss"].backward()
        opt.step()
    model.after_training([{"x": x[i : i + 300], "y": y[i : i + 300]} for i in range(0, len(x), 300)], seed=0)
    return model.eval()


def step_sizes(images: torch.Tensor) -> torch.Tensor:
    return (images[1:] - images[:-1]).flatten(1).norm(dim=1)


@pytest.mark.parametrize("family,seeds,label", [("vae", (1, 2), None), ("cvae", (11, 12), 3)])
def test_the_walk_of_a_latent_mixture_has_no_jump_where_the_noise_walk_had_one(family, seeds, label, tmp_path):
    from genmodels.export import export_sampler
    from genmodels.sampling import OnnxSampler

    model = trained_digits_model(family)
    steps = 16
    noise = interpolation_noise(model.noise_spec(), *seeds, steps)  # the walk before: noise slerp
    with torch.no_grad():
        before = step_sizes(model.sample_from_noise(noise_tensors(noise), model.check_labels(label, steps)))
    # It jumped where the component switched seeds (between images 8 and 9 of 16).
    assert int(before.argmax()) == steps // 2 - 1 and before.max() > 5 * before.median()
    walk = interpolate(model, *seeds, steps, label)
    after = step_sizes(walk)
    assert after.max() <= 3 * after.median()
    assert torch.allclose(walk[[0, -1]], torch.cat([model.sample(1, labels=label, seed=s) for s in seeds]), atol=1e-6)
    # The served walk (the exported latent and decode graphs) is the same one.
    sampler = OnnxSampler(export_sampler(model, tmp_path, likelihood=False))
    np.testing.assert_allclose(sampler.interpolate(*seeds, steps, label), walk.numpy(), rtol=0, atol=1e-4)


def tiny_snapshot(n: int = 120):
    rng = np.random.default_rng(0)
    x = (rng.random((n, *IMAGE.shape)) * 255).astype(np.uint8)
    y = (np.arange(n) % IMAGE.num_classes).astype(np.int64)
    val = SimpleNamespace(x=x[:30], y=y[:30], x_binary=(rng.random((30, *IMAGE.shape)) < 0.5).astype(np.uint8))
    return SimpleNamespace(image=IMAGE, splits={"train": SimpleNamespace(x=x, y=y, x_binary=None), "val": val},
                           dataset="tiny", hash="0" * 64)


def test_training_fits_the_mixture_once_and_a_finished_run_run_again_refits_it_identically(tmp_path):
    from genmodels.storage import open_storage

    snap = tiny_snapshot()
    cfg = TrainConfig(epochs=2, batch_size=30, lr=1e-2, early_stopping_patience=None)
    run = open_storage(f"file://{tmp_path}")

    def fresh():
        torch.manual_seed(0)
        return build_model("cvae", IMAGE, latent_dim=2, hidden=(8,), class_prior=True, latent_mixture=2)

    first = train(fresh(), snap, cfg, LocalContext(run)).model
    assert not torch.allclose(first.mixture_means, torch.zeros_like(first.mixture_means))
    again = train(fresh(), snap, cfg, LocalContext(run))  # resumes a finished run: no epoch, the same fit
    assert again.resumed_from_epoch == 2 and len(again.history) == 2
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
