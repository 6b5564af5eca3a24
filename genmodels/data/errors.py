"""The one error type of bad input data."""

from __future__ import annotations


class DataError(ValueError):
    """Input data is malformed or inconsistent; the message names the file and the defect."""
