"""Completion over the exported graphs: OnnxSampler completes exactly as torch does on the same
noise (PixelRNN from its step graphs, the mixture from its ``complete`` graph), with the same
seeds, batching invariance and refusals; check_parity covers the completion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import _perturb_largest_initializer
from tiny_models import make_model

from genmodels.export import ExportParityError, check_parity, export_sampler, read_metadata
from genmodels.models.base import make_noise_tensors
from genmodels.sampling import OnnxSampler

COMPLETING = ["pixelrnn_row", "pixelrnn_diagonal", "mixture_binary", "mixture_8bit"]
CHECKER = np.add.outer(np.arange(8), np.arange(8)) % 3 == 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            model = make_model(case)
            directory = tmp_path_factory.mktemp(case)
            files = export_sampler(model, directory)
            cache[case] = (model, files, OnnxSampler(files, intra_op_num_threads=1))
        return cache[case]

    return get


def requests(model):
    """(known, temperature) pairs: nothing known, half, everything, and a mask where taken."""
    return [(3, 1.0), (3, 0.6), (0, 1.0), (8, 1.0)] + ([(CHECKER, 0.8)] if model.completes_any_mask else [])


@pytest.mark.parametrize("case", COMPLETING)
def test_onnx_completion_equals_torch_on_the_same_noise(case, exported):
    model, _files, runtime = exported(case)
    assert runtime.can_complete and runtime.completes_any_mask == model.completes_any_mask
    labels = torch.tensor([2, 0]) if model.conditional else None
    x = model.sample(2, labels=labels, seed=4)
    noise = make_noise_tensors(model.noise_spec(), 6, 6)  # 3 completions per image
    for known, temperature in requests(model):
        with torch.no_grad():
            want = model.complete_from_noise(x, known, noise, labels, temperature).numpy()
        got = runtime.complete_from_noise(x.numpy(), known, {k: v.numpy() for k, v in noise.items()},
                                          None if labels is None else labels.numpy(), temperature)
        assert got.dtype == np.float32 and got.shape == (2, 3, *model.image.shape)
        # Levels are integers: the completion is exactly torch's, bytes and all.
        np.testing.assert_array_equal(got, want)
        assert got.tobytes() == want.tobytes()
        if not (isinstance(known, int) and known == 8):  # not vacuous: the draws differ
            assert not np.array_equal(got[:, 0], got[:, 1])


@pytest.mark.parametrize("case", COMPLETING)
def test_onnx_complete_matches_model_complete_whatever_the_batching(case, exported):
    model, _files, runtime = exported(case)
    labels = [1, 2, 0] if model.conditional else None
    x = model.sample(3, labels=labels, seed=9)
    known = CHECKER if model.completes_any_mask else 5
    got = runtime.complete(x.numpy(), known, 4, seed=21, labels=labels)
    np.testing.assert_array_equal(got, model.complete(x, known, 4, seed=21, labels=labels).numpy())
    one = runtime.complete(x[2].numpy(), known, 2, seed=21, labels=None if labels is None else labels[2], start=2)
    np.testing.assert_array_equal(one, got[2, 2:])
    mask = runtime.completion_mask(known)
    np.testing.assert_array_equal(got[..., mask], np.broadcast_to(x.numpy()[:, None][..., mask], got[..., mask].shape))


@pytest.mark.parametrize("case", ["vae", "cvae", "gan"])
def test_runtime_of_a_family_without_completion_says_so(case, exported):
    _model, _files, runtime = exported(case)
    assert not runtime.can_complete
    with pytest.raises(NotImplementedError, match=f"the {runtime.family} family has no exact image completion"):
        runtime.complete(np.zeros((1, 8, 8), np.float32), 4, 2, seed=0)


def test_runtime_refuses_bad_completion_requests(exported):
    _model, _files, rnn = exported("pixelrnn_row")
    _model, _files, mix = exported("mixture_binary")
    x = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="known rows only"):
        rnn.complete(x, CHECKER, 2, seed=0)
    with pytest.raises(ValueError, match=r"known rows must be in \[0, 8\]"):
        mix.complete(x, -1, 2, seed=0)
    with pytest.raises(ValueError, match=r"x must be \[B >= 1, 1, 8, 8\]"):
        mix.complete(np.zeros((1, 7, 8), np.float32), 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        rnn.complete(x + 2, 3, 2, seed=0)


def test_mixture_exported_without_the_complete_graph(exported):
    model, files, _runtime = exported("mixture_binary")
    sampler_only = [f for f in files if read_metadata(f)["graph"] == "sampler"]
    runtime = OnnxSampler(sampler_only)
    assert not runtime.can_complete
    assert runtime.sample(2, seed=0).shape == (2, 1, 8, 8)  # still samples
    with pytest.raises(NotImplementedError, match="no complete graph.*export again"):
        runtime.complete(np.zeros((1, 8, 8), np.float32), 3, 2, seed=0)
    with pytest.raises(ExportParityError, match=r"mixture: the files lack the 'complete' graph"):
        check_parity(model, sampler_only)


def test_corrupted_complete_graph_fails_parity(exported, tmp_path):
    model, files, _runtime = exported("mixture_binary")
    by_graph = {read_metadata(f)["graph"]: f for f in files}
    bad = tmp_path / "complete.onnx"
    # The largest float initializer of this graph is the float64 table's neighbour: perturb
    # the Bernoulli probabilities the unknown pixels are drawn from.
    _perturb_largest_initializer(by_graph["complete"], bad, delta=0.6)
    with pytest.raises(ExportParityError, match=r"mixture graph 'complete' at batch size 1"):
        check_parity(model, [by_graph["sampler"], bad])
