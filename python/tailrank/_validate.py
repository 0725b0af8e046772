"""Input checks shared by the public classes: one place per idea."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import LimitError

_MAX_ID = 2**63 - 1


def as_ids(ids: Any, name: str = "ids") -> npt.NDArray[np.uint64]:
    """Converts ids to a contiguous uint64 array; ids must be integers in [0, 2**63-1]."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got a {arr.ndim}-D array")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers (int64 or uint64), got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(arr.min())}")
    if arr.dtype.kind == "u" and int(arr.max()) > _MAX_ID:
        raise ValueError(f"{name} must be <= 2**63-1, got {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def as_float_matrix(x: Any, dim: int, name: str) -> tuple[npt.NDArray[np.float32], bool]:
    """Converts one vector [dim] or a batch [n, dim] to contiguous float32 [n, dim], refusing
    NaN, infinities and values beyond the float32 range.

    Returns the matrix and whether the input was a single vector.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric (float32 preferred), got dtype {arr.dtype}")
    single = arr.ndim == 1
    if single:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape [n, {dim}] (or [{dim}] for one vector), got shape {list(np.shape(x))}"
        )
    if arr.dtype == np.float32:
        # The hot path (a float32 query): NaN/inf rows are refused by the core without the GIL.
        return np.ascontiguousarray(arr), single
    # Overflow to inf is reported below as a ValueError, not as numpy's cast RuntimeWarning.
    with np.errstate(over="ignore"):
        mat = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        what = "NaN or infinite values" if not np.isfinite(arr[row]).all() else "values beyond the float32 range"
        raise ValueError(f"{name} must be finite: row {row} has {what}")
    return mat, single


def as_token_ids(x: Any, name: str) -> npt.NDArray[np.int32]:
    """Converts a sequence of token ids to contiguous int32, refusing negatives and non-integers."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got a {arr.ndim}-D array")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > 2**31 - 1:
        raise ValueError(f"{name} holds token ids outside [0, 2**31-1]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Checks an integer knob (bool refused) is >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def existing_file(path: Any) -> str:
    """The path as a string; FileNotFoundError if nothing is there (damage is CorruptFileError)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no such file: {p}")
    return p


def check_text(text: Any, name: str, *, max_chars: int | None = None, hint: str = "") -> str:
    """``text`` when the tokenizers and the core can take it, else a typed error naming ``name``.

    TypeError if it is not a ``str``; ValueError if it does not encode as UTF-8 (a lone
    surrogate, which JSON's ``\\ud800`` escapes can carry); :class:`LimitError` if it is longer
    than ``max_chars`` (``hint`` says which setting raises it). NUL is a character like any other.
    """
    if not isinstance(text, str):
        extra = " (decode bytes as UTF-8 first)" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{name} must be a str, got {type(text).__name__}{extra}")
    if max_chars is not None and len(text) > max_chars:
        raise LimitError(f"{name} has {len(text)} characters; the limit is {max_chars}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} is not valid Unicode (lone surrogate at {e.start}); decode bytes as UTF-8 first"
        ) from None
    return text
