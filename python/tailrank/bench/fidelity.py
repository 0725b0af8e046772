"""How closely one system's rankings follow a reference's, request by request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..optimize import kendall_tau

__all__ = ["ranking_agreement"]


def ranking_agreement(
    reference: Sequence[npt.NDArray[Any]], got: Sequence[npt.NDArray[Any]], *, k: int = 10
) -> dict[str, float]:
    """Mean Kendall tau, mean top-``k`` overlap, share of top-1 kept and the largest score
    difference of ``got`` against ``reference`` (per-request score arrays in the same order)."""
    taus, overlaps, kept, worst = [], [], [], 0.0
    for a, b in zip(reference, got):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.size == 0:
            continue
        taus.append(kendall_tau(a64, b64))
        n = min(k, a64.size)
        top_a = set(np.argsort(-a64, kind="stable")[:n].tolist())
        top_b = set(np.argsort(-b64, kind="stable")[:n].tolist())
        overlaps.append(len(top_a & top_b) / n)
        kept.append(int(np.argmax(a64) == np.argmax(b64)))
        worst = max(worst, float(np.max(np.abs(a64 - b64))))
    return {
        "kendall_tau_mean": float(np.mean(taus)) if taus else float("nan"),
        f"top{k}_overlap_mean": float(np.mean(overlaps)) if overlaps else float("nan"),
        "top1_kept": float(np.mean(kept)) if kept else float("nan"),
        "max_abs_score_diff": worst,
    }
