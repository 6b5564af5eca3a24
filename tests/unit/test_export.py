"""ONNX export: every family's graphs pass onnx.checker and match torch at several batch sizes;
a corrupted graph or perturbed weights are caught by check_parity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import BINARY, SMALL_GAN, SMALL_RNN, make_model

from genmodels.export import (
    ExportError,
    ExportParityError,
    OnnxPixelRNNSampler,
    check_parity,
    export_sampler,
    read_metadata,
)
from genmodels.models import build_model
from genmodels.models.gan import GAN
from genmodels.models.base import make_noise_tensors
from genmodels.sampling import _session

# case (see tiny_models.CASES) -> the graphs its export writes
GRAPHS = {
    "vae": {"sampler"},
    "cvae": {"sampler", "analogies"},
    "cvae_class_prior": {"sampler", "analogies"},
    "cvae_film": {"sampler", "analogies"},
    # A latent mixture's walk: the sampler split at the latent (interpolations decode between two latents).
    "vae_mixture": {"sampler", "latent", "decode"},
    "cvae_mixture": {"sampler", "latent", "decode", "analogies"},
    "gan": {"sampler"},
    "gan_conditional": {"sampler"},
    "mixture_binary": {"sampler", "complete"},
    "mixture_8bit": {"sampler", "complete"},
    "pixelrnn_row": {"pixel_step", "likelihood"},
    "pixelrnn_diagonal": {"pixel_step", "row_step", "conditioning"},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (model, files): each family exported once for the whole module."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            model = make_model(case)
            cache[case] = (model, export_sampler(model, tmp_path_factory.mktemp(case)))
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(GRAPHS))
def test_every_family_exports_and_matches_torch(case, exported):
    model, files = exported(case)
    graphs = {read_metadata(f)["graph"] for f in files}
    assert graphs == GRAPHS[case]
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)
        assert read_metadata(f)["family"] == model.family
    check_parity(model, files, batch_sizes=(1, 5))


def test_sampler_graph_interface(exported):
    _model, (path,) = exported("gan_conditional")
    proto = onnx.load(str(path))
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert list(inputs) == ["z", "labels", "temperature"]
    assert inputs["labels"].elem_type == onnx.TensorProto.INT64
    assert inputs["temperature"].elem_type == onnx.TensorProto.FLOAT
    assert len(inputs["temperature"].shape.dim) == 0
    assert inputs["z"].shape.dim[0].dim_param  # symbolic batch axis
    assert [o.name for o in proto.graph.output] == ["images"]
    meta = read_metadata(path)
    assert json.loads(meta["noise"]) == {"z": {"shape": [4], "distribution": "normal"}}
    assert json.loads(meta["conditional"]) is True


def test_file_path_puts_first_graph_there_and_the_rest_beside_it(tmp_path):
    model = make_model("pixelrnn_diagonal")
    files = export_sampler(model, tmp_path / "m.onnx")
    assert [f.name for f in files] == ["m.onnx", "m.row_step.onnx", "m.conditioning.onnx"]
    assert read_metadata(files[0])["graph"] == "pixel_step"


@pytest.mark.parametrize("case", ["pixelrnn_row", "pixelrnn_diagonal"])
def test_onnx_pixelrnn_sampler_reproduces_sample_cached_exactly(case, exported):
    model, files = exported(case)
    sampler = OnnxPixelRNNSampler(files)
    noise = make_noise_tensors(model.noise_spec(), seed=3, count=4)
    labels = torch.tensor([0, 1, 2, 1]) if model.conditional else None
    for temperature in (1.0, 0.5):
        want = model.sample_cached(noise, labels, temperature).numpy()
        got = sampler.sample(noise["u"].numpy(), None if labels is None else labels.numpy(), temperature)
        np.testing.assert_array_equal(got, want)
        assert 0 < want.mean() < 1  # both levels occur: the comparison is not vacuous
    if model.conditional:
        with pytest.raises(ValueError, match="labels are required"):
            sampler.sample(noise["u"].numpy())


@pytest.mark.parametrize("input_width", [None, 11])
def test_row_lstm_graphs_sample_exactly_without_input_width_in_their_metadata(input_width, tmp_path):
    # Graphs exported before input_width existed carry no such key; the runtime reads the kernel's
    # shape from the pixel_step graph itself, so a wide kernel's graph samples exactly without it too.
    torch.manual_seed(0)
    model = build_model("pixelrnn", BINARY, **dict(SMALL_RNN, layer="row", input_width=input_width)).eval()
    files = export_sampler(model, tmp_path)
    sessions = {read_metadata(f)["graph"]: _session(f) for f in files}
    meta = read_metadata(next(f for f in files if read_metadata(f)["graph"] == "pixel_step"))
    net = json.loads(meta["pixelrnn"])
    assert net.pop("input_width") == (input_width or net["input_kernel"])
    sampler = OnnxPixelRNNSampler._from_sessions(sessions, {**meta, "pixelrnn": json.dumps(net)})
    assert sampler.input_pad == model.config.input_pad == (3, (input_width or 7) // 2)
    noise = make_noise_tensors(model.noise_spec(), seed=4, count=3)
    want = model.sample_cached(noise).numpy()
    np.testing.assert_array_equal(sampler.sample(noise["u"].numpy()), want)
    assert 0 < want.mean() < 1


def _perturb_largest_initializer(path, out_path, delta: float) -> None:
    proto = onnx.load(str(path))
    init = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
               key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(delta), init.name))
    onnx.save_model(proto, str(out_path))


@pytest.mark.parametrize("case", ["vae", "pixelrnn_row"])
def test_corrupted_weights_in_the_graph_fail_parity(case, exported, tmp_path):
    model, files = exported(case)
    bad = tmp_path / files[0].name
    _perturb_largest_initializer(files[0], bad, delta=1.0)
    with pytest.raises(ExportParityError, match=rf"{model.family} graph '\w+' at batch size 1.*max abs error"):
        check_parity(model, [bad, *files[1:]])


def test_structurally_broken_graph_fails_the_checker(exported, tmp_path):
    model, (path,) = exported("gan")
    proto = onnx.load(str(path))
    proto.graph.node[len(proto.graph.node) // 2].input[0] = "no_such_tensor"
    bad = tmp_path / "broken.onnx"
    onnx.save_model(proto, str(bad))
    with pytest.raises(ExportParityError, match="fails onnx.checker"):
        check_parity(model, [bad])


@pytest.mark.parametrize("case", ["gan", "mixture_binary", "pixelrnn_diagonal"])
def test_weights_changed_after_export_fail_parity(case, exported):
    model, files = exported(case)
    model = make_model(case)  # a private copy: the cached one serves other tests
    with torch.no_grad():
        if model.family == "mixture":
            model.probs.copy_(1.0 - model.probs)
        else:
            for p in model.parameters():
                if p.numel() > 1:
                    p.copy_(p.flip(-1) * 3.0)
    with pytest.raises(ExportParityError, match=rf"{model.family} graph"):
        check_parity(model, files)


def test_8bit_mixture_tolerates_one_grey_level_and_no_more(exported):
    _model, files = exported("mixture_8bit")
    shifted = make_model("mixture_8bit")
    with torch.no_grad():
        shifted.means.add_(2.0 / 255)  # two grey levels up (except where clamped at 255)
    with pytest.raises(ExportParityError, match="off by more than 1 level"):
        check_parity(shifted, files, batch_sizes=(5,))


class _PerRowGAN(GAN):
    """A sampler with a Python loop over the batch: export can only freeze the batch size."""

    def sample_from_noise(self, noise, labels=None, temperature=1.0):
        z = noise["z"]
        return torch.stack([self.generator(z[i : i + 1] * temperature)[0] for i in range(z.shape[0])])


def test_export_refuses_a_graph_whose_batch_axis_froze(tmp_path):
    config = build_model("gan", BINARY, **SMALL_GAN).config
    with pytest.raises(ExportError, match=r"froze the batch axis of input\(s\) \['z'\]"):
        export_sampler(_PerRowGAN(config).eval(), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-usable left behind


# --- CVAE analogies graph --------------------------------------------------------------------------
def test_cvae_analogies_graph_interface(exported):
    _model, files = exported("cvae")
    (path,) = [f for f in files if read_metadata(f)["graph"] == "analogies"]
    proto = onnx.load(str(path))
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert list(inputs) == ["x", "labels"]
    assert inputs["x"].elem_type == onnx.TensorProto.FLOAT
    assert inputs["labels"].elem_type == onnx.TensorProto.INT64
    assert inputs["x"].shape.dim[0].dim_param and inputs["labels"].shape.dim[0].dim_param
    assert [d.dim_value for d in inputs["x"].shape.dim[1:]] == [1, 8, 8]
    (out,) = proto.graph.output
    assert out.name == "images"
    assert [d.dim_value for d in out.type.tensor_type.shape.dim[1:]] == [3, 1, 8, 8]  # [batch, K, C, H, W]
    assert read_metadata(path)["family"] == "cvae"


def test_corrupted_analogies_graph_fails_parity(exported, tmp_path):
    model, files = exported("cvae")
    by_graph = {read_metadata(f)["graph"]: f for f in files}
    bad = tmp_path / "analogies.onnx"
    _perturb_largest_initializer(by_graph["analogies"], bad, delta=1.0)
    # The sampler graph still matches: the disagreement is the analogies graph's alone.
    with pytest.raises(ExportParityError, match=r"cvae graph 'analogies' at batch size 1.*max abs error"):
        check_parity(model, [by_graph["sampler"], bad])


def test_cvae_parity_needs_the_analogies_graph(exported):
    model, files = exported("cvae")
    sampler_only = [f for f in files if read_metadata(f)["graph"] == "sampler"]
    with pytest.raises(ExportParityError, match=r"cvae: the files lack the 'analogies' graph \(found \['sampler'\]\)"):
        check_parity(model, sampler_only)


# --- latent mixture: latent and decode graphs -------------------------------------------------------
def test_latent_and_decode_graph_interfaces(exported):
    _model, files = exported("cvae_mixture")
    by_graph = {read_metadata(f)["graph"]: onnx.load(str(f)) for f in files}
    latent, decode = by_graph["latent"].graph, by_graph["decode"].graph
    assert [i.name for i in latent.input] == [i.name for i in by_graph["sampler"].graph.input] == \
        ["z", "z_component", "labels", "temperature"]
    assert [o.name for o in latent.output] == ["latent"]
    assert [i.name for i in decode.input] == ["latent", "labels"] and [o.name for o in decode.output] == ["images"]
    _model, files = exported("vae_mixture")
    (path,) = [f for f in files if read_metadata(f)["graph"] == "decode"]
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["latent"]


def test_corrupted_decode_graph_fails_the_interpolation_parity(exported, tmp_path):
    model, files = exported("vae_mixture")
    by_graph = {read_metadata(f)["graph"]: f for f in files}
    bad = tmp_path / "decode.onnx"
    _perturb_largest_initializer(by_graph["decode"], bad, delta=1.0)
    # The sampler graph still matches: the disagreement is the walk's alone.
    with pytest.raises(ExportParityError, match=r"vae graph 'interpolate' at batch size 2.*max abs error"):
        check_parity(model, [by_graph["sampler"], by_graph["latent"], bad])


def test_latent_mixture_parity_needs_the_latent_and_decode_graphs(exported):
    model, files = exported("vae_mixture")
    sampler_only = [f for f in files if read_metadata(f)["graph"] == "sampler"]
    with pytest.raises(ExportParityError, match=r"vae: the files lack the 'latent' and 'decode' graphs"):
        check_parity(model, sampler_only)


def test_gan_exports_its_averaged_generator(tmp_path):
    """The EMA generator is what samples, so it is what the served graph must hold."""
    from genmodels.sampling import OnnxSampler

    model = make_model("gan")
    with torch.no_grad():  # a trained G that the average has not caught up with
        for p in model.generator.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    export_sampler(model, tmp_path)
    images = OnnxSampler.from_dir(tmp_path, intra_op_num_threads=1).sample(6, seed=3)
    noise = make_noise_tensors(model.noise_spec(), seed=3, count=6)
    np.testing.assert_allclose(images, model.generator_ema(noise["z"]).detach().numpy(), atol=1e-5)
    assert not np.allclose(images, model.generator(noise["z"]).detach().numpy(), atol=1e-3)


def test_parity_covers_every_class_of_a_conditional_model(tmp_path):
    """Fashion-MNIST has 10 classes; the default batches (1 and 5) label their rows 0..4 only. A
    graph that samples classes 5..9 unlike the model must fail parity all the same."""
    from genmodels.models.base import ImageSpec

    ten = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=10)
    torch.manual_seed(0)
    model = build_model("gan", ten, **dict(SMALL_GAN, conditional=True)).eval()
    files = export_sampler(model, tmp_path)
    check_parity(model, files)  # the graph as exported agrees
    with torch.no_grad():  # the model's classes 5..9 now differ from the graph's, 0..4 do not
        model.sampler.embed.weight[5:].mul_(-3.0)
    with pytest.raises(ExportParityError, match=r"gan graph 'sampler' at batch size"):
        check_parity(model, files)
