"""The one check of each sampling input (labels, temperature, known pixels), shared by the torch
models, the ONNX runtime, the API, bulk jobs and the MLflow model. numpy only: the runtimes that
serve exported graphs must not need torch to refuse a bad request."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

#: Limits of one online sampling request, the HTTP API's and the MLflow model's alike: a request
#: is answered by one replica in one call, so its size bounds that call's memory and latency.
#: MLflow's one call takes a table of requests (rows): the bound is on their sum of n.
MAX_REQUEST_SAMPLES = 256
#: Sampling temperatures allowed everywhere. The floor keeps logits / T finite in float32 (below
#: ~1e-36 they overflow and every draw became level 0); at 1e-3 sampling is already the argmax.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
#: The largest class label any input may name (bulk job specs store labels as int32-range ints):
#: a schema bounds its label fields by it, so a label beyond every model's classes is refused
#: naming this bound rather than as whatever a cast of it would read.
MAX_LABEL = 2**31 - 1

__all__ = ["MAX_LABEL", "MAX_REQUEST_SAMPLES", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "check_labels_array",
           "check_temperature", "completion_mask_array", "require_completion"]


def _is_tensor(value: Any) -> bool:
    # A torch tensor can only reach here from a process that imported torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def check_temperature(temperature: Any) -> None:
    """Refuse a sampling temperature outside [MIN_TEMPERATURE, MAX_TEMPERATURE] (NaN included).
    Tensors pass unchecked: they are graph inputs during ONNX export, where reading their value
    would freeze it into the graph."""
    if _is_tensor(temperature):
        return
    try:
        value = float(temperature)
    except TypeError:  # None, a timestamp: the caller's value, refused as every other one is
        raise ValueError(f"temperature must be a number, got {temperature!r}") from None
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature}")


def check_labels_array(labels: Any, n: int, *, family: str, conditional: bool, num_classes: int,
                       field: str = "labels") -> np.ndarray | None:
    """The one label check of torch models and of the ONNX runtime: None for an unconditional
    model, else one int for all ``n`` rows or ``n`` ints in [0, num_classes) -> int64 [n].
    Floats and bools are refused rather than truncated to a class. ``field``: what the refusal calls
    the labels (an API request's ``label``)."""
    plural = field.endswith("s")  # "labels" (the API's field), or one class: "label", "--label"
    if labels is None:
        if conditional:
            raise ValueError(f"{family} model is class-conditional: {field} {'are' if plural else 'is'} required")
        return None
    if not conditional:
        raise ValueError(f"{family} model is unconditional: it takes no {field}")
    if _is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        # numpy reads ints beyond int64 as Python objects, or as floats beside smaller ones: still
        # integers, which the range check below refuses naming them, not a dtype they never had.
        values = np.asarray(labels, dtype=np.object_)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values.flat):
            arr = values
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.object_
                                     or arr.size == 0):
        raise ValueError(f"{field} must be {'integers' if plural else 'an integer'}, got dtype {arr.dtype}")
    if arr.ndim != 0 and (arr.ndim != 1 or arr.shape[0] != n):
        raise ValueError(f"{field} must be one int or {n} ints, got shape {arr.shape}")
    # On the values as given: cast to int64 first, 2**64 - 1 would read as -1.
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
        low, high = int(arr.min()), int(arr.max())
        raise ValueError(f"{field} must lie in [0, {num_classes}), got {low if low == high else f'{low}..{high}'}")
    arr = arr.astype(np.int64)
    return np.full(n, arr, dtype=np.int64) if arr.ndim == 0 else arr


def require_completion(family: str, can_complete: bool) -> None:
    """The one refusal of families without an exact completion (torch models, ONNX runtime, API)."""
    if not can_complete:
        raise NotImplementedError(
            f"the {family} family has no exact image completion: only pixelrnn (known rows) and "
            f"mixture (any known pixels) can complete an image")


def completion_mask_array(known: Any, *, family: str, height: int, width: int, any_mask: bool) -> np.ndarray:
    """The one check of ``known`` (torch models and the ONNX runtime): a number of known rows
    in [0, height], or (families completing any mask) a bool mask [height, width] ->
    bool [height, width], True = known."""
    if isinstance(known, (int, np.integer)) and not isinstance(known, (bool, np.bool_)):
        if not 0 <= int(known) <= height:
            raise ValueError(f"known rows must be in [0, {height}], got {int(known)}")
        mask = np.zeros((height, width), dtype=np.bool_)
        mask[: int(known)] = True
        return mask
    if not any_mask:
        raise ValueError(f"the {family} family completes after known rows only (an int in [0, {height}]), "
                         f"got {type(known).__name__}: a mask of known pixels needs the mixture")
    arr = known.detach().cpu().numpy() if _is_tensor(known) else np.asarray(known)
    if arr.dtype != np.bool_ or arr.shape != (height, width):
        raise ValueError(f"a mask of known pixels must be bool [{height}, {width}], got {arr.dtype} {arr.shape}")
    return arr.copy()
