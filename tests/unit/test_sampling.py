"""The ONNX sampler runtime: every family's exported graphs give the torch model's images for
the same seed, whatever the batching; bad requests fail with errors a caller can act on."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from tiny_models import CASES, make_model

from genmodels.export import export_sampler
from genmodels.models.base import make_noise_tensors
from genmodels.noise import NoiseField, interpolation_noise
from genmodels.sampling import OnnxSampler

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (model, directory, sampler): each case exported and loaded once for the module."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            model = make_model(case)
            directory = tmp_path_factory.mktemp(case)
            export_sampler(model, directory)
            cache[case] = (model, directory, OnnxSampler.from_dir(directory, intra_op_num_threads=1))
        return cache[case]

    return get


def assert_same_images(model, got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    if model.samples_on_grid:
        scale = model.image.levels - 1
        diff = np.abs(np.rint(got * scale) - np.rint(want * scale))
        # An 8-bit mixture's floor at a bin boundary may round either way across runtimes
        # (the tolerance check_parity grants it); every other grid sampler matches exactly.
        allowed = 1 if model.family == "mixture" and model.image.levels == 256 else 0
        assert diff.max() <= allowed
        if allowed == 0:
            np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def label_variants(model, n: int) -> list:
    if not model.conditional:
        return [None]
    return [2, [0, 1, 2, 1][:n], np.array([2, 0, 1, 0][:n], dtype=np.int32)]


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_sample_matches_torch_sample_for_the_same_seed(case, exported):
    model, _directory, sampler = exported(case)
    n, seed = 4, 11
    for labels in label_variants(model, n):
        want = model.sample(n, labels=labels, seed=seed, temperature=TEMPERATURE).numpy()
        got = sampler.sample(n, seed, labels=labels, temperature=TEMPERATURE)
        assert_same_images(model, got, want)
        # Rows differ: the comparison is not vacuous (and the noise is per row).
        assert not np.array_equal(got[0], got[1])


def test_temperature_reaches_the_graphs(exported):
    model, _directory, sampler = exported("vae")
    hot, cold = sampler.sample(3, 5, temperature=1.5), sampler.sample(3, 5, temperature=0.3)
    assert np.abs(hot - cold).max() > 1e-3
    assert_same_images(model, cold, model.sample(3, seed=5, temperature=0.3).numpy())


@pytest.mark.parametrize("case", list(CASES))
def test_batching_does_not_change_an_image(case, exported):
    model, _directory, sampler = exported(case)
    labels = [0, 1, 2, 0, 1] if model.conditional else None
    whole = sampler.sample(5, 3, labels=labels, temperature=TEMPERATURE)
    for k in (1, 3):
        tail = sampler.sample(5 - k, 3, labels=None if labels is None else labels[k:], start=k,
                              temperature=TEMPERATURE)
        np.testing.assert_array_equal(whole[k:], tail)
    single = sampler.sample(1, 3, labels=None if labels is None else labels[4], start=4, temperature=TEMPERATURE)
    np.testing.assert_array_equal(whole[4:], single)


@pytest.mark.parametrize("case", ["cvae", "pixelrnn_row", "gan"])
def test_properties_describe_the_model(case, exported):
    model, _directory, sampler = exported(case)
    assert sampler.family == model.family
    assert sampler.conditional is bool(model.conditional)
    assert sampler.num_classes == model.image.num_classes
    assert sampler.image_shape == model.image.shape
    assert sampler.levels == model.image.levels
    assert sampler.noise_spec == dict(model.noise_spec())
    assert all(isinstance(f, NoiseField) for f in sampler.noise_spec.values())
    assert sampler.has_likelihood is (case == "pixelrnn_row")


def test_sample_from_noise_takes_the_torch_models_noise(exported):
    model, _directory, sampler = exported("gan_conditional")
    noise = make_noise_tensors(model.noise_spec(), seed=9, count=3)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        want = model.sample_from_noise(noise, labels, 1.3).numpy()
    got = sampler.sample_from_noise({k: v.numpy() for k, v in noise.items()}, labels.numpy(), 1.3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"noise needs fields \['z'\], got \['w'\]"):
        sampler.sample_from_noise({"w": noise["z"].numpy()}, labels.numpy())
    with pytest.raises(ValueError, match=r"noise 'z' must be \[n, 4\], got \(3, 5\)"):
        sampler.sample_from_noise({"z": np.zeros((3, 5), np.float32)}, labels.numpy())


@pytest.mark.parametrize("case", ["vae", "cvae", "pixelrnn_diagonal"])
def test_sample_many_gives_each_request_the_images_it_gets_alone(case, exported):
    from genmodels.sampling import Request

    model, _directory, sampler = exported(case)
    label = (lambda k: k % 3) if model.conditional else (lambda k: None)
    requests = [Request(3, 7, label(1)), Request(1, 2, label(2)), Request(2, 7, label(0), start=2)]
    got = sampler.sample_many(requests, TEMPERATURE)
    assert len(got) == len(requests)
    for r, images in zip(requests, got):
        assert_same_images(model, images, sampler.sample(r.n, r.seed, r.labels, TEMPERATURE, start=r.start))
    assert sampler.sample_many([], TEMPERATURE) == []


@pytest.mark.parametrize("case", ["vae", "cvae", "vae_mixture", "cvae_mixture", "gan_conditional"])
def test_interpolate_walks_the_torch_models_latent_path(case, exported):
    from genmodels.evaluation.pictures import interpolate

    model, _directory, sampler = exported(case)
    label = 1 if model.conditional else None
    want = interpolate(model, 3, 8, steps=5, label=label, temperature=TEMPERATURE).numpy()
    got = sampler.interpolate(3, 8, 5, label, TEMPERATURE)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # The ends are the seeds' first samples.
    np.testing.assert_array_equal(got[[0, -1]], np.concatenate([sampler.sample(1, 3, label, TEMPERATURE),
                                                                 sampler.sample(1, 8, label, TEMPERATURE)]))


@pytest.mark.parametrize("case", ["vae", "gan_conditional"])
def test_interpolate_without_a_latent_mixture_is_the_noise_walk_byte_for_byte(case, exported):
    from genmodels.evaluation.pictures import interpolate

    model, _directory, sampler = exported(case)
    assert not sampler.has_latent_walk
    label = 2 if model.conditional else None
    noise = interpolation_noise(model.noise_spec(), 3, 8, 6)
    labels = model.check_labels(label, 6)
    np.testing.assert_array_equal(sampler.interpolate(3, 8, 6, label, TEMPERATURE),
                                  sampler.sample_from_noise(noise, None if labels is None else labels.numpy(),
                                                            TEMPERATURE))
    with torch.no_grad():
        want = model.sample_from_noise({k: torch.from_numpy(v) for k, v in noise.items()}, labels, TEMPERATURE)
    assert torch.equal(interpolate(model, 3, 8, 6, label, TEMPERATURE), want)


@pytest.mark.parametrize("case", ["vae_mixture", "cvae_mixture"])
def test_graphs_exported_before_the_latent_walk_still_interpolate_as_before(case, exported, tmp_path):
    model, directory, sampler = exported(case)
    assert sampler.has_latent_walk
    for name in ("sampler", "analogies"):
        if (directory / f"{name}.onnx").exists():
            shutil.copy(directory / f"{name}.onnx", tmp_path / f"{name}.onnx")
    old = OnnxSampler.from_dir(tmp_path)
    assert not old.has_latent_walk
    label = 1 if model.conditional else None
    noise = interpolation_noise(old.noise_spec, 3, 8, 6)
    labels = None if label is None else np.full(6, label, np.int64)
    walked = old.interpolate(3, 8, 6, label, TEMPERATURE)
    # Today's walk, byte for byte: the noise slerp, the component switching halfway.
    np.testing.assert_array_equal(walked, old.sample_from_noise(noise, labels, TEMPERATURE))
    new = sampler.interpolate(3, 8, 6, label, TEMPERATURE)
    np.testing.assert_array_equal(walked[[0, -1]], new[[0, -1]])  # the same ends
    assert np.abs(walked[1:-1] - new[1:-1]).max() > 1e-3  # a different path between them


def test_interpolate_needs_a_latent_and_two_steps(exported):
    _model, _directory, sampler = exported("pixelrnn_row")
    with pytest.raises(NotImplementedError, match="no latent 'z'"):
        sampler.interpolate(0, 1, 4)
    _model, _directory, sampler = exported("vae")
    with pytest.raises(ValueError, match="steps must be >= 2"):
        sampler.interpolate(0, 1, 1)


def test_log_likelihood_matches_torch_where_a_graph_exists(exported):
    model, _directory, sampler = exported("pixelrnn_row")
    x = sampler.sample(3, 0)
    want = model.log_likelihood(torch.from_numpy(x)).detach().double().numpy()
    got = sampler.log_likelihood(x)
    assert got.shape == (3,) and np.all(got < 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \[n, 1, 8, 8\]"):
        sampler.log_likelihood(x[:, :, :4])
    _model, _directory, vae = exported("vae")
    with pytest.raises(NotImplementedError, match="vae graphs have no likelihood graph"):
        vae.log_likelihood(x)


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "match"),
    [
        ("cvae", {}, ValueError, "class-conditional: labels are required"),
        ("cvae", {"labels": [0, 1]}, ValueError, r"labels must be one int or 4 ints, got shape \(2,\)"),
        ("cvae", {"labels": [[0, 1, 2, 0]]}, ValueError, r"one int or 4 ints, got shape \(1, 4\)"),
        ("cvae", {"labels": [0, 1, 3, 0]}, ValueError, r"labels must lie in \[0, 3\), got 0\.\.3"),
        ("cvae", {"labels": -1}, ValueError, r"labels must lie in \[0, 3\), got -1$"),
        # Ranges are checked on the labels as given: cast to int64 first, 2**64 - 1 read as -1.
        ("cvae", {"labels": 2**64 - 1}, ValueError, r"lie in \[0, 3\), got 18446744073709551615$"),
        ("cvae", {"labels": [0, 1, 2, 2**64 - 1]}, ValueError, r"lie in \[0, 3\), got 0\.\.18446744073709551615"),
        ("cvae", {"labels": 10**30}, ValueError, r"lie in \[0, 3\), got 10{30}$"),
        ("cvae", {"labels": [0.5, 1, 2, 0]}, ValueError, "labels must be integers"),
        ("cvae", {"labels": True}, ValueError, "labels must be integers"),
        ("vae", {"labels": 1}, ValueError, "vae model is unconditional: it takes no labels"),
        ("pixelrnn_diagonal", {}, ValueError, "pixelrnn model is class-conditional: labels are required"),
        ("pixelrnn_row", {"labels": [0, 0, 0, 0]}, ValueError, "pixelrnn model is unconditional"),
        ("vae", {"temperature": 0.0}, ValueError, r"temperature must be in \[0.001, 100\], got 0.0"),
        ("vae", {"temperature": -1.0}, ValueError, r"temperature must be in \[0.001, 100\]"),
        ("pixelrnn_row", {"temperature": 1e-40}, ValueError, r"temperature must be in \[0.001, 100\], got 1e-40"),
        ("vae", {"temperature": 101.0}, ValueError, r"temperature must be in \[0.001, 100\], got 101.0"),
        ("vae", {"n": 0}, ValueError, "n must be >= 1, got 0"),
        ("vae", {"n": 2.0}, TypeError, "n must be an integer"),
        ("vae", {"start": -1}, ValueError, "start must be >= 0, got -1"),
        ("vae", {"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63-1\]"),
        ("vae", {"seed": "7"}, TypeError, "seed must be an integer"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(case, kwargs, error, match, exported):
    _model, _directory, sampler = exported(case)
    request = {"n": 4, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        sampler.sample(**request)


def test_concurrent_calls_give_the_sequential_images(exported):
    _model, _directory, sampler = exported("gan_conditional")
    seeds = list(range(8))
    sequential = [sampler.sample(3, s, labels=s % 3) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda s: sampler.sample(3, s, labels=s % 3), seeds))
    for a, b in zip(sequential, concurrent):
        np.testing.assert_array_equal(a, b)


# --- loading -----------------------------------------------------------------------------------
def _plain_onnx_model(path) -> None:
    """A valid ONNX graph with no genmodels metadata."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [x], [y])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _copy(src_dir, dst_dir, rename: str = "") -> None:
    for f in src_dir.glob("*.onnx"):
        shutil.copy(f, dst_dir / f"{rename}{f.name}")


def test_files_are_recognized_by_content_not_by_name(exported, tmp_path):
    model, directory, _sampler = exported("pixelrnn_diagonal")
    for i, f in enumerate(sorted(directory.glob("*.onnx"))):
        shutil.copy(f, tmp_path / f"graph{i}.onnx")
    sampler = OnnxSampler.from_dir(tmp_path)
    assert sampler.graphs == ["conditioning", "pixel_step", "row_step"]
    np.testing.assert_array_equal(sampler.sample(2, 1, labels=1), model.sample(2, labels=1, seed=1).numpy())


def test_from_dir_refuses_a_non_genmodels_graph_naming_it(exported, tmp_path):
    _model, directory, _sampler = exported("vae")
    _copy(directory, tmp_path)
    _plain_onnx_model(tmp_path / "stranger.onnx")
    with pytest.raises(ValueError, match=r"stranger\.onnx: not a genmodels graph"):
        OnnxSampler.from_dir(tmp_path)


def test_from_dir_refuses_a_file_that_is_not_onnx(exported, tmp_path):
    _model, directory, _sampler = exported("vae")
    _copy(directory, tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match=r"junk\.onnx: onnxruntime cannot load it"):
        OnnxSampler.from_dir(tmp_path)


def test_from_dir_refuses_mixed_families(exported, tmp_path):
    _vae, vae_dir, _ = exported("vae")
    _gan, gan_dir, _ = exported("gan")
    _copy(vae_dir, tmp_path, rename="a_")
    _copy(gan_dir, tmp_path, rename="b_")
    with pytest.raises(ValueError, match=r"b_sampler\.onnx and .*a_sampler\.onnx .*families are mixed"):
        OnnxSampler.from_dir(tmp_path)


def test_two_models_of_one_family_are_refused(exported, tmp_path):
    _gan, gan_dir, _ = exported("gan")
    _cgan, cgan_dir, _ = exported("gan_conditional")
    _copy(gan_dir, tmp_path, rename="a_")
    _copy(cgan_dir, tmp_path, rename="b_")
    with pytest.raises(ValueError, match=r"graphs of different models \(their 'conditional' metadata differs"):
        OnnxSampler.from_dir(tmp_path)


def test_graphs_of_two_exports_left_in_one_folder_are_refused(exported, tmp_path):
    # A second export without the likelihood graph left the first one's beside it: the folder
    # loaded as one model, its likelihood another weights'.
    first, first_dir, _ = exported("pixelrnn_row")
    _copy(first_dir, tmp_path)
    second = make_model("pixelrnn_row")
    with torch.no_grad():
        next(second.parameters()).add_(0.5)
    export_sampler(second, tmp_path, likelihood=False)
    with pytest.raises(ValueError, match=r"graphs of different models \(their 'weights' metadata differs"):
        OnnxSampler.from_dir(tmp_path)


def test_a_missing_graph_is_named(exported, tmp_path):
    _model, directory, _sampler = exported("pixelrnn_diagonal")
    _copy(directory, tmp_path)
    (tmp_path / "row_step.onnx").unlink()
    with pytest.raises(ValueError, match=r"lack the graph\(s\) \['row_step'\]"):
        OnnxSampler.from_dir(tmp_path)
    (tmp_path / "pixel_step.onnx").unlink()
    with pytest.raises(ValueError, match="lack the 'pixel_step' graph"):
        OnnxSampler.from_dir(tmp_path)


def test_an_empty_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no .onnx files"):
        OnnxSampler.from_dir(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        OnnxSampler.from_dir(tmp_path / "absent")


# --- CVAE analogies ----------------------------------------------------------------------------
def test_analogies_match_torch_on_grid_images_and_round_off_grid_ones(exported):
    model, _directory, sampler = exported("cvae")
    assert sampler.has_analogies and "analogies" in sampler.graphs
    x = sampler.sample(4, 2, labels=[0, 1, 2, 0])  # continuous decoder means: off the grid
    on_grid = np.rint(x * 255) / np.float32(255)
    labels = np.array([2, 0, 1, 1])
    got = sampler.analogies(x, labels)
    assert got.dtype == np.float32 and got.shape == (4, 3, 1, 8, 8)
    want = model.analogies(torch.from_numpy(on_grid), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # Off-grid input is rounded exactly as the grid image: the same images, bit for bit.
    np.testing.assert_array_equal(got, sampler.analogies(on_grid, labels))
    # Rows are independent (row 1 alone equals row 1 of the batch) and the classes differ.
    np.testing.assert_array_equal(sampler.analogies(x[1:2], 0), got[1:2])
    assert np.abs(got[:, 0] - got[:, 1]).max() > 1e-4
    assert sampler.analogies(x[:0], []).shape == (0, 3, 1, 8, 8)


@pytest.mark.parametrize(
    ("x", "labels", "error", "match"),
    [
        (np.zeros((2, 1, 8, 7), np.float32), [0, 1], ValueError, r"x must be \[n, 1, 8, 8\], got \(2, 1, 8, 7\)"),
        (np.zeros((1, 8, 8), np.float32), 0, ValueError, r"x must be \[n, 1, 8, 8\], got \(1, 8, 8\)"),
        (np.full((1, 1, 8, 8), 1.5, np.float32), 0, ValueError, r"x must hold values in \[0, 1\]"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), 0, ValueError, r"x must hold values in \[0, 1\]"),
        (np.zeros((2, 1, 8, 8), np.float32), [0, 3], ValueError, r"labels must lie in \[0, 3\), got 0\.\.3"),
        (np.zeros((2, 1, 8, 8), np.float32), [0], ValueError, r"labels must be one int or 2 ints"),
        (np.zeros((2, 1, 8, 8), np.float32), None, ValueError, "class-conditional: labels are required"),
    ],
)
def test_bad_analogy_requests_are_refused_with_the_reason(x, labels, error, match, exported):
    _model, _directory, sampler = exported("cvae")
    with pytest.raises(error, match=match):
        sampler.analogies(x, labels)


def test_analogies_without_the_graph_say_why(exported, tmp_path):
    _model, _directory, vae = exported("vae")
    assert not vae.has_analogies
    with pytest.raises(NotImplementedError, match=r"vae graphs have no analogies graph \(style analogies need a "
                                                  r"conditional VAE"):
        vae.analogies(np.zeros((1, 1, 8, 8), np.float32), None)
    # A CVAE exported before the analogies graph existed still samples, and says what to do.
    _cvae, directory, _sampler = exported("cvae")
    shutil.copy(directory / "sampler.onnx", tmp_path / "sampler.onnx")
    old = OnnxSampler.from_dir(tmp_path)
    assert not old.has_analogies and old.sample(2, 0, labels=1).shape == (2, 1, 8, 8)
    with pytest.raises(NotImplementedError, match="exported without it: export it again"):
        old.analogies(np.zeros((1, 1, 8, 8), np.float32), 0)
