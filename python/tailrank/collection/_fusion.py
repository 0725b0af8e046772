"""Score fusion of the first stage and the reranker: the math (pure numpy) and the settings.

Both methods take one query's candidates: ``first`` (the ANN score; for the ``l2`` metric a
squared distance, lower is better, which ``lower_first`` says) and ``rerank`` (the reranker's
score, higher is better), and return one fused score per candidate, higher is better, finite.

- ``rrf``: reciprocal-rank fusion, ``1/(k + rank_first) + 1/(k + rank_rerank)`` with ranks from 1.
  Tied scores share the best rank of their group (competition ranking), so the fused score of a
  candidate does not depend on the order candidates are listed in.
- ``linear``: ``w * minmax(rerank) + (1 - w) * minmax(first)``, each component min-max
  normalized over the query's candidates into [0, 1] (``w`` is the weight of the reranker).
  Min-max keeps the two scales comparable whatever the reranker's logit range or the metric;
  a component whose scores are all equal (one candidate, or ties) is 0.5 for every candidate,
  so it adds the same to each and reorders nothing. On SciFact min-max beat z-scores (see
  benchmarks/README.md, "Score fusion").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .._validate import positive_int
from ..errors import FusionError

FusionMethod = Literal["none", "rrf", "linear"]
METHODS: tuple[str, ...] = ("none", "rrf", "linear")
DEFAULT_RRF_K = 60
DEFAULT_WEIGHT = 0.5  # linear fusion without a weight and without a tuned default

F64 = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class Fusion:
    """How a search combines the two scores: ``method``, the reranker's ``weight`` (linear
    only) and ``rrf_k`` (rrf only)."""

    method: FusionMethod = "none"
    weight: float | None = None
    rrf_k: int = DEFAULT_RRF_K

    def describe(self) -> str:
        if self.method == "linear":
            return f"linear (w={self.weight:g})"
        if self.method == "rrf":
            return f"rrf (k={self.rrf_k})"
        return "none (reranker score only)"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "weight": self.weight, "rrf_k": self.rrf_k}


NONE = Fusion()


def check_fusion(fusion: Any, fusion_weight: Any = None, rrf_k: Any = None) -> tuple[str | None, float | None, int | None]:
    """The one validator of fusion arguments: ``fusion`` None or one of ``METHODS``,
    ``fusion_weight`` None or a finite number in [0, 1], ``rrf_k`` None or an int >= 1.

    Raises:
        FusionError: Any of them is malformed (a ``ValueError``).
    """
    if fusion is not None and (not isinstance(fusion, str) or fusion not in METHODS):
        raise FusionError(f'fusion must be "none", "rrf" or "linear" (or None for the default), got {fusion!r}')
    w = None
    if fusion_weight is not None:
        if isinstance(fusion_weight, bool) or not isinstance(fusion_weight, (int, float, np.integer, np.floating)):
            raise FusionError(f"fusion_weight must be a number in [0, 1], got {type(fusion_weight).__name__}")
        w = float(fusion_weight)
        if not (math.isfinite(w) and 0.0 <= w <= 1.0):
            raise FusionError(f"fusion_weight must be in [0, 1] (the weight of the reranker's score), got {fusion_weight!r}")
    k = None
    if rrf_k is not None:
        try:
            k = positive_int(rrf_k, "rrf_k")
        except (TypeError, ValueError) as e:
            raise FusionError(str(e)) from None
    return fusion, w, k


def resolve(default: Fusion | None, fusion: Any, fusion_weight: Any = None, rrf_k: Any = None) -> Fusion:
    """The fusion of one search: the arguments (checked) over the collection's ``default``.

    ``fusion=None`` takes the default (or "none"); a linear fusion without a weight takes the
    default's weight when the default is linear, else ``DEFAULT_WEIGHT``; a weight with a
    fusion other than linear is an error (it would be silently ignored).
    """
    method, w, k = check_fusion(fusion, fusion_weight, rrf_k)
    base = default if default is not None else NONE
    if method is None:
        method = base.method
    if w is not None and method != "linear":
        raise FusionError(f'fusion_weight applies to fusion="linear" only (this search fuses with "{method}")')
    if method == "linear" and w is None:
        w = base.weight if base.method == "linear" and base.weight is not None else DEFAULT_WEIGHT
    return Fusion(method=method, weight=w if method == "linear" else None,  # type: ignore[arg-type]
                  rrf_k=k if k is not None else base.rrf_k)


def from_manifest(entry: Any, where: str) -> Fusion | None:
    """The stored default of a manifest's ``fusion`` field (absent or null: none stored).

    Raises:
        FusionError: The field is malformed (the caller reports the file as corrupt).
    """
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or entry.get("method") not in METHODS:
        raise FusionError(f"{where}: the stored fusion default is malformed: {entry!r}")
    return resolve(None, entry["method"], entry.get("weight"), entry.get("rrf_k"))


# --- the math ---------------------------------------------------------------------------------


def _as_scores(x: npt.ArrayLike, name: str) -> F64:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise FusionError(f"{name} scores must be finite to fuse")
    return a


def ranks(scores: npt.ArrayLike, *, lower_is_better: bool = False) -> npt.NDArray[np.int64]:
    """1-based competition ranks: 1 + the number of candidates with a strictly better score."""
    s = _as_scores(scores, "the")
    key = s if lower_is_better else -s
    srt = np.sort(key)
    return (np.searchsorted(srt, key, side="left") + 1).astype(np.int64)


def minmax(scores: npt.ArrayLike, *, lower_is_better: bool = False) -> F64:
    """Scores mapped onto [0, 1] (best 1); all equal (or one candidate): 0.5 each."""
    s = _as_scores(scores, "the")
    if s.size == 0:
        return s
    lo, hi = float(s.min()), float(s.max())
    if not hi > lo:
        return np.full(s.size, 0.5)
    out = (s - lo) / (hi - lo)
    return 1.0 - out if lower_is_better else out


def rrf(first: npt.ArrayLike, rerank: npt.ArrayLike, *, k: int = DEFAULT_RRF_K, lower_first: bool = False) -> F64:
    """Reciprocal-rank fusion of the two scores of each candidate."""
    a, b = _pair(first, rerank)
    return 1.0 / (k + ranks(a, lower_is_better=lower_first)) + 1.0 / (k + ranks(b))


def linear(first: npt.ArrayLike, rerank: npt.ArrayLike, *, weight: float, lower_first: bool = False) -> F64:
    """``weight * minmax(rerank) + (1 - weight) * minmax(first)``."""
    a, b = _pair(first, rerank)
    return weight * minmax(b) + (1.0 - weight) * minmax(a, lower_is_better=lower_first)


def _pair(first: npt.ArrayLike, rerank: npt.ArrayLike) -> tuple[F64, F64]:
    a, b = _as_scores(first, "first-stage"), _as_scores(rerank, "rerank")
    if a.shape != b.shape:
        raise FusionError(f"got {a.size} first-stage and {b.size} rerank scores")
    return a, b


def fuse(fusion: Fusion, first: npt.ArrayLike, rerank: npt.ArrayLike, *, lower_first: bool = False) -> F64:
    """The fused score of each candidate (``none``: the reranker's score)."""
    if fusion.method == "rrf":
        return rrf(first, rerank, k=fusion.rrf_k, lower_first=lower_first)
    if fusion.method == "linear":
        assert fusion.weight is not None  # resolve() always sets it
        return linear(first, rerank, weight=fusion.weight, lower_first=lower_first)
    return _pair(first, rerank)[1]


def fuse_scored(
    fusion: Fusion,
    first: npt.ArrayLike,
    rerank: npt.ArrayLike,
    scored: npt.NDArray[np.bool_],
    *,
    lower_first: bool = False,
) -> F64:
    """:func:`fuse` over the candidates the reranker scored (all of them unless a deadline cut
    reranking short); the others get -inf: they follow the scored ones in first-stage order.
    Because scoring goes best first-stage first, the scored candidates are the first stage's
    best, and fusing among them alone keeps the order consistent."""
    a = np.asarray(first, dtype=np.float64).reshape(-1)
    b = np.asarray(rerank, dtype=np.float64).reshape(-1)
    out = np.full(a.size, -np.inf)
    m = np.asarray(scored, dtype=bool)
    if m.any():
        out[m] = fuse(fusion, a[m], b[m], lower_first=lower_first)
    return out
