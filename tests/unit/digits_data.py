"""sklearn's 8x8 digits as binary model input, shared by the model tests."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from genmodels.models.base import ImageSpec

DIGITS = ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=10)


def binary_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits thresholded at half intensity, with their labels."""
    data = load_digits()
    x = torch.from_numpy((data.images >= 8).astype(np.float32)).unsqueeze(1)
    return x, torch.from_numpy(data.target).long()
