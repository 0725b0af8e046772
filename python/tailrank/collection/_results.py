"""Search results, and the reranking steps that run outside the collection's lock (on copies)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._runner import input_order_chunks
from ..cross_encoder import CrossEncoder
from ._inputs import DocId


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is what the hit was ranked by: the fused score when the
    search fused (see ``SearchResult.fusion``), else the reranker's score when the hit was
    reranked, else the first-stage score. ``first_stage_score`` is the ANN similarity (squared
    distance for l2); ``rerank_score`` the reranker's score (None when not reranked)."""

    id: DocId
    score: float
    first_stage_score: float
    text: str
    metadata: dict[str, Any]
    truncated: bool
    reranked: bool
    rerank_score: float | None = None


@dataclass
class SearchResult:
    """Hits best first, whether the deadline cut reranking short, and per-stage times in ms:
    ``embed``, ``ann`` (HNSW walk; with the fused call it includes gather and assembly),
    ``assemble``, ``score``, ``total``. ``fusion`` says how reranked hits were ranked:
    ``"none"`` (reranker score), ``"rrf"`` or ``"linear"`` (with ``fusion_weight``)."""

    hits: list[Hit]
    degraded: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    reranked: int = 0
    fusion: str = "none"
    fusion_weight: float | None = None

    def ids(self) -> list[DocId]:
        return [h.id for h in self.hits]


@dataclass(frozen=True)
class SearchPlan:
    """A search's checked arguments and compiled filter (``Collection.plan_search``)."""

    query: str
    k: int
    candidates: int
    where: tuple[str, list[Any]] | None  # the filter as SQL over the metadata table, with its values
    rerank: bool
    ef: int | None
    fusion: Any = None  # a _fusion.Fusion; None or method "none": reranker order
    fields: tuple[tuple[str, tuple[int, ...]], ...] = ()  # what the filter reads (_filters.fields_read)


@dataclass
class Candidates:
    """First-stage candidates from one committed state (``Collection.first_stage``): chunk keys
    best first, their first-stage scores, texts and metadata, and to rerank either copies of
    their reranker tokens (``docs``) or the pairs already assembled (``assembly``)."""

    keys: npt.NDArray[np.int64]
    first: npt.NDArray[np.float32]
    info: dict[int, tuple[DocId, str, dict[str, Any]]]
    docs: list[npt.NDArray[np.int32]] | None
    assembly: Any
    timings: dict[str, float]
    cut: npt.NDArray[np.bool_] | None = None  # tokens a store dropped that a pair could hold (-> truncated)


def ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0


def score_by_deadline(
    rr: CrossEncoder,
    q_tok: npt.NDArray[np.int32],
    docs: list[npt.NDArray[np.int32]],
    deadline: float,
    timings: dict[str, float],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Scores candidates best first-stage first, one batch per assembly, until the deadline;
    pairs in the reranker's score cache first, at no cost."""
    found = rr.lookup_scores(q_tok, docs)
    if found is None:
        return _score_by_deadline(rr, q_tok, docs, deadline, timings)
    logits = found.logits.copy()
    scored = np.ones(len(docs), dtype=bool)
    truncated = rr.truncation_flags(q_tok, docs)
    miss = found.miss
    if miss.size:
        got, done, _ = _score_by_deadline(rr, q_tok, [docs[i] for i in miss.tolist()], deadline, timings)
        rr.store_scores(found, got, done)
        logits[miss] = got
        scored[miss] = done
    return logits, scored, truncated


def _score_by_deadline(
    rr: CrossEncoder,
    q_tok: npt.NDArray[np.int32],
    docs: list[npt.NDArray[np.int32]],
    deadline: float,
    timings: dict[str, float],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    n = len(docs)
    logits = np.full((n, rr.n_labels), np.nan, dtype=np.float32)
    scored = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    batcher = rr.batcher()
    lengths = [sum(batcher.truncate_lengths(q_tok.size, len(d))) + rr._template.n_special for d in docs]
    for start, end in input_order_chunks(lengths, rr.batch_tokens, rr.max_batch_size):
        if time.monotonic() >= deadline:
            break
        t = time.perf_counter()
        assembly = batcher.assemble(q_tok, docs[start:end])
        timings["assemble"] += ms(t)
        t = time.perf_counter()
        got, done = rr.score_assembly(assembly, deadline=deadline)
        timings["score"] += ms(t)
        logits[start:end] = got
        scored[start:end] = done
        truncated[start:end] = assembly.truncated
    return logits, scored, truncated


def build_result(
    keys: npt.NDArray[np.int64],
    first: npt.NDArray[np.float32],
    info: dict[int, tuple[DocId, str, dict[str, Any]]],
    scores: Any,
    scored: npt.NDArray[np.bool_] | None,
    truncated: npt.NDArray[np.bool_] | None,
    degraded: bool,
    timings: dict[str, float],
    t0: float,
    k: int,
    *,
    rerank_scores: Any = None,
    fusion: Any = None,
) -> SearchResult:
    """Best chunk per document, scored candidates by score (fused when ``fusion``, a
    ``_fusion.Fusion``, is given; then ``rerank_scores`` are the reranker's), then the rest in
    first-stage order."""
    n = keys.size
    if scored is not None:
        sc = np.asarray(scores, dtype=np.float64)
        order = sorted(range(n), key=lambda i: (0, -sc[i], i) if scored[i] else (1, 0.0, i))
    else:
        order = list(range(n))
    hits: list[Hit] = []
    seen: set[Any] = set()
    for i in order:
        row = info.get(int(keys[i]))
        if row is None:  # deleted by another process after this process's state (see refresh)
            continue
        doc_id, text, meta = row
        if (type(doc_id), doc_id) in seen:  # chunks of one document: keep its best
            continue
        seen.add((type(doc_id), doc_id))
        was = scored is not None and bool(scored[i])
        hits.append(
            Hit(
                id=doc_id,
                score=float(scores[i]) if was else float(first[i]),
                first_stage_score=float(first[i]),
                text=text,
                metadata=meta,
                truncated=bool(truncated[i]) if truncated is not None else False,
                reranked=was,
                rerank_score=(float(rerank_scores[i]) if rerank_scores is not None else float(scores[i])) if was else None,
            )
        )
        if len(hits) >= k:
            break
    timings["total"] = ms(t0)
    return SearchResult(
        hits=hits,
        degraded=degraded,
        timings=timings,
        candidates=n,
        reranked=int(scored.sum()) if scored is not None else 0,
        fusion=fusion.method if fusion is not None else "none",
        fusion_weight=fusion.weight if fusion is not None else None,
    )
