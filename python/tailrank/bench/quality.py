"""Retrieval quality with pytrec_eval (pytrec-eval-terrier): nDCG@10 and Recall@k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["evaluate"]


def evaluate(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], *, recall_at: Sequence[int] = (10, 100)
) -> dict[str, Any]:
    """Mean nDCG@10 and Recall@k over the queries of ``run`` that have qrels.

    Raises:
        ImportError: pytrec_eval is missing (``pip install 'tailrank[bench]'``).
    """
    import pytrec_eval

    judged = {q: docs for q, docs in run.items() if q in qrels and docs}
    if not judged:
        return {"queries": 0}
    measures = {"ndcg_cut.10", *(f"recall.{k}" for k in recall_at)}
    per_query = pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in judged}, measures).evaluate(judged)
    out: dict[str, Any] = {"queries": len(per_query)}
    out["ndcg@10"] = float(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))
    for k in recall_at:
        out[f"recall@{k}"] = float(np.mean([m[f"recall_{k}"] for m in per_query.values()]))
    return out
