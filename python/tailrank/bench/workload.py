"""Benchmark workloads from a BEIR folder: queries, their candidates, and the first stage.

Documents are ``title + " " + text``. Queries are the first ones of ``qrels/<split>.tsv`` (file
order), or of queries.jsonl when there are no qrels. Candidates come either from a seeded
sample of the corpus (optionally holding every qrels-relevant document) or from a first stage:
an embedder and a ``tailrank.VectorIndex`` (corpus embeddings cached by model and corpus hash).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._beir import corpus_path, doc_text, iter_corpus, load_qrels, load_queries
from .._ort import file_fingerprint
from .measure import Request

__all__ = ["Corpus", "Workload", "load_corpus", "select_queries", "load_qrels_if_any", "sample_candidates", "random_workload",
           "corpus_file_hash", "embed_corpus", "first_stage"]

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Corpus:
    ids: list[str]
    texts: list[str]


@dataclasses.dataclass
class Workload:
    """Requests (query, candidate texts) with the ids behind them."""

    qids: list[str]
    requests: list[Request]
    doc_ids: list[list[str]]
    source: str
    first_stage_run: Run | None = None

    def run_from(self, scores: Sequence[Any]) -> Run:
        """A pytrec_eval run from per-request scores in candidate order."""
        return {
            q: {d: float(s) for d, s in zip(ids, sc)} for q, ids, sc in zip(self.qids, self.doc_ids, scores)
        }


def load_corpus(data: str | os.PathLike[str]) -> Corpus:
    ids, texts = [], []
    for d in iter_corpus(data):
        ids.append(str(d["_id"]))
        texts.append(doc_text(d))
    return Corpus(ids, texts)


def load_qrels_if_any(data: str | os.PathLike[str], split: str) -> Qrels | None:
    try:
        return load_qrels(data, split)
    except FileNotFoundError:
        return None


def select_queries(data: str | os.PathLike[str], n: int, qrels: Qrels | None, *, skip: int = 0) -> list[tuple[str, str]]:
    """(query id, text) of queries ``skip`` .. ``skip + n`` in qrels order (queries.jsonl order
    without qrels), leaving out qrels ids that queries.jsonl lacks."""
    queries = load_queries(data)
    order = [q for q in qrels if q in queries] if qrels is not None else list(queries)
    return [(q, queries[q]) for q in order[skip : skip + n]]


def sample_candidates(n_corpus: int, n: int, rng: random.Random, include: Sequence[int] = ()) -> list[int]:
    """``n`` distinct corpus positions: ``include`` plus a seeded sample of the rest, shuffled.
    Without ``include`` this is exactly ``rng.sample(range(n_corpus), n)``."""
    n = min(n, n_corpus)
    if not include:
        return rng.sample(range(n_corpus), n)
    keep = list(dict.fromkeys(include))[:n]
    chosen = set(keep)
    pool = rng.sample(range(n_corpus), min(n_corpus, n + len(keep)))
    out = keep + [i for i in pool if i not in chosen][: n - len(keep)]
    rng.shuffle(out)
    return out


def random_workload(
    data: str | os.PathLike[str],
    n_queries: int,
    n_candidates: int,
    seed: int,
    *,
    corpus: Corpus | None = None,
    qrels: Qrels | None = None,
    include_relevant: bool = False,
    skip: int = 0,
    split: str = "test",
) -> Workload:
    """Each query against a fresh seeded sample of the corpus (with its relevant documents when
    ``include_relevant``)."""
    corpus = corpus or load_corpus(data)
    if qrels is None:
        qrels = load_qrels_if_any(data, split)
    pos = {d: i for i, d in enumerate(corpus.ids)}
    rng = random.Random(seed)
    qids, requests, doc_ids = [], [], []
    for qid, text in select_queries(data, n_queries, qrels, skip=skip):
        rel = [pos[d] for d, r in (qrels or {}).get(qid, {}).items() if r > 0 and d in pos] if include_relevant else []
        picked = sample_candidates(len(corpus.ids), n_candidates, rng, rel)
        qids.append(qid)
        requests.append((text, [corpus.texts[i] for i in picked]))
        doc_ids.append([corpus.ids[i] for i in picked])
    return Workload(qids, requests, doc_ids, "qrels-relevant + seeded random" if include_relevant else "seeded random")


def corpus_file_hash(data: str | os.PathLike[str]) -> str:
    """sha256 (16 hex digits) of the corpus file of a BEIR folder."""
    return file_fingerprint(Path(corpus_path(data)))[:16]


def embed_corpus(embedder: Any, corpus: Corpus, cache_file: Path | None) -> np.ndarray:
    """The corpus embeddings [n, dim] float32, read from ``cache_file`` when it holds them."""
    if cache_file is not None and cache_file.is_file():
        vecs = np.load(cache_file)
        if vecs.shape[0] == len(corpus.ids):
            return vecs
    vecs = np.ascontiguousarray(embedder.encode(corpus.texts), dtype=np.float32)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, vecs)
        os.replace(tmp, cache_file)
    return vecs


def first_stage(
    data: str | os.PathLike[str],
    embedder: Any,
    n_queries: int,
    k: int,
    *,
    corpus: Corpus | None = None,
    qrels: Qrels | None = None,
    cache_file: Path | None = None,
    threads: int | None = None,
    skip: int = 0,
) -> Workload:
    """Each query's top ``k`` documents by embedding similarity (tailrank.VectorIndex, cosine)."""
    from ..index import VectorIndex

    corpus = corpus or load_corpus(data)
    vecs = embed_corpus(embedder, corpus, cache_file)
    index = VectorIndex(vecs.shape[1], "cosine", M=16, ef_construction=200)
    index.add(vecs, np.arange(len(corpus.ids), dtype=np.int64), threads=threads)
    chosen = select_queries(data, n_queries, qrels, skip=skip)
    qvecs = np.ascontiguousarray(embedder.encode([t for _, t in chosen]), dtype=np.float32)
    k = min(k, len(corpus.ids))
    ids, scores = index.search(qvecs, k, ef=max(2 * k, 64))
    qids, requests, doc_ids, run = [], [], [], {}
    for (qid, text), row, srow in zip(chosen, ids, scores):
        keep = [(int(i), float(s)) for i, s in zip(row, srow) if i >= 0]
        qids.append(qid)
        requests.append((text, [corpus.texts[i] for i, _ in keep]))
        doc_ids.append([corpus.ids[i] for i, _ in keep])
        run[qid] = {corpus.ids[i]: s for i, s in keep}
    return Workload(qids, requests, doc_ids, "first stage: embedder + VectorIndex", run)
