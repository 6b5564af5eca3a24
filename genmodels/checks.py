"""The one check of each sampling input (labels, temperature, known pixels), shared by the torch
models, the ONNX runtime, the API, bulk jobs and the MLflow model. numpy only: the runtimes that
serve exported graphs must not need torch to refuse a bad request."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

#: Limits of one online sampling request, the HTTP API's and the MLflow model's alike: a request
#: is answered by one replica in one call, so its size bounds that call's memory and latency.
MAX_REQUEST_SAMPLES = 256
#: Sampling temperatures allowed everywhere. The floor keeps logits / T finite in float32 (below
#: ~1e-36 they overflow and every draw became level 0); at 1e-3 sampling is already the argmax.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0

__all__ = ["MAX_REQUEST_SAMPLES", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "check_labels_array", "check_temperature", "completion_mask_array", "require_completion"]


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
    if not MIN_TEMPERATURE <= float(temperature) <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature}")


def check_labels_array(labels: Any, n: int, *, family: str, conditional: bool, num_classes: int) -> np.ndarray | None:
    """The one label check of torch models and of the ONNX runtime: None for an unconditional
    model, else one int for all ``n`` rows or ``n`` ints in [0, num_classes) -> int64 [n].
    Floats and bools are refused rather than truncated to a class."""
    if labels is None:
        if conditional:
            raise ValueError(f"{family} model is class-conditional: labels are required")
        return None
    if not conditional:
        raise ValueError(f"{family} model is unconditional: it takes no labels")
    if _is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=np.int64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be one int or {n} ints, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {arr.min()}..{arr.max()}")
    return arr


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
