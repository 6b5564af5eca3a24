"""PixelRNN: exact normalization, causality, cached == naive sampling, bounded per-pixel work."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from genmodels.models import checkpoint_bytes, model_from_checkpoint
from genmodels.models._pixelrnn_layers import full_precision
from genmodels.models.base import ImageSpec
from genmodels.models.pixelrnn import PixelRNN, PixelRNNConfig, categorical_inverse_cdf
from genmodels.models.base import make_noise_tensors

KINDS = ("row", "diagonal")


def make_model(
    kind: str,
    channels: int = 1,
    height: int = 4,
    width: int = 4,
    levels: int = 2,
    conditional: bool = False,
    seed: int = 0,
    **overrides,
) -> PixelRNN:
    torch.manual_seed(seed)
    hidden = 6 if channels == 3 else 4
    cfg = dict(layer=kind, num_layers=2, hidden_channels=hidden, head_hidden=6, conditional=conditional)
    cfg.update(overrides)
    image = ImageSpec(channels=channels, height=height, width=width, levels=levels, num_classes=3)
    model = PixelRNN(PixelRNNConfig(image=image, **cfg))
    if conditional:
        # Zero-initialized class biases would make any conditioning test vacuous.
        with torch.no_grad():
            model.gate_class_bias.normal_()
            model.head_class_bias.normal_()
    if model.config.position_bias:
        with torch.no_grad():  # likewise a zero-initialized position bias
            model.position_bias.normal_()
    return model.eval()


def all_binary_images(channels: int, height: int, width: int) -> torch.Tensor:
    dims = channels * height * width
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=dims)))
    return bits.view(-1, channels, height, width)


# --- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image, overrides, match",
    [
        (ImageSpec(channels=2), {}, "1 or 3 channels"),
        (ImageSpec(), {"layer": "grid"}, "layer must be one of"),
        (ImageSpec(channels=3), {"hidden_channels": 8}, "hidden_channels must be divisible by 3"),
        (ImageSpec(channels=3), {"hidden_channels": 9, "head_hidden": 8}, "head_hidden must be divisible by 3"),
        (ImageSpec(), {"input_kernel": 4}, "input_kernel must be odd"),
        (ImageSpec(), {"input_width": 8}, "input_width must be odd"),
        (ImageSpec(), {"input_width": 1}, "input_width must be odd and >= 3"),
        (ImageSpec(), {"num_layers": 0}, "num_layers must be >= 1"),
        (ImageSpec(num_classes=0), {"conditional": True}, "num_classes >= 1"),
    ],
)
def test_config_rejects_invalid_settings(image, overrides, match):
    with pytest.raises(ValueError, match=match):
        PixelRNNConfig(image=image, **overrides)


def test_input_width_is_capped_where_wider_taps_would_only_read_padding():
    image = ImageSpec(height=8, width=8)
    assert PixelRNNConfig(image=image, input_width=55).input_pad == (3, 7)  # 2W-1 = 15 columns
    assert PixelRNNConfig(image=image, input_width=9).input_pad == (3, 4)
    assert PixelRNNConfig(image=image, input_kernel=5).input_pad == (2, 2)  # square
    model = PixelRNN(PixelRNNConfig(image=image, input_width=55))
    assert tuple(model.input_conv.weight.shape[2:]) == (7, 15)


def test_config_round_trips_through_dict():
    cfg = PixelRNNConfig(image=ImageSpec(channels=3, height=5), layer="diagonal", hidden_channels=9, head_hidden=12)
    assert PixelRNNConfig.from_dict(cfg.to_dict()) == cfg


# --- likelihood --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional, position_bias", [(False, False), (True, False), (False, True)])
def test_likelihood_sums_to_one_over_all_2x2_binary_images(kind, conditional, position_bias):
    model = make_model(kind, height=2, width=2, conditional=conditional, position_bias=position_bias)
    x = all_binary_images(1, 2, 2)
    with torch.no_grad():
        if conditional:
            lls = [model.log_likelihood(x, torch.full((16,), k)) for k in range(3)]
            # The label must actually change the distribution, or this test checks nothing new.
            assert not torch.allclose(lls[0], lls[1], atol=1e-3)
        else:
            lls = [model.log_likelihood(x)]
    for ll in lls:
        assert ll.shape == (16,)
        assert torch.exp(ll).sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_likelihood_sums_to_one_over_all_2x2_rgb_binary_images(kind):
    model = make_model(kind, channels=3, height=2, width=2)
    x = all_binary_images(3, 2, 2)  # 4096 images: all 12 sub-pixels enumerated
    with torch.no_grad():
        total = torch.logsumexp(model.log_likelihood(x).double(), dim=0).exp().item()
    assert total == pytest.approx(1.0, abs=1e-5)


def test_loss_reports_nll_and_bits_per_dim():
    model = make_model("row", height=3, width=3)
    x = all_binary_images(1, 3, 3)[:5]
    out = model.loss({"x": x, "y": torch.zeros(5, dtype=torch.long)})
    expected = -model.log_likelihood(x).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["nll"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["bits_per_dim"].item() == pytest.approx(expected.item() / (9 * math.log(2)), rel=1e-6)
    assert out["loss"].requires_grad and not out["nll"].requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_on_grey_levels_is_the_expected_nll_over_every_binarization(kind):
    """Given the grey levels a batch was drawn from, the loss takes each pixel's expectation over
    its own binarization: averaged over all 16 binarizations of a 2x2 grey image, weighted by
    their probability, it equals the expected NLL, and so do its gradients (the same objective,
    a lower-variance estimate). A binary probability gives the plain NLL."""
    model = make_model(kind, height=2, width=2, conditional=True)
    grey = torch.tensor([0.9, 0.25, 0.6, 0.05]).view(1, 1, 2, 2)
    x = all_binary_images(1, 2, 2)
    weight = torch.where(x == 1, grey, 1 - grey).flatten(1).prod(dim=1)
    labels = torch.full((16,), 2)

    def expected_loss(batch_of):
        model.zero_grad()
        total = sum(weight[i] * model.loss(batch_of(i))["loss"] for i in range(16))
        total.backward()
        return total.item(), [p.grad.clone() for p in model.parameters()]

    plain = expected_loss(lambda i: {"x": x[i : i + 1], "y": labels[i : i + 1]})
    soft = expected_loss(lambda i: {"x": x[i : i + 1], "y": labels[i : i + 1], "x_probability": grey})
    assert soft[0] == pytest.approx(plain[0], rel=1e-6)
    for g_soft, g_plain in zip(soft[1], plain[1]):
        assert torch.allclose(g_soft, g_plain, atol=1e-6)
    # Not the plain loss image by image: each pixel's target is its grey level.
    assert model.loss({"x": x[:1], "y": labels[:1], "x_probability": grey})["loss"].item() != pytest.approx(
        model.loss({"x": x[:1], "y": labels[:1]})["loss"].item(), abs=1e-4)
    assert model.loss({"x": x, "y": labels, "x_probability": x})["loss"].item() == pytest.approx(
        model.loss({"x": x, "y": labels})["loss"].item(), rel=1e-6)


def test_log_likelihood_checks_shapes_and_labels():
    model = make_model("row", conditional=True)
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 4, 4\]"):
        model.log_likelihood(torch.zeros(2, 1, 4, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels are required"):
        model.log_likelihood(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.log_likelihood(torch.zeros(2, 1, 4, 4), torch.tensor([0, 3]))


# --- causality ---------------------------------------------------------------------------------
def input_jacobian(model: PixelRNN, labels: torch.Tensor | None = None, images: int = 8) -> torch.Tensor:
    """|d logits(channel c, pixel p) / d x| summed over a few random images: [C*H*W (c, i, j), C, H, W].

    One backward pass: each batch row selects a different output of one of the images; rows
    are independent, so row r's input gradient is exactly output r's. Exact zeros stay zero
    in the sum, while a real dependence hidden by ReLUs that happen to be off at one image
    shows up at another.
    """
    c, h, w = model.image.shape
    n = c * h * w
    torch.manual_seed(123)
    x = torch.rand(images, 1, c, h, w).expand(images, n, c, h, w).reshape(images * n, c, h, w)
    x = x.clone().requires_grad_(True)
    logits = model.logits(x, None if labels is None else labels.expand(images * n))  # [., levels, C, H, W]
    select = torch.eye(n).view(1, n, 1, c, h, w)
    (logits.view(images, n, -1, c, h, w) * select).sum().backward()
    return x.grad.abs().view(images, n, c, h, w).sum(dim=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional, position_bias", [(False, False), (True, False), (False, True)])
def test_logits_depend_only_on_earlier_pixels(kind, conditional, position_bias):
    # Wider than the default: in a 4-unit net, every ReLU of the head can be off at a pixel.
    model = make_model(kind, height=5, width=6, conditional=conditional, hidden_channels=8, head_hidden=16,
                       position_bias=position_bias)
    jac = input_jacobian(model, torch.tensor([2]) if conditional else None)
    h, w = 5, 6
    for p in range(h * w):
        i, j = divmod(p, w)
        grad = jac[p, 0].flatten()  # raster order
        assert torch.all(grad[p:] == 0), f"pixel {(i, j)} sees itself or the future"
        if kind == "diagonal":
            # The Diagonal BiLSTM covers the whole causal context but one pixel: the last one
            # of the row above, which no feature at its own position ever holds (mask A, then
            # mask B), so the right-to-left pass over that row cannot carry it to the left.
            blind = [q for q in range(p) if grad[q] == 0]
            assert blind in ([], [i * w - 1]), f"pixel {(i, j)} misses {[divmod(q, w) for q in blind]}"
        else:
            if j > 0:
                assert grad[p - 1] > 0, f"pixel {(i, j)} does not see its left neighbour"
            if i > 0:
                assert grad[p - w] > 0, f"pixel {(i, j)} does not see the pixel above"


@pytest.mark.parametrize("input_width", [None, 11])
def test_a_wide_input_kernel_shows_the_row_lstm_its_whole_row(input_width):
    # One Row LSTM layer on a square 3x3 kernel sees two pixels to its left on its own row;
    # 11 = 2W-1 columns see all of them. The square case is the contrast that makes it a test.
    model = make_model("row", height=5, width=6, num_layers=1, hidden_channels=8, head_hidden=16,
                       input_kernel=3, input_width=input_width)
    jac = input_jacobian(model)
    h, w = 5, 6
    for p in range(h * w):
        i, j = divmod(p, w)
        grad = jac[p, 0].flatten()
        assert torch.all(grad[p:] == 0), f"pixel {(i, j)} sees itself or the future"
        unseen_left = [q for q in range(i * w, p) if grad[q] == 0]
        expected = [] if input_width else list(range(i * w, max(i * w, p - 2)))
        assert unseen_left == expected, f"pixel {(i, j)} misses {[divmod(q, w) for q in unseen_left]} of its row"


@pytest.mark.parametrize("kind, kernel", [("row", {}), ("diagonal", {}), ("row", {"input_kernel": 3, "input_width": 7})])
def test_rgb_logits_respect_channel_order(kind, kernel):
    # Wider than the default tiny model: with 2 units per colour group, all of a group's ReLUs
    # can be off at a pixel, hiding a real dependence.
    model = make_model(kind, channels=3, height=4, width=4, levels=256, hidden_channels=24, head_hidden=24, **kernel)
    jac = input_jacobian(model)  # [(c, i, j), C, H, W]
    c_, h, w = 3, 4, 4
    for ch, i, j in itertools.product(range(c_), range(h), range(w)):
        grad = jac[(ch * h + i) * w + j]
        p = i * w + j
        flat = grad.flatten(1)  # [C, H*W]
        assert torch.all(flat[:, p + 1 :] == 0), f"{'RGB'[ch]} at {(i, j)} sees later pixels"
        assert torch.all(flat[ch:, p] == 0), f"{'RGB'[ch]} at {(i, j)} sees itself or a later channel"
        assert torch.all(flat[:ch, p] > 0), f"{'RGB'[ch]} at {(i, j)} misses an earlier channel"
        if p > 0:
            assert torch.all(flat[:, p - 1] > 0), f"{'RGB'[ch]} at {(i, j)} misses the previous pixel"


# --- sampling ----------------------------------------------------------------------------------
def test_inverse_cdf_picks_the_level_whose_interval_holds_u():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    u = torch.tensor([0.0, 0.19, 0.21, 0.69, 0.71, 0.9999999])
    assert categorical_inverse_cdf(logits.expand(6, 3), u, 1.0).tolist() == [0, 0, 1, 1, 2, 2]
    # Temperature 0.1 puts > 99.9% of the mass on the mode.
    assert categorical_inverse_cdf(logits.expand(3, 3), torch.tensor([0.01, 0.5, 0.99]), 0.1).tolist() == [1, 1, 1]


def test_a_uniform_of_zero_never_picks_a_level_or_component_without_mass():
    # numpy's float32 draws are exactly 0 once in 2**24: they picked level/component 0 even where
    # temperature had taken all its mass.
    from genmodels.models.base import inverse_cdf_pick
    from genmodels.sampling import categorical_inverse_cdf_np

    assert inverse_cdf_pick(torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.5]]), torch.zeros(2)).tolist() == [2, 0]
    logits, zero = torch.tensor([[0.0, 1.0]]), torch.zeros(1)
    assert torch.softmax(logits / 1e-3, dim=1)[0, 0] == 0.0
    assert categorical_inverse_cdf(logits, zero, 1e-3).tolist() == [1]
    assert categorical_inverse_cdf_np(logits.numpy(), zero.numpy(), 1e-3).tolist() == [1]
    assert categorical_inverse_cdf(logits, zero, 1.0).tolist() == [0]  # level 0 has mass at T = 1


def test_inverse_cdf_of_torch_and_of_the_onnx_runtime_pick_the_same_level_every_time():
    # In float32 the two kernels' CDFs differed in their last bits: 4 of these 200,000 draws of
    # 256 levels got another level, and an 8-bit image another path from there on.
    from genmodels.sampling import categorical_inverse_cdf_np

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200_000, 256, generator=gen) * 3
    u = torch.rand(200_000, generator=gen)
    for temperature in (1.0, 0.7):
        ours = categorical_inverse_cdf(logits, u, temperature).numpy()
        assert np.array_equal(ours, categorical_inverse_cdf_np(logits.numpy(), u.numpy(), temperature))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional, position_bias", [(False, False), (True, False), (True, True)])
def test_cached_sampler_matches_naive_sampler(kind, conditional, position_bias):
    model = make_model(kind, height=3, width=4, conditional=conditional, position_bias=position_bias)
    for seed, temperature in [(0, 1.0), (1, 0.7), (2, 1.6)]:
        noise = make_noise_tensors(model.noise_spec(), seed, 3)
        labels = torch.tensor([0, 2, 1]) if conditional else None
        cached, logits = model.sample_cached(noise, labels, temperature, return_logits=True)
        naive = model.sample_naive(noise, labels, temperature)
        assert torch.equal(cached, naive)
        assert set(cached.unique().tolist()) == {0.0, 1.0}
        # The cached states reproduce the full network, not just its argmax.
        torch.testing.assert_close(logits, model.logits(cached, labels), atol=1e-5, rtol=1e-5)
        assert torch.equal(model.sample_from_noise(noise, labels, temperature), cached)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("position_bias", [False, True])
def test_cached_sampler_matches_naive_sampler_with_a_wide_input_kernel(kind, channels, position_bias):
    # A 3-row, 9-column input kernel: the canvas pads columns and rows by different amounts.
    # With the presets' position bias, the completions' warm-up steps read it at the known pixels too.
    model = make_model(kind, channels=channels, height=3, width=5, input_kernel=3, input_width=9,
                       position_bias=position_bias)
    noise = make_noise_tensors(model.noise_spec(), 3, 2)
    cached, logits = model.sample_cached(noise, temperature=0.8, return_logits=True)
    assert torch.equal(cached, model.sample_naive(noise, temperature=0.8))
    torch.testing.assert_close(logits, model.logits(cached), atol=1e-5, rtol=1e-5)
    completed = model.complete_prefix_cached(cached, 7, make_noise_tensors(model.noise_spec(), 4, 2))
    assert torch.equal(completed, model.complete_prefix_naive(cached, 7, make_noise_tensors(model.noise_spec(), 4, 2)))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_sampler_matches_naive_sampler_rgb_8bit(kind):
    model = make_model(kind, channels=3, height=3, width=3, levels=256)
    noise = make_noise_tensors(model.noise_spec(), 5, 2)
    cached, logits = model.sample_cached(noise, temperature=0.9, return_logits=True)
    assert torch.equal(cached, model.sample_naive(noise, temperature=0.9))
    torch.testing.assert_close(logits, model.logits(cached), atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, model.from_levels(model.to_levels(cached)))  # on the 8-bit grid


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_cached_sampler_work_per_pixel_does_not_grow_with_image_size(kind, channels):
    """Count step calls and record their input shapes at two image sizes."""
    records = {}
    for size in [(3, 4), (6, 7)]:
        model = make_model(kind, channels=channels, height=size[0], width=size[1])
        calls = {"pixel": [], "row": []}
        pixel_step, row_step = model.pixel_step, model.row_step

        def counted_pixel(*args, _calls=calls, _f=pixel_step, **kwargs):
            _calls["pixel"].append(tuple(tuple(a.shape) for a in args))
            return _f(*args, **kwargs)

        def counted_row(*args, _calls=calls, _f=row_step):
            _calls["row"].append(tuple(tuple(a.shape) for a in args))
            return _f(*args)

        model.pixel_step, model.row_step = counted_pixel, counted_row
        model.sample(2, seed=0)
        records[size] = calls

    for (h, w), calls in records.items():
        assert len(calls["pixel"]) == h * w * channels
        assert len(calls["row"]) == (h - 1 if kind == "diagonal" else 0)
        assert len(set(calls["pixel"])) == 1  # every pixel step gets the same input sizes
    small, large = records[(3, 4)], records[(6, 7)]
    # Pixel-step inputs do not depend on the image size at all...
    assert small["pixel"][0] == large["pixel"][0]
    # ...and row-step inputs only through the row width (their last axis).
    if kind == "diagonal":
        assert all(shape[-1] == 7 for shape in large["row"][0][:2])
        assert [s[:-1] for s in small["row"][0][:2]] == [s[:-1] for s in large["row"][0][:2]]


def test_row_step_is_refused_for_the_row_lstm():
    with pytest.raises(RuntimeError, match="only for the Diagonal BiLSTM"):
        make_model("row").row_step(torch.zeros(1), torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_images_and_rows_are_independent(kind):
    model = make_model(kind, conditional=True)
    labels = torch.tensor([0, 1, 2, 1])
    batch = model.sample(4, labels=labels, seed=7, temperature=0.8)
    assert batch.shape == (4, 1, 4, 4)
    assert torch.equal(batch, model.sample(4, labels=labels, seed=7, temperature=0.8))
    assert not torch.equal(batch, model.sample(4, labels=labels, seed=8, temperature=0.8))
    for k in range(4):
        alone = model.sample(1, labels=int(labels[k]), seed=7, temperature=0.8, start=k)
        assert torch.equal(alone[0], batch[k])


def test_sampling_validates_noise_labels_and_temperature():
    model = make_model("row")
    noise = make_noise_tensors(model.noise_spec(), 0, 2)
    with pytest.raises(ValueError, match=r"temperature must be in \[0.001, 100\]"):
        model.sample_from_noise(noise, temperature=0.0)
    with pytest.raises(ValueError, match=r"noise 'u' must be \[n, 1, 4, 4\]"):
        model.sample_from_noise({"u": torch.rand(2, 1, 4, 3)})
    with pytest.raises(ValueError, match="needs field 'u'"):
        model.sample_from_noise({"z": torch.rand(2, 1, 4, 4)})
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, labels=1)
    with pytest.raises(ValueError, match="labels are required"):
        make_model("row", conditional=True).sample(2)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_keeps_samples_and_likelihoods(kind):
    model = make_model(kind, conditional=True, residual=False)
    restored = model_from_checkpoint(checkpoint_bytes(model))
    assert isinstance(restored, PixelRNN) and restored.config == model.config
    labels = torch.tensor([2, 0, 1])
    assert torch.equal(restored.sample(3, labels=labels, seed=3), model.sample(3, labels=labels, seed=3))
    x = model.sample(3, labels=labels, seed=4)
    with torch.no_grad():
        assert torch.equal(restored.log_likelihood(x, labels), model.log_likelihood(x, labels))


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_gradient_steps_lower_the_nll(kind):
    model = make_model(kind, height=4, width=4).train()
    torch.manual_seed(1)
    x = (torch.rand(16, 1, 4, 4) < torch.linspace(0.1, 0.9, 16).view(1, 1, 4, 4)).float()
    batch = {"x": x, "y": torch.zeros(16, dtype=torch.long)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.loss(batch)["nll"].item()
    for _ in range(15):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    after = model.loss(batch)["nll"].item()
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_under_bf16_autocast_only_the_convolutions_run_in_bf16(kind):
    """The cells accumulate over every row and the residual stream over every layer: those stay
    fp32 (in bf16 they cost the quick PixelRNN a nat), while the convolutions take bf16."""
    model = make_model(kind, height=5, width=5, conditional=True)
    dtypes: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args, out):
            dtypes.setdefault(name, out.dtype)

        return hook

    model.layers[0].input_to_state.register_forward_hook(record("convolution"))
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(record(f"layer {i}"))
    grey = torch.rand(3, 1, 5, 5)
    batch = {"x": (torch.rand(3, 1, 5, 5) < grey).float(), "y": torch.tensor([0, 1, 2]), "x_probability": grey}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(batch)["loss"]
    assert dtypes.pop("convolution") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}, dtypes
    assert loss.dtype == torch.float32
    # bf16 rounds the convolutions' products; nothing compounds that rounding.
    assert loss.item() == pytest.approx(model.loss(batch)["loss"].item(), rel=0.01)


def test_full_precision_widens_half_precision_and_keeps_the_rest():
    assert full_precision(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert full_precision(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    wide = torch.ones(2, dtype=torch.float64)
    assert full_precision(wide) is wide
