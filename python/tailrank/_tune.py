"""Choosing a collection's default score fusion on judged queries (``tailrank tune``).

One search per judged query (``fusion="none"``, every candidate reranked and returned) gives
each candidate's first-stage and reranker scores; every fusion is then evaluated offline on those
scores with the same functions a search uses (:mod:`tailrank.collection._fusion`), so the
numbers of a fusion equal those of searching with it (exactly for unchunked collections; with
chunks, a document is represented by the chunk the reranker preferred). nDCG@10 comes from
pytrec-eval-terrier (``tailrank.bench.quality``), as in ``tailrank eval``.

The linear weight is chosen on the *dev* queries (a grid over [0, 1]); the fusion reported as
best, and stored, is the one with the highest dev nDCG@10 among none, rrf and the tuned linear;
the *held-out* queries only report how that choice generalizes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .collection._fusion import DEFAULT_RRF_K, Fusion, fuse
from .errors import TailrankError

__all__ = ["GRID", "Candidates", "collect", "evaluate_fusions", "ranking", "split", "store", "tune"]

GRID: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(21))  # w = 0, 0.05, ..., 1

Qrels = Mapping[str, Mapping[str, int]]


@dataclasses.dataclass(frozen=True)
class Candidates:
    """One query's reranked candidates in first-stage order (best first)."""

    ids: list[str]
    first: npt.NDArray[np.float64]
    rerank: npt.NDArray[np.float64]


def collect(col: Any, queries: Mapping[str, str], *, candidates: int = 100) -> dict[str, Candidates]:
    """Searches each query once (``fusion="none"``, all candidates returned)."""
    lower = col.metric == "l2"
    out: dict[str, Candidates] = {}
    for qid, text in queries.items():
        res = col.search(text, k=candidates, candidates=candidates, fusion="none")
        hits = [h for h in res.hits if h.reranked]
        hits.sort(key=lambda h: h.first_stage_score, reverse=not lower)  # stable: the candidate order
        out[qid] = Candidates(
            ids=[str(h.id) for h in hits],
            first=np.asarray([h.first_stage_score for h in hits], dtype=np.float64),
            rerank=np.asarray([h.rerank_score for h in hits], dtype=np.float64),
        )
    return out


def ranking(fusion: Fusion | None, c: Candidates, *, lower_first: bool = False) -> list[str]:
    """The ids in the order a search with ``fusion`` returns them (None: the first stage's)."""
    if fusion is None or not c.ids:
        return list(c.ids)
    fused = fuse(fusion, c.first, c.rerank, lower_first=lower_first)
    order = np.lexsort((np.arange(len(c.ids)), -fused))  # ties: first-stage order, as a search
    return [c.ids[i] for i in order]


def _ndcg10(qrels: Qrels, runs: Mapping[str, list[str]]) -> float:
    from .bench.quality import evaluate

    run = {q: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in runs.items()}
    res = evaluate({q: dict(qrels[q]) for q in runs}, run)
    return float(res.get("ndcg@10", 0.0))


def split(qids: Sequence[str], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of ``qids`` into dev and held-out (each at least one query)."""
    if len(qids) < 2:
        raise TailrankError(f"need at least 2 judged queries to split into dev and held-out, got {len(qids)}")
    if not 0.0 < dev_fraction < 1.0:
        raise TailrankError(f"--dev-fraction must be in (0, 1), got {dev_fraction}")
    order = sorted(qids)
    random.Random(seed).shuffle(order)
    n_dev = min(len(order) - 1, max(1, round(dev_fraction * len(order))))
    return order[:n_dev], order[n_dev:]


def tune(
    col: Any,
    queries: Mapping[str, str],
    dev_qrels: Qrels,
    heldout_qrels: Qrels,
    *,
    dev: Sequence[str],
    heldout: Sequence[str],
    candidates: int = 100,
    rrf_k: int = DEFAULT_RRF_K,
    grid: Sequence[float] = GRID,
) -> dict[str, Any]:
    """nDCG@10 of the first stage, none, rrf and linear (every grid weight) on the ``dev`` and
    ``heldout`` query ids; the best fusion on dev.

    Returns:
        ``{"best": Fusion.to_json(), "dev": {...}, "heldout": {...}, "candidates", "grid"}`` where
        each split holds ``queries``, ``first_stage``, ``none``, ``rrf``, ``linear`` (at the
        tuned weight) and ``linear_grid`` ({weight: nDCG@10}).
    """
    if not dev or not heldout:
        raise TailrankError("tune needs at least one dev and one held-out query")
    if col.reranker is None:
        raise TailrankError("tune needs the collection's reranker (open it with one)")
    want = list(dict.fromkeys([*dev, *heldout]))
    cands = collect(col, {q: queries[q] for q in want}, candidates=candidates)
    return evaluate_fusions(cands, dev_qrels, heldout_qrels, dev=dev, heldout=heldout, lower_first=col.metric == "l2",
                            candidates=candidates, rrf_k=rrf_k, grid=grid)


def evaluate_fusions(
    cands: Mapping[str, Candidates],
    dev_qrels: Qrels,
    heldout_qrels: Qrels,
    *,
    dev: Sequence[str],
    heldout: Sequence[str],
    lower_first: bool = False,
    candidates: int = 100,
    rrf_k: int = DEFAULT_RRF_K,
    grid: Sequence[float] = GRID,
) -> dict[str, Any]:
    """The report of :func:`tune` from already collected candidates."""
    lower = lower_first

    def score(fz: Fusion | None, qids: Sequence[str], qrels: Qrels) -> float:
        return _ndcg10(qrels, {q: ranking(fz, cands[q], lower_first=lower) for q in qids})

    report: dict[str, Any] = {"candidates": candidates, "grid": list(grid)}
    linear = {w: Fusion("linear", float(w), rrf_k) for w in grid}
    for name, qids, qrels in (("dev", dev, dev_qrels), ("heldout", heldout, heldout_qrels)):
        report[name] = {
            "queries": len(qids),
            "first_stage": score(None, qids, qrels),
            "none": score(Fusion("none", None, rrf_k), qids, qrels),
            "rrf": score(Fusion("rrf", None, rrf_k), qids, qrels),
            "linear_grid": {f"{w:g}": score(f, qids, qrels) for w, f in linear.items()},
        }
    dev_grid = report["dev"]["linear_grid"]
    w_best = max(grid, key=lambda w: dev_grid[f"{w:g}"])  # the first (smallest) of equal maxima
    for name in ("dev", "heldout"):
        report[name]["linear"] = report[name]["linear_grid"][f"{w_best:g}"]
    options = [Fusion("none", None, rrf_k), Fusion("rrf", None, rrf_k), linear[w_best]]
    best = max(options, key=lambda f: report["dev"][f.method])  # ties: the simpler one
    report["best"] = best.to_json()
    return report


def store(col: Any, report: Mapping[str, Any]) -> Fusion | None:
    """Stores the report's best fusion as the collection's default, with the numbers behind it."""
    b = report["best"]
    note = {"dev_ndcg@10": report["dev"][b["method"]], "heldout_ndcg@10": report["heldout"][b["method"]],
            "dev_queries": report["dev"]["queries"], "heldout_queries": report["heldout"]["queries"],
            "candidates": report["candidates"], "none_heldout_ndcg@10": report["heldout"]["none"],
            "first_stage_heldout_ndcg@10": report["heldout"]["first_stage"]}
    fz: Fusion | None = col.set_default_fusion(b["method"], fusion_weight=b["weight"], rrf_k=b["rrf_k"], tuned=note)
    return fz
