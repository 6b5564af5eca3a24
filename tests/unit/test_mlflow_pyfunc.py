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

    def request_labels(self, labels, n, field="labels"):
        return None

    def sample(self, n, seed, labels=None, temperature=1.0):
        self.asked.append(n)
        return np.zeros((n, 1, 2, 2), np.float32)


def _pyfunc(sampler):
    """The MLflow model as ``load_context`` leaves it, over ``sampler``."""
    from genmodels.mlflow_model import OnnxSamplerModel

    model = OnnxSamplerModel()
    model.sampler = sampler
    return model


@pytest.fixture()
def model():
    return _pyfunc(_Sampler())


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


class _ConditionalSampler:
    """A conditional stand-in whose labels go through the real label check and show in its
    images (every pixel of image i is its label plus seed / 1000)."""

    def __init__(self) -> None:
        self.labels: list = []

    def request_labels(self, labels, n, field="labels"):
        from genmodels.checks import check_labels_array

        if labels is None:  # as OnnxSampler.request_labels: image i gets class i % num_classes
            labels = np.arange(n) % 10
        checked = check_labels_array(labels, n, family="cvae", conditional=True, num_classes=10, field=field)
        self.labels.append(checked)
        return checked

    def sample(self, n, seed, labels=None, temperature=1.0):
        return np.broadcast_to((labels + seed / 1000).astype(np.float32)[:, None, None, None], (n, 1, 2, 2)).copy()


@pytest.fixture()
def conditional():
    return _pyfunc(_ConditionalSampler())


def test_a_row_without_a_label_beside_rows_with_one_is_named(conditional):
    # pandas makes the column float64 with NaN in row 1: the check blamed row 0's 3.0 for its dtype.
    table = pd.DataFrame({"seed": [7, 8], "n": [2, 2], "label": [3, None]})
    assert table["label"].dtype == np.float64
    with pytest.raises(MlflowException) as err:
        conditional.predict(None, table)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.message.startswith("row 1: label missing")
    assert "give label on every row or leave the column out" in err.value.message
    assert conditional.sampler.labels == []  # refused before any row is sampled


def test_labels_in_a_float_column_sample_what_int_labels_do(conditional):
    ints = conditional.predict(None, pd.DataFrame({"seed": [7, 8], "n": [2, 3], "label": [3, 0]}))
    floats = conditional.predict(None, pd.DataFrame({"seed": [7, 8], "n": [2, 3], "label": [3.0, 0.0]}))
    assert [labels.tolist() for labels in conditional.sampler.labels] == [[3, 3], [0, 0, 0]] * 2
    for got, want in zip(floats["images"], ints["images"]):
        np.testing.assert_array_equal(got, want)
    assert float(ints["images"][0].max()) == pytest.approx(3.007)


def test_a_label_column_empty_on_every_row_is_a_column_left_out(conditional):
    out = conditional.predict(None, pd.DataFrame({"seed": [7], "n": [3], "label": [np.nan]}))
    assert conditional.sampler.labels[0].tolist() == [0, 1, 2]  # image i gets class i, as with no column
    assert len(out["images"][0]) == 3


def test_a_labels_column_the_apis_name_is_refused_naming_label(conditional):
    with pytest.raises(MlflowException, match=r"the class column is 'label' \(one class per row\), not 'labels'"):
        conditional.predict(None, pd.DataFrame({"seed": [7], "n": [2], "labels": [3]}))
    assert conditional.sampler.labels == []  # nothing sampled


def test_a_non_integral_float_label_is_refused_naming_its_row(conditional):
    with pytest.raises(MlflowException, match=r"^row 1: label must be an integer, got dtype float64$"):
        conditional.predict(None, pd.DataFrame({"seed": [7, 8], "n": [1, 1], "label": [3.0, 2.5]}))


class _BrokenSampler(_Sampler):
    """A sampler whose call fails with a programming error (a signature the pyfunc's call does
    not match), as OnnxSampler.request_labels did before it took ``field``."""

    def request_labels(self, labels, n):
        return None


def test_a_fault_of_the_models_code_is_not_answered_as_the_rows_bad_input():
    # Caught as a TypeError, it reached an HTTP client as a 400 "row 0: ... takes 3 positional
    # arguments but 4 were given", blaming the row for the server's bug.
    with pytest.raises(TypeError, match="positional argument"):
        _pyfunc(_BrokenSampler()).predict(None, pd.DataFrame({"seed": [1], "n": [2]}))


@pytest.mark.parametrize(("column", "value", "message"), [
    ("seed", 1.5, r"^row 0: seed must be an integer, got float"),
    ("temperature", "hot", r"^row 0: could not convert string to float"),
    ("temperature", pd.Timestamp(0), r"^row 0: temperature must be a number, got Timestamp"),
], ids=["float-seed", "string-temperature", "timestamp-temperature"])
def test_a_seed_or_temperature_of_the_wrong_type_is_still_the_rows_bad_input(model, column, value, message):
    table = pd.DataFrame({"seed": [1], "n": [2]})
    table[column] = [value]
    with pytest.raises(MlflowException, match=message) as err:
        model.predict(None, table)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert model.sampler.asked == []
