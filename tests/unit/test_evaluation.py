"""Evaluation: likelihood metrics, feature distances, the cached domain classifier, pictures.

Exact answers come from tiny test-only models defined here (an independent-Bernoulli model
with a closed-form likelihood, a fake VAE with known bounds, a GAN-like decoder, and an
"oracle" conditional model that returns real images of the requested class); the domain
classifier is trained on sklearn's 8x8 digits with a tiny config.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from torch import nn

from genmodels.data.prep import PrepConfig, Split, prepare
from genmodels.evaluation import (
    ClassifierConfig,
    DomainClassifier,
    LikelihoodPassPaused,
    analogy_png,
    bits_per_dim,
    class_balanced_labels,
    class_judge_config,
    classifier_key,
    domain_metrics,
    evaluate,
    fid,
    frechet_distance,
    generate,
    grid_png,
    image_pngs,
    interpolate,
    interpolation_png,
    kid,
    labels_in_proportion,
    likelihood_metrics,
    load_or_train_classifier,
    manifold_png,
    precision_recall,
    reference_images,
    render_pictures,
    sample_quality,
    slerp,
    train_classifier,
)
from genmodels.evaluation import classifier as classifier_module
from genmodels.evaluation import metrics as metrics_module
from genmodels.evaluation.likelihood import PROGRESS_KEY
from genmodels.evaluation.pictures import MIN_TILE_PX, analogies, manifold_images
from genmodels.models.base import GenerativeModel, ImageSpec, ModelConfig
from genmodels.noise import NoiseField
from genmodels.storage import open_storage

DIGITS = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=10)
# Small enough to train in about a second on a busy CPU, good enough (>80%) on digits.
TINY = dict(base_channels=8, feature_dim=32, epochs=3, batch_size=64)
LIKELIHOOD_KEYS = {"nll_nats", "bits_per_dim", "elbo_nats", "elbo_bits_per_dim", "recon_mse", "likelihood_examples"}


# --- test-only models ---------------------------------------------------------------------
@dataclass(frozen=True)
class BernoulliConfig(ModelConfig):
    p: float = 0.3


class IndependentBernoulli(GenerativeModel):
    """Every pixel ~ Bernoulli(p) independently: log p(x) has a closed form."""

    family = "test-bernoulli"
    config_class = BernoulliConfig

    def __init__(self, config: BernoulliConfig) -> None:
        super().__init__(config)
        self.logit = nn.Parameter(torch.full(config.image.shape, math.log(config.p / (1 - config.p))))

    def noise_spec(self):
        return {"u": NoiseField(self.image.shape, "uniform")}

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        return (noise["u"] < torch.sigmoid(self.logit)).float()

    def log_likelihood(self, x, labels=None):
        lp = x * nn.functional.logsigmoid(self.logit) + (1 - x) * nn.functional.logsigmoid(-self.logit)
        return lp.flatten(1).sum(1)


class UniformLevels(GenerativeModel):
    """Uniform over the 256 levels of every pixel: exactly 8 bits per dimension."""

    family = "test-uniform"
    config_class = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.dummy = nn.Parameter(torch.zeros(()))

    def log_likelihood(self, x, labels=None):
        return torch.full((len(x),), -self.image.dims * math.log(256.0))


@dataclass(frozen=True)
class LatentConfig(ModelConfig):
    latent_dim: int = 2
    iwae_k: int = 7
    conditional: bool = False


class FakeVAE(GenerativeModel):
    """Follows the VAE contract with bounds of known value: IWAE(k) = -sum(x) - 1/k,
    ELBO = -sum(x) - 2 - U(0,1) (drawn from torch's global RNG, like a real VAE)."""

    family = "test-vae"
    config_class = LatentConfig
    has_latent = True
    samples_on_grid = False

    def __init__(self, config: LatentConfig) -> None:
        super().__init__(config)
        self.latent_dim = config.latent_dim
        self.conditional = config.conditional
        gen = torch.Generator().manual_seed(0)
        self.decoder = nn.Linear(config.latent_dim, config.image.dims)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.randn(self.decoder.weight.shape, generator=gen))
            self.decoder.bias.zero_()
        self.iwae_calls: list[int] = []
        self.decoded_z: torch.Tensor | None = None

    def noise_spec(self):
        return {"z": NoiseField((self.latent_dim,), "normal")}

    def decode(self, z, labels=None):
        self.decoded_z = z.clone()
        shift = 0.0 if labels is None else labels.float()[:, None] * 0.1
        return torch.sigmoid(self.decoder(z) + shift).view(len(z), *self.image.shape)

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        return self.decode(noise["z"] * temperature, labels)

    def elbo(self, x, labels=None):
        return -x.flatten(1).sum(1) - 2.0 - torch.rand(len(x))

    def iwae(self, x, labels=None, k=1000, chunk=100):
        self.iwae_calls.append(k)
        return -x.flatten(1).sum(1) - 1.0 / k

    def reconstruct(self, x, labels=None):
        return 0.5 * x

    def log_likelihood(self, x, labels=None, k=None):
        return self.iwae(x, labels, k or self.config.iwae_k)


class FakeCVAE(FakeVAE):
    family = "test-cvae"

    def analogies(self, x, labels):
        k = self.image.num_classes
        scale = (torch.arange(k, dtype=torch.float32) + 1) / k
        return x[:, None] * scale[None, :, None, None, None]


class GanLike(GenerativeModel):
    """Latent decoder without a likelihood, like the GAN."""

    family = "test-gan"
    config_class = LatentConfig
    has_likelihood = False
    has_latent = True
    samples_on_grid = False
    train_input = "intensity"

    def __init__(self, config: LatentConfig) -> None:
        super().__init__(config)
        torch.manual_seed(1)
        self.net = nn.Linear(config.latent_dim, config.image.dims)

    def noise_spec(self):
        return {"z": NoiseField((self.config.latent_dim,), "normal")}

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        return torch.sigmoid(self.net(noise["z"] * temperature)).view(-1, *self.image.shape)


class Oracle(GenerativeModel):
    """Conditional 'model' returning real training images of class ``(label + offset) % K``:
    offset 0 is a perfect conditional sampler, offset 1 always draws the wrong class."""

    family = "test-oracle"
    config_class = ModelConfig
    has_likelihood = False
    samples_on_grid = False
    conditional = True

    def __init__(self, config: ModelConfig, split: Split, offset: int = 0) -> None:
        super().__init__(config)
        k = config.image.num_classes
        per_class = min(int((split.y == c).sum()) for c in range(k))
        bank = np.stack([split.x[split.y == c][:per_class] for c in range(k)])
        self.register_buffer("bank", torch.from_numpy(bank).float() / 255.0)
        self.offset = offset
        self.dummy = nn.Parameter(torch.zeros(()))

    def noise_spec(self):
        return {"u": NoiseField((1,), "uniform")}

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        m = self.bank.shape[1]
        idx = (noise["u"][:, 0] * m).long().clamp(max=m - 1)
        return self.bank[(labels + self.offset) % self.image.num_classes, idx]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return prepare("digits", prep=PrepConfig(quantization="binary"))


@pytest.fixture(scope="module")
def classifier_storage(digits, tmp_path_factory):
    """A storage already holding the digits classifier (trained once for the module)."""
    storage = open_storage(tmp_path_factory.mktemp("clf-cache"))
    load_or_train_classifier(digits, storage, ClassifierConfig.for_image(digits.image, **TINY))
    return storage


def _synthetic(image: ImageSpec, x: np.ndarray, x_binary: np.ndarray | None) -> SimpleNamespace:
    y = np.zeros(len(x), dtype=np.int64)
    return SimpleNamespace(
        dataset="synthetic", image=image, splits={"test": Split(x, y, x_binary)}, hash="0" * 64, class_names=[]
    )


# --- likelihood ---------------------------------------------------------------------------
def test_bits_per_dim_conversion_is_exact():
    assert bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0, rel=1e-15)
    assert bits_per_dim(0.0, 10) == 0.0
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(1.0, 0)


def test_bernoulli_likelihood_equals_hand_computed_value():
    image = ImageSpec(channels=1, height=2, width=2, levels=2, num_classes=0)
    x_binary = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8).reshape(3, 1, 2, 2)
    snap = _synthetic(image, x_binary * 255, x_binary)
    model = IndependentBernoulli(BernoulliConfig(image=image, p=0.25))
    out = likelihood_metrics(model, snap, batch_size=2)  # two batches: sums must combine exactly
    # 3 ones and 9 zeros over 3 images.
    expected = -(3 * math.log(0.25) + 9 * math.log(0.75)) / 3
    assert out["nll_nats"] == pytest.approx(expected, rel=1e-6)
    assert out["bits_per_dim"] == pytest.approx(expected / (4 * math.log(2)), rel=1e-6)
    assert out["likelihood_examples"] == 3.0
    assert set(out) == {"nll_nats", "bits_per_dim", "likelihood_examples", "likelihood_seconds"}
    assert likelihood_metrics(model, snap, max_examples=1)["nll_nats"] == pytest.approx(
        -(math.log(0.25) + 3 * math.log(0.75)), rel=1e-6
    )


def test_uniform_8bit_model_has_exactly_8_bits_per_dim():
    image = ImageSpec(channels=3, height=2, width=3, levels=256, num_classes=0)
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 2, 3), dtype=np.uint8)
    out = likelihood_metrics(UniformLevels(ModelConfig(image=image)), _synthetic(image, x, None))
    assert out["bits_per_dim"] == pytest.approx(8.0, rel=1e-6)
    assert out["nll_nats"] == pytest.approx(18 * math.log(256), rel=1e-6)


def test_vae_metrics_report_elbo_iwae_and_reconstruction(digits):
    model = FakeVAE(LatentConfig(image=DIGITS))
    x = torch.from_numpy(digits.splits["test"].x_binary[:50]).float()
    mean_sum = float(x.flatten(1).sum(1).mean())
    rng_before = torch.random.get_rng_state()
    out = likelihood_metrics(model, digits, max_examples=50, iwae_k=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the caller's RNG stream must be untouched"
    assert model.iwae_calls == [5]
    assert out["iwae_k5_nats"] == pytest.approx(-mean_sum - 0.2, rel=1e-6)
    assert out["nll_nats"] == pytest.approx(mean_sum + 0.2, rel=1e-6)
    assert out["bits_per_dim"] == pytest.approx((mean_sum + 0.2) / (64 * math.log(2)), rel=1e-6)
    assert -mean_sum - 3.0 < out["elbo_nats"] < -mean_sum - 2.0
    assert out["elbo_bits_per_dim"] == pytest.approx(-out["elbo_nats"] / (64 * math.log(2)), rel=1e-9)
    # reconstruct = x / 2 on binary x: squared error x^2 / 4 = x / 4 per pixel.
    assert out["recon_mse"] == pytest.approx(float(x.mean()) / 4, rel=1e-6)
    # Same seed, same Monte-Carlo draws; the config's iwae_k is the default.
    again = likelihood_metrics(model, digits, max_examples=50, seed=3)
    assert again["elbo_nats"] == out["elbo_nats"]
    assert "iwae_k7_nats" in again and model.iwae_calls[-1] == 7


def figures(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without the timings, which no two passes share."""
    return {name: value for name, value in metrics.items() if not name.endswith("_seconds")}


def dies_once_on_third_call(method, calls: list[int]):
    """``method`` (of a batch ``x``, ...) recording each call's batch size in ``calls`` and raising
    once, on the third call it records: a likelihood pass killed mid-way."""
    killed = []

    def wrapper(x, *args, **kwargs):
        calls.append(len(x))
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return method(x, *args, **kwargs)

    return wrapper


def test_likelihood_pass_resumes_where_it_was_interrupted(digits, tmp_path):
    """A long IWAE pass killed mid-way continues from its last written batch and ends with
    exactly the figures of an uninterrupted pass; other weights or settings start afresh."""
    model = FakeVAE(LatentConfig(image=DIGITS))
    settings = dict(max_examples=50, batch_size=16, iwae_k=5, seed=3)  # batches at 0, 16, 32, 48
    whole = likelihood_metrics(model, digits, **settings)
    progress = open_storage(tmp_path)
    calls: list[int] = []
    model.iwae = dies_once_on_third_call(model.iwae, calls)
    with pytest.raises(RuntimeError, match="killed"):
        likelihood_metrics(model, digits, progress=progress, **settings)
    assert progress.get_json(PROGRESS_KEY)["next"] == 32
    calls.clear()
    assert figures(likelihood_metrics(model, digits, progress=progress, **settings)) == figures(whole)
    assert calls == [16, 2], "only the two batches not yet written run again"

    calls.clear()
    likelihood_metrics(model, digits, progress=progress, **{**settings, "iwae_k": 6})
    assert calls == [16, 16, 16, 2], "a record of another k is not resumed"
    with torch.no_grad():
        model.decoder.weight.add_(1.0)
    calls.clear()
    likelihood_metrics(model, digits, progress=progress, **{**settings, "iwae_k": 6})
    assert calls == [16, 16, 16, 2], "a record of other weights is not resumed"


def test_a_nan_likelihood_stops_the_pass_at_its_batch_and_is_never_recorded_as_progress(digits, tmp_path):
    """It was found after the last batch (hours at k=5000), each paused call recording NaN sums."""
    model = FakeVAE(LatentConfig(image=DIGITS))
    settings = dict(max_examples=50, batch_size=16, iwae_k=5, seed=3)  # batches at 0, 16, 32, 48
    progress = open_storage(tmp_path)
    likelihood_metrics(model, digits, progress=progress, **{**settings, "max_examples": 40})  # another pass's record
    calls: list[int] = []
    iwae = model.iwae

    def nan_in_the_second_batch(x, *args, **kwargs):
        calls.append(len(x))
        log_px, *rest = iwae(x, *args, **kwargs) if kwargs.get("with_elbo") else (iwae(x, *args, **kwargs),)
        if len(calls) == 2:
            log_px = torch.full_like(log_px, float("nan"))
        return (log_px, *rest) if rest else log_px

    model.iwae = nan_in_the_second_batch
    with pytest.raises(FloatingPointError, match=r"likelihood of the [\w-]+ model is NaN in test images 16\.\.31$"):
        likelihood_metrics(model, digits, progress=progress, deadline=time.monotonic() + 3600, **settings)
    assert calls == [16, 16], "no batch after the NaN one is scored"
    record = progress.get_json(PROGRESS_KEY)
    assert record["next"] == 16 and not any(math.isnan(v) for v in record["sums"].values())

    # A record with NaN sums (what the pass wrote before) is no progress: scored afresh.
    model.iwae = iwae
    whole = likelihood_metrics(model, digits, **settings)
    record = {**record, "sums": {**record["sums"], "log_px": float("nan")}, "next": 32}
    progress.put_json(PROGRESS_KEY, record)
    assert figures(likelihood_metrics(model, digits, progress=progress, **settings)) == figures(whole)


def test_a_record_of_the_pass_on_another_device_is_not_resumed(digits, tmp_path):
    """The IWAE's draws come from the device's generator: a CPU record finished on a GPU (or the
    reverse) would be a figure of neither."""
    model = FakeVAE(LatentConfig(image=DIGITS))
    settings = dict(max_examples=50, batch_size=16, iwae_k=5, seed=3)
    progress = open_storage(tmp_path)
    likelihood_metrics(model, digits, progress=progress, **settings)
    record = progress.get_json(PROGRESS_KEY)
    assert record["settings"]["device"] == "cpu"
    progress.put_json(PROGRESS_KEY, {**record, "settings": {**record["settings"], "device": "cuda"}, "next": 32})
    calls: list[int] = []
    iwae = model.iwae
    model.iwae = lambda x, *args, **kwargs: calls.append(len(x)) or iwae(x, *args, **kwargs)
    likelihood_metrics(model, digits, progress=progress, **settings)
    assert calls == [16, 16, 16, 2]


def test_likelihood_pass_on_a_spent_budget_scores_one_batch_a_call_and_ends_with_the_whole_figures(digits, tmp_path):
    """Past its deadline a pass stops after the batch it is in, its sums written: each call on a
    spent budget scores one batch more, and the call that scores the last returns exactly an
    uninterrupted pass's figures; a deadline not reached changes nothing."""
    model = FakeVAE(LatentConfig(image=DIGITS))
    settings = dict(max_examples=50, batch_size=16, iwae_k=5, seed=3)  # batches at 0, 16, 32, 48
    whole = likelihood_metrics(model, digits, **settings)
    progress = open_storage(tmp_path / "spent")
    spent = time.monotonic()
    seconds_so_far = [0.0]
    for done in (16, 32, 48):
        with pytest.raises(LikelihoodPassPaused) as paused:
            likelihood_metrics(model, digits, progress=progress, deadline=spent, **settings)
        assert (paused.value.done, paused.value.total) == (done, 50)
        record = progress.get_json(PROGRESS_KEY)
        assert record["next"] == done
        seconds_so_far.append(record["seconds"])
    last = likelihood_metrics(model, digits, progress=progress, deadline=spent, **settings)
    assert figures(last) == figures(whole)
    seconds_so_far.append(last["likelihood_seconds"])
    assert seconds_so_far == sorted(set(seconds_so_far)), "each call adds its batch's time to the pass's"
    # A record that did not keep its time (written before it was): the pass's total is unknown.
    record = progress.get_json(PROGRESS_KEY)
    del record["seconds"]
    progress.put_json(PROGRESS_KEY, record)
    assert "likelihood_seconds" not in likelihood_metrics(model, digits, progress=progress, **settings)
    later = time.monotonic() + 3600.0
    assert figures(likelihood_metrics(model, digits, progress=open_storage(tmp_path / "later"), deadline=later,
                                      **settings)) == figures(whole)
    with pytest.raises(ValueError, match="progress storage"):
        likelihood_metrics(model, digits, deadline=later, **settings)


def test_a_finished_pass_of_an_older_computation_is_computed_again(digits, tmp_path, monkeypatch):
    """A finished record would otherwise be returned whole forever: once what the sums mean
    changes (PROGRESS_FORMAT), the same weights and settings are scored afresh."""
    import genmodels.evaluation.likelihood as likelihood

    model = FakeVAE(LatentConfig(image=DIGITS))
    settings = dict(max_examples=40, batch_size=16, iwae_k=5, seed=3)
    progress = open_storage(tmp_path)
    first = likelihood_metrics(model, digits, progress=progress, **settings)
    calls: list[int] = []
    iwae = model.iwae
    model.iwae = lambda x, *args, **kwargs: calls.append(len(x)) or iwae(x, *args, **kwargs)
    assert likelihood_metrics(model, digits, progress=progress, **settings) == first and calls == []
    monkeypatch.setattr(likelihood, "PROGRESS_FORMAT", likelihood.PROGRESS_FORMAT + 1)
    likelihood_metrics(model, digits, progress=progress, **settings)
    assert calls == [16, 16, 8]


def test_completion_sums_resume_with_the_likelihood_pass(digits, tmp_path):
    """A completing model's pass carries both sums through an interruption: the resumed figures,
    completion's too, are the uninterrupted pass's; a record without the completion sum (written
    before the pass scored it) is not resumed."""
    from tiny_models import make_model

    model = make_model("pixelrnn_row")
    settings = dict(max_examples=40, batch_size=16)  # batches at 0, 16, 32
    whole = likelihood_metrics(model, digits, **settings)
    assert {"completion_nll_nats", "completion_examples"} <= set(whole)
    progress = open_storage(tmp_path)
    real, calls = model.log_likelihood_and_marginal, []
    model.log_likelihood_and_marginal = dies_once_on_third_call(real, calls)
    with pytest.raises(RuntimeError, match="killed"):
        likelihood_metrics(model, digits, progress=progress, **settings)
    assert progress.get_json(PROGRESS_KEY)["next"] == 32
    model.log_likelihood_and_marginal = real
    assert figures(likelihood_metrics(model, digits, progress=progress, **settings)) == figures(whole)

    record = progress.get_json(PROGRESS_KEY)
    del record["settings"]["completion_rows"], record["sums"]["log_top"]
    record["next"] = 32
    progress.put_json(PROGRESS_KEY, record)
    assert figures(likelihood_metrics(model, digits, progress=progress, **settings)) == figures(whole)


def test_model_without_likelihood_gets_no_likelihood_keys(digits):
    assert likelihood_metrics(GanLike(LatentConfig(image=DIGITS)), digits) == {}


def test_likelihood_rejects_a_model_for_other_images(digits):
    model = IndependentBernoulli(BernoulliConfig(image=ImageSpec(1, 28, 28, 2, 10)))
    with pytest.raises(ValueError, match="do not match snapshot"):
        likelihood_metrics(model, digits)


# --- feature distances --------------------------------------------------------------------
def _correlated(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(100).normal(size=(d, d)) / math.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_gaussians_matches_closed_form():
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    # For 2x2 M with positive eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 0.5**2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.array([0.5, 0.0]), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_handles_singular_covariances():
    rank_one = np.outer([1.0, 2.0, 0.0], [1.0, 2.0, 0.0])
    value = frechet_distance(np.zeros(3), rank_one, np.zeros(3), rank_one)
    assert value == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), rank_one, np.zeros(2), np.eye(2))


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_norm():
    a = _correlated(500, 16, seed=0)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.linspace(-1.0, 1.0, 16)
    # Same covariance, means apart by `shift`: exactly |shift|^2.
    assert fid(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    assert fid(a, a + 2 * shift) > fid(a, a + shift) > fid(a, a + 0.5 * shift) > 0


def test_kid_matches_torchmetrics_and_brute_force():
    from torchmetrics.image.kid import poly_mmd

    a, b = _correlated(60, 8, seed=1), _correlated(60, 8, seed=2) + 0.3
    reference = float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b)))
    assert kid(a, b) == pytest.approx(reference, rel=1e-10)
    # Unequal set sizes: the U-statistic written out.
    c = b[:25]
    k = lambda u, v: (u @ v.T / 8 + 1) ** 3  # noqa: E731
    kaa, kcc, kac = k(a, a), k(c, c), k(a, c)
    expected = (
        (kaa.sum() - np.trace(kaa)) / (60 * 59) + (kcc.sum() - np.trace(kcc)) / (25 * 24) - 2 * kac.mean()
    )
    assert kid(a, c) == pytest.approx(expected, rel=1e-10)


def test_kid_is_unbiased_for_one_distribution_and_grows_with_a_shift():
    values = np.array([kid(_correlated(40, 8, 2 * r), _correlated(40, 8, 2 * r + 1)) for r in range(40)])
    assert abs(values.mean()) < 3 * values.std(ddof=1) / math.sqrt(len(values))
    a, b = _correlated(300, 8, 10), _correlated(300, 8, 11)
    shifted = [kid(a, b + s) for s in (0.25, 0.5, 1.0)]
    assert shifted[0] > 10 * abs(kid(a, b))
    assert shifted[0] < shifted[1] < shifted[2]


def test_precision_recall_identical_disjoint_and_mode_dropping():
    rng = np.random.default_rng(0)
    cluster_a, cluster_b = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100.0
    real = np.concatenate([cluster_a, cluster_b])
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)
    # A model that only produces cluster A: everything it makes is realistic, half is missing.
    assert precision_recall(real, cluster_a) == (1.0, 0.5)


def test_distances_reject_bad_feature_sets():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        kid(np.full((5, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid(np.zeros((1, 3)), np.zeros((5, 3)))


# --- domain classifier --------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 64, 64), (3, 5, 7)])
def test_classifier_network_accepts_any_image_size(shape):
    net = DomainClassifier(ClassifierConfig(*shape, num_classes=4, base_channels=4, feature_dim=16)).eval()
    x = torch.rand(2, *shape)
    assert net.features(x).shape == (2, 16)
    assert net(x).shape == (2, 4)
    with pytest.raises(ValueError, match="classifier expects images"):
        net(torch.rand(2, shape[0], shape[1] + 1, shape[2]))


def test_classifier_training_is_deterministic_given_the_seed(digits):
    train = digits.splits["train"]
    cfg = ClassifierConfig.for_image(digits.image, **{**TINY, "epochs": 1, "max_train_examples": 200})
    first, second = train_classifier(train.x, train.y, cfg), train_classifier(train.x, train.y, cfg)
    other = train_classifier(train.x, train.y, ClassifierConfig(**{**cfg.to_dict(), "seed": 1}))
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_classifier_is_cached_and_a_second_call_does_not_retrain(digits, tmp_path, monkeypatch):
    calls = []
    real_train = classifier_module.train_classifier

    def counting_train(*args, **kwargs):
        calls.append(args[2])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(classifier_module, "train_classifier", counting_train)
    storage = open_storage(tmp_path)
    # A token training run: this test is about the cache, not about accuracy.
    cfg = ClassifierConfig.for_image(digits.image, **{**TINY, "epochs": 1, "max_train_examples": 200})
    key = classifier_key(digits)
    assert key == f"classifiers/{digits.hash[:16]}.pt" and not storage.exists(key)

    first = load_or_train_classifier(digits, storage, cfg)
    assert len(calls) == 1 and not first.from_cache and storage.exists(key)
    cached_bytes = storage.get_bytes(key)
    # The cache is plain tensors and values: it must load without unpickling code.
    assert torch.load(io.BytesIO(cached_bytes), weights_only=True)["config"] == cfg.to_dict()

    second = load_or_train_classifier(digits, storage, cfg)
    assert len(calls) == 1 and second.from_cache
    assert storage.get_bytes(key) == cached_bytes
    assert second.test_accuracy == first.test_accuracy
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(first.network.eval().features(x), second.network.features(x))

    # Asking for another architecture must not silently reuse the cached one.
    third = load_or_train_classifier(digits, storage, ClassifierConfig(**{**cfg.to_dict(), "feature_dim": 16}))
    assert len(calls) == 2 and not third.from_cache and third.network.config.feature_dim == 16


def test_evaluation_runs_fp32_convolutions_and_restores_the_callers_setting():
    # cuDNN's default is TF32 convolutions: a GPU's likelihoods and samples were not fp32.
    from genmodels.evaluation._common import evaluating

    module = torch.nn.Linear(2, 2)
    before = torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(module):
            assert torch.backends.cudnn.allow_tf32 is False and not module.training
            raise RuntimeError("inside")
    assert torch.backends.cudnn.allow_tf32 is before and module.training


def test_evaluating_with_a_cached_classifier_leaves_the_callers_rng_untouched(digits, classifier_storage):
    """Building the network that the cached weights then overwrite drew its throwaway initial
    weights from the caller's global stream, so a warm cache moved it where a cold one did not."""
    cfg = ClassifierConfig.for_image(DIGITS, **TINY)
    model = IndependentBernoulli(BernoulliConfig(image=DIGITS, p=0.3))
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    assert load_or_train_classifier(digits, classifier_storage, cfg).from_cache
    assert torch.equal(torch.random.get_rng_state(), before)
    evaluate(model, digits, storage=classifier_storage, n_samples=50, classifier_config=cfg)
    assert torch.equal(torch.random.get_rng_state(), before)


def _cache_entry(digits, cfg, state_dict=None, drop=(), **meta) -> bytes:
    """A cache entry of ``cfg`` for ``digits`` as other code may have written it: ``state_dict``
    (default: an untrained network's), today's meta updated by ``meta``, less the keys in ``drop``."""
    meta = {"code_version": classifier_module.CLASSIFIER_CODE_VERSION, "snapshot_hash": digits.hash,
            "test_accuracy": 0.5, **meta}
    buf = io.BytesIO()
    torch.save({"format": classifier_module.CLASSIFIER_FORMAT, "config": cfg.to_dict(),
                "state_dict": DomainClassifier(cfg).state_dict() if state_dict is None else state_dict,
                "meta": {k: v for k, v in meta.items() if k not in drop}}, buf)
    return buf.getvalue()


def _counting_trainings(monkeypatch) -> list:
    calls, real_train = [], classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier",
                        lambda *a, **k: calls.append(a[2]) or real_train(*a, **k))
    return calls


@pytest.mark.parametrize("damage", ["missing key", "other shape"])
def test_a_cached_classifier_todays_network_cannot_load_is_retrained(digits, tmp_path, monkeypatch, damage):
    """After a change of the network's architecture its old cache entries no longer load: each is
    a miss (retrained, then served), not an error of every evaluation on that store."""
    calls = _counting_trainings(monkeypatch)
    storage = open_storage(tmp_path)
    cfg = ClassifierConfig.for_image(digits.image, **{**TINY, "epochs": 1, "max_train_examples": 200})
    state = DomainClassifier(cfg).state_dict()
    if damage == "missing key":
        del state["head.bias"]
    else:
        state["head.weight"] = torch.zeros(3, cfg.feature_dim)
    storage.put_bytes(classifier_key(digits), _cache_entry(digits, cfg, state))

    retrained = load_or_train_classifier(digits, storage, cfg)
    assert len(calls) == 1 and not retrained.from_cache and retrained.test_accuracy != 0.5
    assert load_or_train_classifier(digits, storage, cfg).from_cache and len(calls) == 1


@pytest.mark.parametrize("version", [None, "older"])
def test_a_cached_classifier_of_another_code_version_is_retrained(digits, tmp_path, monkeypatch, version):
    """Same snapshot, same config, weights that load: but trained by other code (c4a3566's layout
    change alone changed them), so FID would depend on when the store's entry was written."""
    calls = _counting_trainings(monkeypatch)
    storage = open_storage(tmp_path)
    cfg = ClassifierConfig.for_image(digits.image, **{**TINY, "epochs": 1, "max_train_examples": 200})
    if version is None:  # written before versions were recorded
        entry = _cache_entry(digits, cfg, drop=("code_version",))
    else:
        entry = _cache_entry(digits, cfg, code_version=classifier_module.CLASSIFIER_CODE_VERSION - 1)
    storage.put_bytes(classifier_key(digits), entry)

    retrained = load_or_train_classifier(digits, storage, cfg)
    assert len(calls) == 1 and not retrained.from_cache and retrained.test_accuracy != 0.5
    again = load_or_train_classifier(digits, storage, cfg)
    assert again.from_cache and len(calls) == 1 and again.test_accuracy == retrained.test_accuracy


def test_concurrent_evaluations_train_a_missing_classifier_once(digits, tmp_path, monkeypatch):
    """Of several callers that find no cached classifier at the same time (threads here; the
    lease in the storage works across processes alike), one trains it and the others read it."""
    import threading

    calls, entered = [], threading.Event()
    real_train = classifier_module.train_classifier

    def slow_counting_train(*args, **kwargs):
        calls.append(threading.current_thread().name)
        entered.set()
        return real_train(*args, **kwargs)

    monkeypatch.setattr(classifier_module, "train_classifier", slow_counting_train)
    storage = open_storage(tmp_path)
    cfg = ClassifierConfig.for_image(digits.image, **{**TINY, "epochs": 1, "max_train_examples": 200})
    results = {}

    def evaluate(name):
        results[name] = load_or_train_classifier(digits, storage, cfg)

    first = threading.Thread(target=evaluate, args=("first",), name="first")
    first.start()
    assert entered.wait(60)  # the first caller is training; the others arrive meanwhile
    others = [threading.Thread(target=evaluate, args=(f"other{i}",)) for i in range(3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(120)
    assert calls == ["first"]
    assert not results["first"].from_cache and all(results[f"other{i}"].from_cache for i in range(3))


def test_classifier_learns_digits_and_reports_its_test_accuracy(digits, classifier_storage):
    trained = load_or_train_classifier(digits, classifier_storage, ClassifierConfig.for_image(DIGITS, **TINY))
    assert trained.from_cache
    test = digits.splits["test"]
    with torch.no_grad():
        predicted = trained.network(torch.from_numpy(test.x).float() / 255).argmax(1).numpy()
    assert trained.test_accuracy == pytest.approx(float(np.mean(predicted == test.y)), abs=1e-12)
    assert trained.test_accuracy > 0.8  # digits are easy even for the tiny network


def test_classifier_needs_labels():
    with pytest.raises(ValueError, match=">= 2 classes"):
        ClassifierConfig(1, 8, 8, num_classes=0)


# --- sample quality through evaluate ------------------------------------------------------
def test_reference_images_match_the_kind_of_samples(digits):
    test = digits.splits["test"]
    on_grid = reference_images(IndependentBernoulli(BernoulliConfig(image=DIGITS)), test, 5)
    continuous = reference_images(FakeVAE(LatentConfig(image=DIGITS)), test, 5)
    assert torch.equal(on_grid, torch.from_numpy(test.x_binary[:5]).float())
    assert torch.allclose(continuous, torch.from_numpy(test.x[:5]).float() / 255)


def test_generate_in_batches_equals_one_call():
    model = GanLike(LatentConfig(image=DIGITS))
    assert torch.allclose(generate(model, 10, seed=4, batch_size=3), model.sample(10, seed=4), atol=1e-6)


def test_evaluate_unconditional_model_with_likelihood(digits, classifier_storage):
    model = IndependentBernoulli(BernoulliConfig(image=DIGITS, p=0.3))
    out = evaluate(
        model, digits, storage=classifier_storage, n_samples=200,
        classifier_config=ClassifierConfig.for_image(DIGITS, **TINY),
    )
    expected = {
        "nll_nats", "bits_per_dim", "likelihood_examples", "likelihood_seconds", "classifier_test_accuracy",
        "classifier_test_accuracy_binarized", "fid", "kid",
        "precision", "recall", "fid_real_floor", "kid_real_floor", "n_samples", "n_reference", "n_floor",
    }
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())
    assert out["n_samples"] == 200 and out["n_reference"] == len(digits.splits["test"])
    assert out["n_floor"] == 200  # as many real images as samples: val's 144, then training images
    assert out["fid"] > 3 * out["fid_real_floor"]  # pixel noise looks nothing like digits


def test_the_floor_uses_as_many_real_images_as_samples_where_val_holds_fewer(digits, classifier_storage):
    """FID's bias falls with the number of images: a floor from val's 144 digits against 1,000
    samples overstated what a perfect model reaches. Val first, then the first training images."""
    val, train = digits.splits["val"], digits.splits["train"]
    network = load_or_train_classifier(digits, classifier_storage, ClassifierConfig.for_image(DIGITS, **TINY)).network
    n = len(val.y) + 56
    for model in (IndependentBernoulli(BernoulliConfig(image=DIGITS, p=0.3)), FakeVAE(LatentConfig(image=DIGITS))):
        out = sample_quality(model, digits, network, n_samples=n, seed=2)
        assert out["n_floor"] == n
        floor = metrics_module.floor_images(model, digits, n, seed=2)
        assert floor.shape == (n, *DIGITS.shape)
        assert torch.equal(floor[: len(val.y)], reference_images(model, val))
        real, _ = classifier_module.extract(network, reference_images(model, digits.splits["test"]))
        assert out["fid_real_floor"] == fid(real, classifier_module.extract(network, floor)[0])
        assert out["kid_real_floor"] == kid(real, classifier_module.extract(network, floor)[0])
    # Continuous samples: the training images' grey levels. Binary ones: one draw of them,
    # the same for the same seed (0 and 255 exactly 0 and 1), another for another seed.
    grey = torch.from_numpy(train.x[:56]).float() / 255
    assert torch.equal(metrics_module.floor_images(FakeVAE(LatentConfig(image=DIGITS)), digits, n)[len(val.y):], grey)
    on_grid = IndependentBernoulli(BernoulliConfig(image=DIGITS))
    drawn = metrics_module.floor_images(on_grid, digits, n, seed=2)[len(val.y):]
    assert torch.equal(drawn, metrics_module.floor_images(on_grid, digits, n, seed=2)[len(val.y):])
    assert not torch.equal(drawn, metrics_module.floor_images(on_grid, digits, n, seed=3)[len(val.y):])
    assert torch.equal(drawn[grey == 0], torch.zeros_like(drawn[grey == 0]))
    assert torch.equal(drawn[grey == 1], torch.ones_like(drawn[grey == 1]))


def test_the_floor_where_val_holds_enough_images_is_todays(digits, classifier_storage):
    """Where val holds the samples' count (the quick Fashion-MNIST evaluation: 1,000 of 6,000), the
    floor is val's first images, so the recorded floors stand."""
    val, test = digits.splits["val"], digits.splits["test"]
    network = load_or_train_classifier(digits, classifier_storage, ClassifierConfig.for_image(DIGITS, **TINY)).network
    model = IndependentBernoulli(BernoulliConfig(image=DIGITS, p=0.3))
    out = sample_quality(model, digits, network, n_samples=100, seed=5)
    real, _ = classifier_module.extract(network, torch.from_numpy(test.x_binary).float())
    floor, _ = classifier_module.extract(network, torch.from_numpy(val.x_binary[:100]).float())
    assert out["n_floor"] == 100
    assert out["fid_real_floor"] == fid(real, floor) and out["kid_real_floor"] == kid(real, floor)


def test_domain_metrics_are_evaluates_sample_quality_without_the_likelihood_pass(digits, classifier_storage,
                                                                                 monkeypatch):
    """What a long run's sample quality can be read from before its IWAE pass ends: the same
    figures, to the bit, and no likelihood computed on the way."""
    cfg = ClassifierConfig.for_image(DIGITS, **TINY)
    model = BinaryOracle(ModelConfig(image=DIGITS), digits.splits["test"])
    full = evaluate(model, digits, storage=classifier_storage, n_samples=300, seed=3, classifier_config=cfg)
    monkeypatch.setattr(metrics_module, "likelihood_metrics", lambda *a, **k: pytest.fail("likelihood computed"))
    alone = domain_metrics(model, digits, storage=classifier_storage, n_samples=300, seed=3, classifier_config=cfg)
    assert {"fid", "class_accuracy", "class_judge_test_accuracy_binarized"} <= set(alone)
    assert alone == {key: full[key] for key in alone}
    assert not set(alone) & {"nll_nats", "likelihood_examples", "completion_nll_nats"}


def test_the_samples_batch_size_changes_no_figure(digits, classifier_storage, monkeypatch):
    """The samplers' batches (``sample_batch_size``) are not the likelihood pass's, and neither
    changes a figure: noise is drawn per sample."""
    from genmodels.models import build_model

    cfg = ClassifierConfig.for_image(DIGITS, **TINY)
    torch.manual_seed(0)
    model = build_model("pixelrnn", DIGITS, num_layers=1, hidden_channels=8, head_hidden=8, input_kernel=3).eval()
    settings = dict(storage=classifier_storage, n_samples=24, max_examples=20, batch_size=8, classifier_config=cfg)
    together = evaluate(model, digits, **settings)
    batches, generate = [], metrics_module.generate
    monkeypatch.setattr(metrics_module, "generate",
                        lambda *a, **k: batches.append(a[4]) or generate(*a, **k))
    assert figures(evaluate(model, digits, sample_batch_size=5, **settings)) == figures(together)
    assert batches == [5]
    assert together["completion_examples"] == 20.0


def test_evaluate_conditional_models_class_accuracy_and_no_likelihood(digits, classifier_storage):
    cfg = ClassifierConfig.for_image(DIGITS, **TINY)
    train = digits.splits["train"]
    # Grey-level oracles judged by the grey-level network (the binary snapshot's class judge
    # has its own test below).
    right = evaluate(Oracle(ModelConfig(image=DIGITS), train), digits, storage=classifier_storage, n_samples=200,
                     classifier_config=cfg, judge_config=cfg)
    wrong = evaluate(Oracle(ModelConfig(image=DIGITS), train, offset=1), digits, storage=classifier_storage,
                     n_samples=200, classifier_config=cfg, judge_config=cfg)
    noise = evaluate(GanLike(LatentConfig(image=DIGITS)), digits, storage=classifier_storage, n_samples=200,
                     classifier_config=cfg)
    assert not LIKELIHOOD_KEYS & set(right) and not LIKELIHOOD_KEYS & set(noise)
    assert right["class_accuracy"] > 0.8
    assert wrong["class_accuracy"] < 0.2
    assert "class_accuracy" not in noise  # unconditional
    # Per class as well; weighted by how many samples asked for each (the test split's mix),
    # their mean is the overall accuracy.
    asked = np.bincount(labels_in_proportion(digits.splits["test"].y, 200, DIGITS.num_classes).numpy())
    per_class = [right[f"class_accuracy_{k}"] for k in range(DIGITS.num_classes)]
    assert right["class_accuracy"] == pytest.approx(float(np.dot(per_class, asked) / 200), abs=1e-12)
    assert max(wrong[f"class_accuracy_{k}"] for k in range(DIGITS.num_classes)) < 0.5
    assert not any(key.startswith("class_accuracy_") for key in noise)
    # Real digits (either label) are far closer to the test set than a random decoder.
    assert right["fid"] < 0.5 * noise["fid"] and wrong["fid"] < 0.5 * noise["fid"]
    # The random decoder's samples all look alike: what tells it apart is recall (coverage), not
    # precision, which a collapsed generator can share with real data (0.93 for both on one CPU).
    assert right["precision"] > 0.8 and right["recall"] > 0.8
    assert noise["recall"] < 0.1


def test_labels_in_proportion_follow_the_reference_mix_and_keep_balanced_labels():
    # A balanced reference gives exactly the interleaved labels the figures were measured with.
    for n in (1, 7, 10, 999, 1000, 10000):
        assert torch.equal(labels_in_proportion(np.arange(10000) % 10, n, 10), class_balanced_labels(n, 10))
    reference = np.array([0] * 5 + [1] * 3 + [2] * 2)  # class 3 absent from the reference
    assert labels_in_proportion(reference, 10, 4).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0]
    # 3.5, 2.1, 1.4: the largest remainder (class 0's) takes the one left over.
    assert np.bincount(labels_in_proportion(reference, 7, 4).numpy(), minlength=4).tolist() == [4, 2, 1, 0]
    rng = np.random.default_rng(0)
    skewed = rng.choice(5, size=3000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    for n in (1, 13, 500, 3000, 7001):
        counts = np.bincount(labels_in_proportion(skewed, n, 5).numpy(), minlength=5)
        assert counts.sum() == n
        assert np.all(np.abs(counts - n * np.bincount(skewed) / len(skewed)) < 1)  # within one of the quota
    for bad in (np.array([0, 4]), np.array([], dtype=np.int64)):
        with pytest.raises(ValueError, match="reference labels"):
            labels_in_proportion(bad, 10, 4)


def test_conditional_samples_ask_for_the_reference_subsets_class_mix(digits, classifier_storage, monkeypatch):
    """FID compares samples with the first ``max_examples`` test images: the labels asked for
    follow that subset's class mix, not equal numbers per class."""
    cfg = ClassifierConfig.for_image(DIGITS, **TINY)
    test = digits.splits["test"]
    skewed = Split(x=test.x, y=np.where(np.arange(len(test.y)) < 60, 3, test.y), x_binary=test.x_binary)
    snapshot = dataclasses.replace(digits, splits={**digits.splits, "test": skewed})
    asked, generate = [], metrics_module.generate
    monkeypatch.setattr(metrics_module, "generate",
                        lambda model, n, seed, labels, *a: asked.append(labels) or generate(model, n, seed, labels, *a))
    oracle = Oracle(ModelConfig(image=DIGITS), digits.splits["train"])
    out = evaluate(oracle, snapshot, storage=classifier_storage, n_samples=100, max_examples=80,
                   classifier_config=cfg, judge_config=cfg)
    counts = np.bincount(asked[0].numpy(), minlength=10)
    expected = np.bincount(skewed.y[:80], minlength=10)  # 60 threes, then the test split's next 20
    assert counts.sum() == 100 and np.all(np.abs(counts - 100 * expected / 80) < 1)
    assert counts[3] >= 75
    assert out["class_accuracy"] > 0.8


def test_evaluate_refuses_a_model_for_other_images(digits, classifier_storage):
    model = IndependentBernoulli(BernoulliConfig(image=ImageSpec(1, 8, 8, 256, 10)))
    with pytest.raises(ValueError, match="snapshot holds"):
        evaluate(model, digits, storage=classifier_storage)


# --- pictures -----------------------------------------------------------------------------
def _decode(png: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(png))
    picture.load()
    return picture


def test_grid_png_size_and_upscaling():
    scale = MIN_TILE_PX // 8
    picture = _decode(grid_png(torch.rand(10, 1, 8, 8), nrow=4))
    assert picture.format == "PNG" and picture.mode == "L"
    assert picture.size == (4 * 8 * scale + 5 * 2, 3 * 8 * scale + 4 * 2)


def test_grid_png_pixels_are_exact_rgb_tiles():
    images = torch.rand(3, 3, 5, 7)
    picture = np.asarray(_decode(grid_png(images, nrow=8, scale=1, padding=0)))
    assert picture.shape == (5, 21, 3)
    expected = (images[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(picture[:, 7:14], expected)


def test_grid_png_rejects_what_it_cannot_draw():
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        grid_png(torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        grid_png(torch.full((1, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="non-empty"):
        grid_png(torch.rand(0, 1, 4, 4))


def test_labelled_rows_png_is_the_grid_beside_a_strip_naming_each_row():
    from genmodels.images import BACKGROUND, labelled_rows_png

    images = torch.rand(6, 1, 5, 7)
    grid = np.asarray(_decode(grid_png(images, nrow=3)))
    picture = np.asarray(_decode(labelled_rows_png(images, ["vae 233.7 nats", "gan FID 11.71"])))
    margin = picture.shape[1] - grid.shape[1]
    assert picture.shape[0] == grid.shape[0] and margin > 0
    assert np.array_equal(picture[:, margin:], grid)  # the samples' pixels are the grid's, untouched
    strip, tile = picture[:, :margin], 5 * math.ceil(MIN_TILE_PX / 7)
    background = round(BACKGROUND * 255)
    # Each label is written beside its own row: ink in both rows' bands of the strip, none in the padding.
    for top in (2, 2 + tile + 2):
        assert (strip[top : top + tile] != background).any()
    assert (strip[:2] == background).all() and (strip[2 + tile : 4 + tile] == background).all()
    # Without padding the strip is still the grids' background, not a copy of some sample's pixel.
    unpadded = np.asarray(_decode(labelled_rows_png(torch.ones(2, 1, 5, 7), ["", ""], padding=0)))
    assert (unpadded[:, : unpadded.shape[1] - 7 * math.ceil(MIN_TILE_PX / 7)] == background).all()
    with pytest.raises(ValueError, match="2 row labels need a batch of a multiple of 2"):
        labelled_rows_png(torch.rand(3, 1, 5, 7), ["a", "b"])


def test_comparison_rows_are_named_by_family_and_gate_figure():
    from genmodels.runs import _row_label

    assert _row_label("vae", {"nll_nats": 233.7186, "fid": 19.8}) == "vae 233.7 nats"
    assert _row_label("gan", {"fid": 11.7062}) == "gan FID 11.71"
    assert _row_label("pixelrnn", {}) == "pixelrnn"  # trained, not evaluated yet


def test_image_pngs_are_the_bytes_of_one_image_grids():
    # Values on and around rounding edges, outside [0, 1], grey and RGB.
    grey = torch.rand(6, 1, 5, 7)
    grey[0, 0, 0, :4] = torch.tensor([-0.5, 1.5, 0.5 / 255, 2.5 / 255])
    for images in (grey, torch.rand(3, 3, 4, 4)):
        assert image_pngs(images) == [grid_png(images[i : i + 1], nrow=1, scale=1, padding=0)
                                      for i in range(len(images))]
        assert image_pngs(images.numpy()) == image_pngs(images)
    with pytest.raises(ValueError, match="NaN"):
        image_pngs(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        image_pngs(torch.rand(1, 2, 2, 2))


def test_slerp_endpoints_and_constant_norm():
    a, b = np.array([3.0, 0.0, 0.0], np.float32), np.array([0.0, 0.0, 3.0], np.float32)
    path = slerp(a, b, np.linspace(0, 1, 7))
    assert path.dtype == np.float32 and path.shape == (7, 3)
    assert np.allclose(path[0], a, atol=1e-6) and np.allclose(path[-1], b, atol=1e-6)
    assert np.allclose(np.linalg.norm(path, axis=1), np.full(7, 3.0), atol=1e-5)
    # Same direction: degenerates to a straight line instead of dividing by sin(0).
    assert np.allclose(slerp(a, 2 * a, np.array([0.5]))[0], 1.5 * a)


@pytest.mark.parametrize("model_cls", [FakeVAE, GanLike])
def test_interpolation_endpoints_are_the_two_seeds_samples(model_cls):
    model = model_cls(LatentConfig(image=DIGITS))
    path = interpolate(model, seed_a=11, seed_b=12, steps=6)
    assert path.shape == (6, 1, 8, 8)
    assert torch.allclose(path[0], model.sample(1, seed=11)[0], atol=1e-6)
    assert torch.allclose(path[-1], model.sample(1, seed=12)[0], atol=1e-6)
    assert not torch.allclose(path[2], path[0], atol=1e-3)
    scale = MIN_TILE_PX // 8
    assert _decode(interpolation_png(model, 11, 12, steps=6)).size == (6 * 8 * scale + 7 * 2, 8 * scale + 2 * 2)


def test_interpolation_of_a_conditional_model_uses_the_label():
    model = FakeCVAE(LatentConfig(image=DIGITS, conditional=True))
    path = interpolate(model, 1, 2, steps=3, label=4)
    assert torch.allclose(path[0], model.sample(1, labels=4, seed=1)[0], atol=1e-6)
    with pytest.raises(ValueError, match="labels are required"):
        interpolate(model, 1, 2, steps=3)


def test_interpolation_refuses_a_model_without_latent():
    with pytest.raises(ValueError, match="no latent noise 'z'"):
        interpolate(IndependentBernoulli(BernoulliConfig(image=DIGITS)), 0, 1)


def test_analogy_grid_has_a_row_per_input_and_a_column_per_class_plus_input(digits):
    model = FakeCVAE(LatentConfig(image=DIGITS, conditional=True))
    x = torch.from_numpy(digits.splits["test"].x_binary[:3]).float()
    labels = torch.from_numpy(digits.splits["test"].y[:3])
    rows = analogies(model, x, labels)
    assert rows.shape == (3, 11, 1, 8, 8)
    assert torch.equal(rows[:, 0], x)
    scale = MIN_TILE_PX // 8
    assert _decode(analogy_png(model, x, labels)).size == (11 * 8 * scale + 12 * 2, 3 * 8 * scale + 4 * 2)


def test_manifold_decodes_normal_quantiles_and_refuses_other_latent_sizes():
    model = FakeVAE(LatentConfig(image=DIGITS, latent_dim=2))
    images = manifold_images(model, n=5)
    assert images.shape == (25, 1, 8, 8)
    q = norm.ppf((np.arange(5) + 0.5) / 5)
    z = model.decoded_z.double().numpy()
    assert np.allclose(z[0], [q[0], q[4]], atol=1e-6)  # top-left: lowest z1, highest z2
    assert np.allclose(z[4], [q[4], q[4]], atol=1e-6)
    assert np.allclose(z[12], [0.0, 0.0], atol=1e-6)
    scale = MIN_TILE_PX // 8
    assert _decode(manifold_png(model, n=5)).size == (5 * 8 * scale + 6 * 2,) * 2
    with pytest.raises(ValueError, match="latent_dim == 2.*latent_dim=3"):
        manifold_png(FakeVAE(LatentConfig(image=DIGITS, latent_dim=3)))
    with pytest.raises(ValueError, match="no latent decoder"):
        manifold_png(GanLike(LatentConfig(image=DIGITS)))


def test_render_pictures_chooses_what_applies(digits):
    cvae = FakeCVAE(LatentConfig(image=DIGITS, latent_dim=2, conditional=True))
    assert set(render_pictures(cvae, digits)) == {"samples.png", "interpolation.png", "analogies.png", "manifold.png"}
    assert set(render_pictures(GanLike(LatentConfig(image=DIGITS, latent_dim=3)), digits)) == {
        "samples.png", "interpolation.png"
    }
    pictures = render_pictures(IndependentBernoulli(BernoulliConfig(image=DIGITS)), digits)
    assert set(pictures) == {"samples.png"}
    scale = MIN_TILE_PX // 8
    assert _decode(pictures["samples.png"]).size == (8 * 8 * scale + 9 * 2,) * 2
    # One row of 8 per class for the conditional model.
    assert _decode(render_pictures(cvae, digits)["samples.png"]).size == (8 * 8 * scale + 9 * 2, 10 * 8 * scale + 11 * 2)


def test_classifier_can_learn_binarized_images_too(digits):
    """binarized_fraction trains on dynamically binarized images as well as grey levels."""
    assert ClassifierConfig.for_image(digits.image).binarized_fraction == 0.0  # FID's features stay sharp
    with pytest.raises(ValueError, match="binarized_fraction"):
        ClassifierConfig.for_image(digits.image, binarized_fraction=1.5)
    train, test = digits.splits["train"], digits.splits["test"]
    binary = test.x_binary.astype(np.float32)
    grey_only = classifier_module.train_classifier(
        train.x, train.y, ClassifierConfig.for_image(digits.image, **{**TINY, "binarized_fraction": 0.0}))
    mixed = classifier_module.train_classifier(
        train.x, train.y, ClassifierConfig.for_image(digits.image, **{**TINY, "binarized_fraction": 0.5}))
    on_binary = {name: classifier_module.accuracy(net, binary, test.y) for name, net in
                 (("grey_only", grey_only), ("mixed", mixed))}
    assert on_binary["mixed"] > on_binary["grey_only"] + 0.05, on_binary
    assert classifier_module.accuracy(mixed, test.x, test.y) > 0.7  # grey levels still classified


class BinaryOracle(Oracle):
    """The Oracle's images as Bernoulli draws of their intensities: real *binarized* images of
    the requested class, the data domain of a binary model (a pure function of the noise)."""

    family = "test-binary-oracle"

    def noise_spec(self):
        return {**super().noise_spec(), "b": NoiseField(self.image.shape, "uniform")}

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        return (noise["b"] < super().sample_from_noise(noise, labels, temperature)).float()


def test_class_judge_knows_binarized_images_and_reports_its_ceiling(digits, classifier_storage, monkeypatch):
    """Binary snapshots: class accuracy comes from a second classifier trained on grey levels
    and binarized draws, whose own accuracy on the real binarized test images is reported as
    the ceiling; FID/KID/precision/recall keep the grey-level features."""
    cfg = ClassifierConfig.for_image(DIGITS, **TINY)
    judge_cfg = class_judge_config(DIGITS, cfg)
    assert judge_cfg == ClassifierConfig(**{**cfg.to_dict(), "binarized_fraction": 0.5})
    assert class_judge_config(ImageSpec(1, 8, 8, 256, 10)) is None  # 8-bit: the feature network judges
    test = digits.splits["test"]
    # Real binarized test images of the asked class, judged by both networks.
    model = BinaryOracle(ModelConfig(image=DIGITS), test)
    out = evaluate(model, digits, storage=classifier_storage, n_samples=500, classifier_config=cfg)
    assert classifier_storage.exists(classifier_key(digits, "class-judge"))
    ceiling = out["class_judge_test_accuracy_binarized"]
    assert out["class_judge_test_accuracy"] > 0.7 and ceiling > 0.5, out
    # Real binarized images score at the judge's ceiling (up to sampling noise) ...
    assert abs(out["class_accuracy"] - ceiling) < 0.1, (out["class_accuracy"], ceiling)
    # ... and clearly above what the grey-level network makes of them.
    assert out["class_accuracy"] > out["class_accuracy_domain"] + 0.05, out
    assert out["classifier_test_accuracy_binarized"] < ceiling
    per_class = [out[f"class_accuracy_{k}"] for k in range(DIGITS.num_classes)]
    asked = np.bincount(labels_in_proportion(test.y, 500, DIGITS.num_classes).numpy())
    assert out["class_accuracy"] == pytest.approx(float(np.dot(per_class, asked) / 500), abs=1e-12)
    # The sample-quality distances are those of the feature network alone.
    domain = load_or_train_classifier(digits, classifier_storage, cfg).network
    alone = sample_quality(model, digits, domain, n_samples=500)
    for key in ("fid", "kid", "precision", "recall", "fid_real_floor"):
        assert out[key] == alone[key], key
    assert alone["class_accuracy"] == out["class_accuracy_domain"]
    # A cached judge is reused, and an unconditional model never asks for one.
    trained = []
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a, **k: trained.append(1))
    again = evaluate(model, digits, storage=classifier_storage, n_samples=500, classifier_config=cfg)
    assert again["class_accuracy"] == out["class_accuracy"] and not trained
    noise = evaluate(GanLike(LatentConfig(image=DIGITS)), digits, storage=classifier_storage, n_samples=200,
                     classifier_config=cfg)
    assert not any(key.startswith("class_") for key in noise) and not trained
