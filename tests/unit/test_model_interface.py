"""Behaviour every family gets from the shared interface."""

import pytest

from genmodels.models import build_model
from genmodels.models.base import ImageSpec


@pytest.mark.parametrize("family", ["vae", "gan", "mixture", "pixelrnn"])
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_refused_by_every_family(family, temperature):
    model = build_model(family, ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=2)).eval()
    with pytest.raises(ValueError, match=r"temperature must be in \[0.001, 100\]"):
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


@pytest.mark.parametrize("family", ["vae", "cvae", "gan"])
def test_conv_families_keep_channels_last_weights_through_a_checkpoint(family):
    # The layout is what puts oneDNN on its fast NHWC kernels (benchmarks/RESULTS.md); a
    # checkpoint saved and loaded again must not fall back to the slow one.
    import torch

    from genmodels.models import checkpoint_bytes, model_from_checkpoint

    image = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3)
    overrides = {"architecture": "conv", "conv_channels": (4, 8)} if family != "gan" else {}
    model = build_model(family, image, **overrides)
    loaded = model_from_checkpoint(checkpoint_bytes(model))
    for which in (model, loaded):
        convs = [p for p in which.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for (name, ours), theirs in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_a_damaged_checkpoint_read_as_bytes_is_named_by_where_it_was_read():
    import io
    import re

    import torch

    from genmodels.models import checkpoint_bytes, load_checkpoint, model_from_checkpoint

    data = checkpoint_bytes(build_model("vae", ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=2)))
    url = "s3://bucket/runs/digits/vae-quick/model.pt"
    for damaged in (data[: len(data) // 2], b"garbage"):
        with pytest.raises(ValueError, match=f"^{re.escape(url)}: not a loadable genmodels checkpoint"):
            load_checkpoint(damaged, where=url)
        with pytest.raises(ValueError, match=f"^{re.escape(url)}: not a loadable genmodels checkpoint"):
            model_from_checkpoint(damaged, where=url)
    foreign = io.BytesIO()
    torch.save({"format": "other"}, foreign)
    with pytest.raises(ValueError, match=f"^{re.escape(url)}: not a genmodels checkpoint"):
        load_checkpoint(foreign.getvalue(), where=url)
    assert load_checkpoint(data, where=url)["family"] == "vae"


def test_a_checkpoint_whose_config_or_weights_make_no_model_is_named_by_where_it_was_read():
    # What `genmodels sample --checkpoint` on such a file ended in: a KeyError or a RuntimeError's
    # traceback, not the CLI's one line.
    import io
    import re

    import torch

    from genmodels.models import checkpoint_dict, model_from_checkpoint

    image = ImageSpec(channels=1, height=4, width=4, levels=2, num_classes=2)
    good = checkpoint_dict(build_model("vae", image))
    url = "file:///runs/digits/vae-quick/model.pt"

    def saved(ckpt) -> bytes:
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        return buffer.getvalue()

    other_shape = {**good, "config": {**good["config"], "latent_dim": good["config"]["latent_dim"] + 1}}
    for ckpt, defect in [({k: v for k, v in good.items() if k != "family"}, "the checkpoint lacks ['family']"),
                         ({**good, "family": "flow"}, "its config does not build a model (unknown family 'flow'"),
                         ({**good, "config": {**good["config"], "bogus": 1}}, "its config does not build a model"),
                         (other_shape, "its weights do not fit its vae config (Error(s) in loading state_dict")]:
        with pytest.raises(ValueError, match=f"^{re.escape(url)}: {re.escape(defect)}"):
            model_from_checkpoint(saved(ckpt), where=url)
    assert model_from_checkpoint(saved(good), where=url).family == "vae"
