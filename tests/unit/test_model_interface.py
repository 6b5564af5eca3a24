"""Behaviour every family gets from the shared interface."""

import pytest

from genmodels.models import build_model
from genmodels.models.base import ImageSpec


@pytest.mark.parametrize("family", ["vae", "gan", "mixture", "pixelrnn"])
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_refused_by_every_family(family, temperature):
    model = build_model(family, ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=2)).eval()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.sample(2, seed=0, temperature=temperature)


@pytest.mark.parametrize("labels", [1.0, [0.5, 1.0], True, [True, False]], ids=["float", "floats", "bool", "bools"])
def test_torch_models_refuse_non_integer_labels_like_the_onnx_runtime(labels):
    # One check for both runtimes: a float or bool label is an error, never truncated to a class.
    import torch

    model = build_model("cvae", ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=3)).eval()
    with pytest.raises(ValueError, match="labels must be integers"):
        model.check_labels(labels, 2)
    with pytest.raises(ValueError, match="labels must be integers"):
        model.sample(2, labels=torch.as_tensor(labels), seed=0)


def test_torch_model_labels_from_ints_lists_and_tensors():
    import torch

    model = build_model("cvae", ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=3)).eval()
    for labels in (2, [2, 2], torch.tensor([2, 2]), torch.tensor(2, dtype=torch.int32)):
        checked = model.check_labels(labels, 2)
        assert checked.dtype == torch.int64 and checked.tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0\.\.3"):
        model.check_labels(torch.tensor([0, 3]), 2)
