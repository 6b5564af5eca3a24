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
