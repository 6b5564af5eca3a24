"""The MLflow pyfunc's input checks (genmodels.mlflow_model), over a stand-in sampler: what one
call may ask, refused before anything is sampled. Loading and serving the logged model: the
integration tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from genmodels.checks import MAX_REQUEST_SAMPLES


class _Sampler:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def request_labels(self, labels, n):
        return None

    def sample(self, n, seed, labels=None, temperature=1.0):
        self.asked.append(n)
        return np.zeros((n, 1, 2, 2), np.float32)


@pytest.fixture()
def model():
    from genmodels.mlflow_model import OnnxSamplerModel

    model = OnnxSamplerModel()
    model.sampler = _Sampler()
    return model


def test_rows_asking_more_than_one_request_in_all_are_refused_before_any_is_sampled(model):
    # Each row alone is within the bound; 2000 such rows of one small request would be 131 MB.
    table = pd.DataFrame({"seed": [1, 2], "n": [MAX_REQUEST_SAMPLES, MAX_REQUEST_SAMPLES]})
    with pytest.raises(MlflowException) as err:
        model.predict(None, table)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert f"{2 * MAX_REQUEST_SAMPLES} samples in all" in err.value.message
    assert f"at most {MAX_REQUEST_SAMPLES} per call" in err.value.message
    assert model.sampler.asked == []


def test_rows_within_the_bound_in_all_are_each_sampled(model):
    half = MAX_REQUEST_SAMPLES // 2
    out = model.predict(None, pd.DataFrame({"seed": [1, 2], "n": [half, MAX_REQUEST_SAMPLES - half]}))
    assert model.sampler.asked == [half, MAX_REQUEST_SAMPLES - half]
    assert [len(images) for images in out["images"]] == [half, MAX_REQUEST_SAMPLES - half]


def test_a_bad_n_is_named_by_its_row_before_the_total(model):
    with pytest.raises(MlflowException, match=r"row 1: n must be in \[1, 256\], got 257"):
        model.predict(None, pd.DataFrame({"seed": [1, 1], "n": [2, 257]}))
    assert model.sampler.asked == []
