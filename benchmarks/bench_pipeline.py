#!/usr/bin/env python3
"""Pipeline benchmark on SciFact: quality of the HNSW first stage against exact search over the
same embeddings, nDCG@10 after reranking the top 100, and the per-stage latency of
``Collection.search`` (k=10, candidates=100).

    python benchmarks/bench_pipeline.py --data ../shared/data/scifact \\
        --reranker ../shared/models/scifact-minilm-l6-ce --work .cache/bench --seed 0

Corpus embeddings (all-MiniLM-L6-v2, the default embedder) are cached under --work, keyed by
the embedder's fingerprint and the corpus file's hash, and so is the collection built from them.
Quality uses pytrec-eval-terrier (through ``tailrank.bench.quality``). ``--quality-only`` skips
the latency pass; ``--latency-only`` skips the quality passes (run it on a quiet machine).

``--fusion`` measures score fusion as ``tailrank tune`` does (``tailrank._tune``): one
``Collection.search(fusion="none")`` per train and test claim (every candidate reranked; the
candidates' scores are cached under --work, so a rerun costs seconds), the linear weight and the
best fusion chosen on the train claims (``--tune-queries``, default all 809), nDCG@10 of the
first stage, none, rrf and linear measured on the 300 test claims; also the min-max linear fusion
of the reranker's logits instead of its sigmoid scores, and z-score normalization, on the same
candidates (the alternatives ``tailrank.collection._fusion`` was chosen against). It replaces the
plain quality pass (its "none" is the reranked run)::

    python benchmarks/bench_pipeline.py --fusion --quality-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from tailrank import Collection, CrossEncoder, Embedder  # noqa: E402
from tailrank._beir import load_qrels, load_queries  # noqa: E402
from tailrank._cli_collection import search_runs  # noqa: E402
from tailrank.bench.machine import machine_info  # noqa: E402
from tailrank.bench.measure import percentiles_ms  # noqa: E402
from tailrank.bench.models import prepare_reranker  # noqa: E402
from tailrank.bench.quality import evaluate  # noqa: E402
from tailrank.bench.workload import corpus_file_hash, embed_corpus, load_corpus  # noqa: E402
from tailrank.embedder import default_embedder_dir  # noqa: E402


def build_collection(path: Path, emb: Embedder, ce: CrossEncoder, ids: list[str], texts: list[str],
                     vecs: np.ndarray) -> Collection:
    if (path / "manifest.json").is_file():
        col = Collection.open(path, embedder=emb, reranker=ce)
        if len(col) == len(ids):
            return col
        raise SystemExit(f"{path} holds {len(col)} documents, not {len(ids)}: remove it")
    col = Collection.create(path, embedder=emb, reranker=ce)
    t = time.perf_counter()
    for s in range(0, len(ids), 1000):
        col.add(texts[s : s + 1000], ids=ids[s : s + 1000], vectors=vecs[s : s + 1000])
    col.checkpoint()  # the steady state: every chunk in the HNSW graph, none in the fresh part
    print(f"built the collection in {time.perf_counter() - t:.0f}s", flush=True)
    return col


def exact_run(emb: Embedder, qids: list[str], queries: dict[str, str], ids: list[str], vecs: np.ndarray,
              k: int) -> dict[str, dict[str, float]]:
    q = emb.encode([queries[x] for x in qids])
    sims = q @ vecs.T
    run = {}
    for i, qid in enumerate(qids):
        top = np.argsort(-sims[i], kind="stable")[:k]
        run[qid] = {ids[j]: float(sims[i, j]) for j in top}
    return run


def _cached_candidates(col: Collection, queries: dict[str, str], qids: list[str], candidates: int,
                       path: Path, cached_only: bool) -> dict[str, Any]:
    """``tailrank._tune.collect`` for ``qids``; what an earlier run collected is read from ``path``
    (``cached_only``: only that, nothing is searched)."""
    from tailrank._tune import Candidates, collect

    have = json.loads(path.read_text()) if path.is_file() else {}
    todo = [] if cached_only else [q for q in qids if q not in have]
    t = time.perf_counter()
    for s in range(0, len(todo), 10):  # saved every 10 claims: an interrupted run resumes
        part = todo[s : s + 10]
        for q, c in collect(col, {q: queries[q] for q in part}, candidates=candidates).items():
            have[q] = {"ids": c.ids, "first": c.first.tolist(), "rerank": c.rerank.tolist()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(have))
        os.replace(tmp, path)
        print(f"  {path.name}: {s + len(part)}/{len(todo)} claims searched in {time.perf_counter() - t:.0f}s", flush=True)
    return {q: Candidates(have[q]["ids"], np.asarray(have[q]["first"]), np.asarray(have[q]["rerank"]))
            for q in qids if q in have}


def fusion_quality(col: Collection, args: argparse.Namespace, queries: dict[str, str]) -> dict[str, Any]:
    """none / rrf / linear tuned on train claims, measured on test claims (see the module doc)."""
    import dataclasses

    from tailrank._tune import evaluate_fusions, ranking
    from tailrank.collection._fusion import Fusion

    train, test = load_qrels(args.data, "train"), load_qrels(args.data, "test")
    dev = [q for q in train if q in queries][: args.tune_queries]
    held = [q for q in test if q in queries][: args.test_queries]
    key = f"{col.path.name}-c{args.candidates}"
    t = time.perf_counter()
    # test and train claims alternate, so an interrupted run (see --cached-only) holds both
    order = [q for pair in itertools.zip_longest(held, dev) for q in pair if q is not None]
    cands = _cached_candidates(col, queries, order, args.candidates, args.work / f"fusion-cands-{key}.json",
                               args.cached_only)
    searched_s = time.perf_counter() - t
    dev, held = [q for q in dev if q in cands], [q for q in held if q in cands]
    rep = evaluate_fusions(cands, train, test, dev=dev, heldout=held, candidates=args.candidates)
    w = rep["best"]["weight"] if rep["best"]["method"] == "linear" else max(
        rep["grid"], key=lambda x: rep["dev"]["linear_grid"][f"{x:g}"])
    res: dict[str, Any] = {
        "train_claims": len(dev), "test_claims": len(held), "candidates": args.candidates, "seconds": round(searched_s, 1),
        "best_on_train": rep["best"], "linear_weight": w,
        "ndcg@10_test": {k: rep["heldout"][k] for k in ("first_stage", "none", "rrf", "linear")},
        "ndcg@10_train": {k: rep["dev"][k] for k in ("first_stage", "none", "rrf", "linear")},
        "tune": rep,
    }

    # The alternatives on the same candidates: logits instead of sigmoid scores, z-scores.
    def logit(c: Any) -> Any:
        p = np.clip(c.rerank, 1e-12, 1 - 1e-12)
        return dataclasses.replace(c, rerank=np.log(p / (1 - p)))

    def zscore(x: np.ndarray) -> np.ndarray:
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)

    def nd(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> float:
        run = {q: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in runs.items()}
        return float(evaluate(qrels, run)["ndcg@10"])

    def z_rank(c: Any, w_: float) -> list[str]:
        f = w_ * zscore(c.rerank) + (1 - w_) * zscore(c.first)
        return [c.ids[i] for i in np.lexsort((np.arange(len(c.ids)), -f))]

    alt: dict[str, Any] = {}
    lg = {q: logit(c) for q, c in cands.items()}
    for name, fn in (("minmax_of_logits", lambda q, w_: ranking(Fusion("linear", w_), lg[q])),
                     ("zscore_of_scores", lambda q, w_: z_rank(cands[q], w_)),
                     ("zscore_of_logits", lambda q, w_: z_rank(lg[q], w_))):
        grid = {w_: nd({q: fn(q, w_) for q in dev}, train) for w_ in rep["grid"]}
        wb = max(rep["grid"], key=lambda x: grid[x])
        alt[name] = {"weight": wb, "ndcg@10_train": grid[wb], "ndcg@10_test": nd({q: fn(q, wb) for q in held}, test)}
    res["alternatives"] = alt
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scifact")
    ap.add_argument("--reranker", type=Path, default=REPO.parent / "shared" / "models" / "scifact-minilm-l6-ce",
                    help="cross-encoder: HF checkpoint or exported model dir")
    ap.add_argument("--embedder", type=Path, default=None, help="bi-encoder model dir (default: all-MiniLM-L6-v2)")
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--rerank-queries", type=int, default=300, help="test claims reranked for quality (default all 300)")
    ap.add_argument("--latency-queries", type=int, default=100, help="searches timed for the stage latencies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    ap.add_argument("--fusion", action="store_true", help="measure score fusion (tuned on train, tested on test)")
    ap.add_argument("--tune-queries", type=int, default=None, help="train claims to tune on (default all 809)")
    ap.add_argument("--test-queries", type=int, default=None, help="test claims to measure on (default all 300)")
    ap.add_argument("--cached-only", action="store_true",
                    help="--fusion on the claims an earlier (interrupted) run searched; searches nothing")
    args = ap.parse_args()

    env = machine_info(REPO)
    args.work.mkdir(parents=True, exist_ok=True)
    emb = Embedder(args.embedder or default_embedder_dir(), threads=args.threads)
    ce_dir, _ = prepare_reranker(args.reranker, args.work)
    ce = CrossEncoder(ce_dir, threads=args.threads)

    corpus = load_corpus(args.data)
    ids, texts = corpus.ids, corpus.texts
    key = f"{emb.fingerprint[:12]}-{corpus_file_hash(args.data)[:12]}"
    t = time.perf_counter()
    vecs = embed_corpus(emb, corpus, args.work / f"scifact-emb-{key}.npy")
    print(f"corpus embeddings ready in {time.perf_counter() - t:.0f}s (cached under --work)", flush=True)
    col = build_collection(args.work / f"scifact-col-{key}-{ce.fingerprint[:12]}", emb, ce, ids, texts, vecs)

    queries = load_queries(args.data)
    qrels = load_qrels(args.data, "test")
    qids = [q for q in queries if q in qrels]
    out: dict[str, Any] = {
        "environment": env,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": len(ids),
        "test_queries": len(qids),
        "index": {"metric": col.metric, "ef": col._index.ef, "M": col._manifest["M"]},
    }
    if args.out.is_file():  # keep the other half of an earlier split run
        prev = json.loads(args.out.read_text())
        for part in ("quality", "latency"):
            if part in prev:
                out[part] = prev[part]

    if args.fusion:
        out["fusion"] = fusion_quality(col, args, queries)
        print(json.dumps({k: v for k, v in out["fusion"].items() if k != "tune"}, indent=1), flush=True)

    if not args.latency_only and not args.fusion:  # the fusion pass measures first stage and reranker too
        exact = exact_run(emb, qids, queries, ids, vecs, args.candidates)
        hnsw, _, _ = search_runs(col, {q: queries[q] for q in qids}, candidates=args.candidates, rerank=False)
        quality: dict[str, Any] = {"exact": evaluate(qrels, exact), "hnsw": evaluate(qrels, hnsw)}
        quality["hnsw_minus_exact"] = {
            m: quality["hnsw"][m] - quality["exact"][m] for m in ("ndcg@10", "recall@10", "recall@100")
        }
        sub = qids[: args.rerank_queries]
        t = time.perf_counter()
        first, final, _ = search_runs(col, {q: queries[q] for q in sub}, candidates=args.candidates, rerank=True,
                                      fusion="none")
        quality["reranked_queries"] = len(sub)
        quality["rerank_seconds"] = round(time.perf_counter() - t, 1)
        quality["first_stage_on_reranked_queries"] = evaluate(qrels, first)
        quality["reranked"] = evaluate(qrels, final)
        out["quality"] = quality
        print(json.dumps(quality, indent=1), flush=True)

    if not args.quality_only:
        rng = random.Random(args.seed)
        sample = rng.sample(qids, min(args.latency_queries, len(qids)))
        for q in sample[:3]:  # warm-up, not timed
            col.search(queries[q], k=10, candidates=args.candidates)
        stages: dict[str, list[float]] = {s: [] for s in ("embed", "ann", "assemble", "score", "total")}
        share = []
        for q in sample:
            res = col.search(queries[q], k=10, candidates=args.candidates)
            for s in stages:
                stages[s].append(res.timings[s])
            share.append((res.timings["total"] - res.timings["score"]) / res.timings["total"])
        lat = {s: percentiles_ms(np.asarray(v) * 1e6) for s, v in stages.items()}
        lat["non_scorer_share"] = {
            "p50": float(np.percentile(share, 50)),
            "p99": float(np.percentile(share, 99)),
            "max": float(np.max(share)),
            "of_summed_time": float((sum(stages["total"]) - sum(stages["score"])) / sum(stages["total"])),
        }
        lat["searches"] = len(sample)
        out["latency"] = lat
        print(json.dumps({s: {k: round(v, 3) for k, v in d.items()} if isinstance(d, dict) else d
                          for s, d in lat.items()}, indent=1), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
