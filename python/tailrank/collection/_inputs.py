"""Validation of every kind of input the collection takes: one validator per kind.

A lone surrogate (a ``str`` that is not valid Unicode) is a ``ValueError`` wherever it appears:
in a text, an id, a metadata key or value, a query (and a :class:`FilterError`, itself a
``ValueError``, inside a filter).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from .._validate import as_float_matrix, check_text
from ..errors import DuplicateIdError

DocId = Union[int, str]
_INT64 = (-(2**63), 2**63)


def check_unicode(text: str, what: str) -> str:
    """``text`` if it encodes as UTF-8, else ValueError naming ``what`` and the position (the
    package's one string validator, :func:`tailrank._validate.check_text`)."""
    return check_text(text, what)


def check_query(query: Any) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    return check_unicode(query, "query")


def check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    docs = list(texts)
    for i, t in enumerate(docs):
        if not isinstance(t, str):
            hint = " (decode bytes as UTF-8 first)" if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"text {i} must be a str, got {type(t).__name__}{hint}")
        check_unicode(t, f"text {i}")
    return docs


def check_ids(ids: Any, n: int) -> list[DocId]:
    """Ids as ints in [0, 2**63) or strs, none twice; ``n >= 0`` also checks the count."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a sequence of ids, not a single string")
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    out = list(ids)
    if n >= 0 and len(out) != n:
        raise ValueError(f"got {len(out)} ids for {n} texts")
    for i, x in enumerate(out):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, str, np.integer)):
            raise TypeError(f"id {i} must be an int or a str, got {type(x).__name__}")
        if isinstance(x, (int, np.integer)) and not 0 <= int(x) < 2**63:
            raise ValueError(f"id {i} must be in [0, 2**63), got {x}")
        if isinstance(x, str):
            check_unicode(x, f"id {i}")
    out = [int(x) if isinstance(x, np.integer) else x for x in out]
    seen: set[tuple[type, Any]] = set()
    for x in out:
        key = (type(x), x)
        if key in seen:
            raise DuplicateIdError(f"id {x!r} is given twice")
        seen.add(key)
    return out


def check_metadata(metadata: Any, n: int) -> list[dict[str, Any]]:
    """One JSON-able dict per text (None: empty); keys non-empty strs; numbers finite and, when
    integers, within int64 (they are indexed for filters)."""
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, Mapping):
        raise TypeError("metadata must be a sequence with one dict per text")
    metas = list(metadata)
    if len(metas) != n:
        raise ValueError(f"got {len(metas)} metadata entries for {n} texts")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(metas):
        if m is None:
            out.append({})
            continue
        if not isinstance(m, Mapping):
            raise TypeError(f"metadata {i} must be a dict or None, got {type(m).__name__}")
        for key in m:
            if not isinstance(key, str) or not key:
                raise TypeError(f"metadata {i}: keys must be non-empty strings, got {key!r}")
        _check_json_value(m, f"metadata {i}", 0)
        out.append(dict(m))
    return out


def _check_json_value(v: Any, where: str, depth: int) -> None:
    if depth > 64:
        raise ValueError(f"{where} nests deeper than 64 levels")
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, str):
        check_unicode(v, f"{where} value")
    elif isinstance(v, int):
        if not _INT64[0] <= v < _INT64[1]:
            raise ValueError(f"{where}: integer {v} is outside int64 (store it as a string)")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise TypeError(f"{where} is not JSON-serializable: {v!r} is not a finite number")
    elif isinstance(v, Mapping):
        for key, x in v.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} is not JSON-serializable: key {key!r} is not a str")
            check_unicode(key, f"{where} key")
            _check_json_value(x, where, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _check_json_value(x, where, depth + 1)
    else:
        raise TypeError(f"{where} is not JSON-serializable: {type(v).__name__} value {v!r}")


def metadata_json(meta: Mapping[str, Any]) -> str:
    """The stored form of checked metadata."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False)


# ip/l2 scores are computed in float32: with every norm at most this, a dot product or squared
# distance of two vectors is at most (2 * MAX_NORM)**2 = 4e36, well below float32's 3.4e38.
MAX_NORM = 1e18


def vector_problem(mat: npt.NDArray[np.float32], metric: str) -> str | None:
    """What is wrong with the first bad row of ``mat`` for ``metric`` (None: nothing): the one
    check of vectors, for writes (ValueError) and for rows read from disk (CorruptFileError)."""
    if not mat.size:
        return None
    # The common case in two passes (min and max carry NaN and inf): no entry large enough for any
    # row's norm to reach the bound. An open replays up to every row through here.
    top = max(-float(mat.min()), float(mat.max()))
    if math.isfinite(top) and (metric == "cosine" or top * math.sqrt(mat.shape[1]) <= MAX_NORM):
        return None
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        return f"row {int(np.argmin(finite))} has NaN or infinite values"
    if metric != "cosine" and mat.size:  # cosine normalizes (in float64): any finite row is fine
        sq = np.einsum("ij,ij->i", mat, mat, dtype=np.float64)
        big = sq > MAX_NORM * MAX_NORM
        if big.any():
            i = int(np.argmax(big))
            return (f"row {i} has norm {math.sqrt(float(sq[i])):.3g}, above {MAX_NORM:.0e}: its {metric} scores "
                    "would overflow float32 (scale the vectors down)")
    return None


def check_vectors(vectors: Any, dim: int, n: int, metric: str = "cosine") -> npt.NDArray[np.float32]:
    """[n, dim] float32, finite and (ip/l2) of bounded norm: checked here, they reach the graph
    only later."""
    mat, _ = as_float_matrix(vectors, dim, "vectors")
    if mat.shape[0] != n:
        raise ValueError(f"vectors has {mat.shape[0]} rows for {n} texts")
    problem = vector_problem(mat, metric)
    if problem is not None:
        raise ValueError(f"vectors must be finite and, for ip/l2, of norm at most {MAX_NORM:.0e}: {problem}")
    return mat
