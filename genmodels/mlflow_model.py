"""The MLflow pyfunc of a registered genmodels sampler, logged as *model code*: MLflow runs this
file when it loads the model, so loading never unpickles anything.

Input: a table (pandas DataFrame; ``dataframe_split``/``dataframe_records`` over HTTP), one row
per request, with the fields of ``POST /v1/models/{name}/samples`` (but ``label``, one class per
row, where the API has ``labels``; a ``labels`` column is refused naming the right one):

- ``seed`` (int, required), ``n`` (int in [1, 256], required; at most 256 over all the rows of
  one call, which one process answers at once);
- ``label`` (int in [0, num_classes), conditional models only; give it on every row or leave the
  column out: then image i of a conditional model gets class i % num_classes, as in the API). A
  table where some rows lack it is refused naming those rows; integral floats (``3.0``, what pandas
  makes of an int column with gaps) are read as ints, other floats refused;
- ``temperature`` (float in [0.001, 100] (``genmodels.checks.MIN_TEMPERATURE``,
  ``MAX_TEMPERATURE``), default 1.0; a float column: ``1.0``, not ``1``).

They are columns only: ``params`` that set any of them (``predict(df, params={"temperature": 0.8})``)
are refused naming them, not dropped.

Output: a DataFrame with one row per input row and one column ``images``: float32
[n, C, H, W] in [0, 1]; served as JSON, ``{"predictions": [{"images": [[[[...]]]]}, ...]}``,
each row's ``images`` the same numbers as the API's ``"format": "array"`` answer for the same
seed, n, label and temperature. The ONNX graphs are the model's artifacts and
:class:`genmodels.sampling.OnnxSampler` draws the noise and runs them, so the images are those of
torch, of the serving API and of bulk jobs. The model ships the part of ``genmodels`` it needs
as ``code_paths``: it loads where genmodels is not installed.
"""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from genmodels.checks import MAX_REQUEST_SAMPLES as MAX_SAMPLES
from genmodels.checks import check_temperature
from genmodels.noise import check_seed


class OnnxSamplerModel(PythonModel):
    def load_context(self, context) -> None:
        from genmodels.sampling import OnnxSampler

        self.sampler = OnnxSampler(sorted(context.artifacts.values()))

    # A DataFrame hint is one MLflow infers no schema from (the logged signature stays the one
    # in force) and it stops MLflow asking for type hints on every log and load.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        table = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        given = sorted(name for name, value in (params or {}).items() if value is not None)
        if given:
            raise _bad_input(f"params {given}: give seed, n, label and temperature as columns of the input table "
                             "(one row per request), not as params")
        if "labels" in table.columns:
            raise _bad_input("the class column is 'label' (one class per row), not 'labels' (the serving API's "
                             "field): rename the column")
        missing = [c for c in ("seed", "n") if c not in table.columns]
        if missing:
            raise _bad_input(f"the input table needs the columns {missing} (columns: seed, n, optional label "
                             f"and temperature; one row per request)")
        rows = table.to_dict("records")
        total = 0
        for i, row in enumerate(rows):
            try:
                total += _check_n(row["n"])
            except (TypeError, ValueError) as exc:
                raise _bad_input(f"row {i}: {exc}") from None
        # Checked before any row is sampled: every row's images are held until the call answers,
        # so the rows together, not each alone, must fit what one request may ask.
        if total > MAX_SAMPLES:
            raise _bad_input(f"the {len(rows)} rows ask for {total} samples in all (the sum of n), at most "
                             f"{MAX_SAMPLES} per call: split the rows over several calls")
        _read_labels(rows)
        images = []
        for i, row in enumerate(rows):
            try:
                images.append(self._sample(row))
            except ValueError as exc:  # the checks' refusals; anything else is a fault of this model's code
                raise _bad_input(f"row {i}: {exc}") from None
        return pd.DataFrame({"images": images}, index=table.index)

    def _sample(self, row: dict) -> np.ndarray:
        s = self.sampler
        n, seed = _check_n(row["n"]), _check_seed(row["seed"])
        temperature = row.get("temperature")
        if temperature is None or (isinstance(temperature, float) and math.isnan(temperature)):
            temperature = 1.0  # the API's default; a NaN is a row that left it out
        check_temperature(temperature)
        return s.sample(n, seed, labels=s.request_labels(row.get("label"), n, "label"), temperature=float(temperature))


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer, got {n!r}")
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be in [1, {MAX_SAMPLES}], got {n}")
    return int(n)


def _check_seed(seed) -> int:
    # check_seed refuses a non-integer with a TypeError: the row's defect, a ValueError here like
    # every other refusal (a TypeError from the sampling itself is a bug, not the caller's input).
    try:
        return check_seed(seed)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _absent(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _read_labels(rows: list[dict]) -> None:
    """Each row's ``label`` as the sampler takes it, in place: None on every row or on none (else
    the rows without one are refused), and integral floats as ints. A ``label`` column with gaps
    reaches predict() as float64 (NaN in the gaps): read as it stands, every row's label would be
    refused as a float, blaming the first row rather than the ones without a label."""
    if not rows or "label" not in rows[0]:
        return
    missing = [i for i, row in enumerate(rows) if _absent(row["label"])]
    if len(missing) == len(rows):
        for row in rows:
            row["label"] = None  # as if the column were left out
        return
    if missing:
        named = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise _bad_input(f"{'row' if len(missing) == 1 else 'rows'} {named}: label missing while other rows give "
                         "one; give label on every row or leave the column out")
    for row in rows:
        label = row["label"]
        # A non-integral float stays as it is: the sampler's label check refuses it, and predict()
        # names its row.
        if isinstance(label, (float, np.floating)) and float(label).is_integer():
            row["label"] = int(label)


def _bad_input(message: str) -> MlflowException:
    # An MlflowException with this code reaches an HTTP client as a 400 with the message; any
    # other exception becomes a generic "unexpected error".
    return MlflowException.invalid_parameter_value(message)


mlflow.models.set_model(OnnxSamplerModel())
