#!/usr/bin/env python3
"""The Milvus backend against the embedded store on SciFact, same embedder (all-MiniLM-L6-v2),
reranker, max_length and threads: first-stage nDCG@10 / Recall@100 on the 300 test claims,
per-stage latency of ``Collection.search`` (k=10, candidates=100, every candidate reranked)
with the searches of the systems interleaved query by query, the non-scorer share of a search,
and ingest throughput (documents/s, vectors precomputed: the store's cost, not the embedder's).

Start a Milvus standalone server first (the ``milvus`` package: ``milvus-server --data DIR``)::

    python benchmarks/bench_milvus.py --milvus milvus://127.0.0.1:19530 \\
        --reranker ../shared/models/scifact-minilm-l6-ce --work .cache/bench

Systems: ``embedded``; ``milvus`` (consistency Strong, the default: a search waits until the
server has applied every write acknowledged before it); ``milvus-bounded`` (Bounded staleness:
no wait, the setting for read-mostly serving). Stage names are ``Collection.search``'s timings:
``ann`` is the HNSW walk (embedded: with the fused gather and pair assembly) or the one Milvus
search with its token fetch (milvus), ``assemble`` the pair assembly from the fetched arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
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

STAGES = ("embed", "ann", "assemble", "score", "total")


def ingest(col: Any, ids: list[str], texts: list[str], vecs: np.ndarray, batch: int) -> dict[str, float]:
    t = time.perf_counter()
    for s in range(0, len(ids), batch):
        col.add(texts[s : s + batch], ids=ids[s : s + batch], vectors=vecs[s : s + batch])
    acked = time.perf_counter() - t
    done = col.checkpoint()  # embedded: every chunk in the graph; Milvus: flushed, every row in a loaded index
    whole = time.perf_counter() - t
    assert done, "the store did not finish indexing"
    return {"docs": len(ids), "seconds_acknowledged": round(acked, 2), "seconds_with_checkpoint": round(whole, 2),
            "docs_per_s_acknowledged": round(len(ids) / acked, 1), "docs_per_s_with_checkpoint": round(len(ids) / whole, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--milvus", required=True, help="milvus://HOST:PORT of a running server (a collection is made)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scifact")
    ap.add_argument("--reranker", type=Path, default=REPO.parent / "shared" / "models" / "scifact-minilm-l6-ce")
    ap.add_argument("--embedder", type=Path, default=None, help="bi-encoder model dir (default: all-MiniLM-L6-v2)")
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000, help="documents per add call")
    ap.add_argument("--latency-queries", type=int, default=30, help="searches timed per system (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "milvus.json")
    args = ap.parse_args()

    env = machine_info(REPO)
    env["milvus_server"] = subprocess.run([sys.executable, "-m", "pip", "show", "milvus"], capture_output=True,
                                          text=True).stdout.split("\n")[1:2]
    import pymilvus

    env["pymilvus"] = pymilvus.__version__
    args.work.mkdir(parents=True, exist_ok=True)
    emb = Embedder(args.embedder or default_embedder_dir(), threads=args.threads)
    ce_dir, _ = prepare_reranker(args.reranker, args.work)
    ce = CrossEncoder(ce_dir, threads=args.threads)
    corpus = load_corpus(args.data)
    ids, texts = corpus.ids, corpus.texts
    key = f"{emb.fingerprint[:12]}-{corpus_file_hash(args.data)[:12]}"
    vecs = embed_corpus(emb, corpus, args.work / f"scifact-emb-{key}.npy")
    print(f"{len(ids)} documents embedded (cached under --work)", flush=True)

    stamp = f"{os.getpid()}_{int(time.time())}"
    base = args.milvus.rstrip("/")
    out: dict[str, Any] = {"environment": env, "settings": {k: str(v) for k, v in vars(args).items()},
                           "load_before": os.getloadavg()}
    # Ingest: embedded, then Milvus (sequential: each has the machine to itself).
    emb_path = args.work / f"bench-milvus-embedded-{stamp}"
    cols: dict[str, Any] = {"embedded": Collection.create(emb_path, embedder=emb, reranker=ce)}
    out["ingest"] = {"embedded": ingest(cols["embedded"], ids, texts, vecs, args.batch)}
    uri = f"{base}/scifact_{stamp}"
    cols["milvus"] = Collection.create(uri, embedder=emb, reranker=ce)
    out["ingest"]["milvus"] = ingest(cols["milvus"], ids, texts, vecs, args.batch)
    cols["milvus-bounded"] = Collection.open(uri + "?consistency=Bounded", embedder=emb, reranker=ce)
    print(json.dumps(out["ingest"], indent=1), flush=True)

    # First-stage quality on every test claim (no reranking: the stores' own part).
    queries = load_queries(args.data)
    qrels = load_qrels(args.data, "test")
    qids = [q for q in queries if q in qrels]
    quality = {}
    for name in ("embedded", "milvus"):
        first, _, _ = search_runs(cols[name], {q: queries[q] for q in qids}, candidates=args.candidates, rerank=False)
        quality[name] = evaluate(qrels, first)
    quality["milvus_minus_embedded"] = {m: quality["milvus"][m] - quality["embedded"][m]
                                        for m in ("ndcg@10", "recall@100")}
    out["first_stage_quality"] = quality
    print(json.dumps(quality, indent=1), flush=True)

    # Latency: the systems interleaved query by query, each query's searches in a rotating order.
    if args.latency_queries > 0:
        out["latency"] = latency(cols, queries, qids, args)
    out["load_after"] = os.getloadavg()

    cols["milvus"]._client.drop_collection(cols["milvus"].uri.name)  # the benchmark's own collections
    cols["milvus"]._client.drop_collection(cols["milvus"].uri.name + "__tailrank")
    cols["embedded"].close(checkpoint=False)
    shutil.rmtree(emb_path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def latency(cols: dict[str, Any], queries: dict[str, str], qids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sample = rng.sample(qids, min(args.latency_queries, len(qids)))
    names = list(cols)
    for name in names:  # warm-up, not timed
        for q in sample[:2]:
            cols[name].search(queries[q], k=10, candidates=args.candidates)
    stages: dict[str, dict[str, list[float]]] = {n: {s: [] for s in STAGES} for n in names}
    same_top = 0
    for i, q in enumerate(sample):
        order = names[i % len(names):] + names[: i % len(names)]
        got = {}
        for name in order:
            res = cols[name].search(queries[q], k=10, candidates=args.candidates)
            got[name] = res.ids()
            for s in STAGES:
                stages[name][s].append(res.timings[s])
        same_top += got["embedded"] == got["milvus"]
    lat: dict[str, Any] = {}
    for name in names:
        st = stages[name]
        d: dict[str, Any] = {s: percentiles_ms(np.asarray(st[s]) * 1e6) for s in STAGES}
        share = (np.asarray(st["total"]) - np.asarray(st["score"])) / np.asarray(st["total"])
        d["non_scorer_share"] = {"p50": float(np.percentile(share, 50)), "p99": float(np.percentile(share, 99)),
                                 "of_summed_time": float((sum(st["total"]) - sum(st["score"])) / sum(st["total"]))}
        lat[name] = d
    lat["searches_per_system"] = len(sample)
    lat["same_top10_embedded_vs_milvus"] = same_top
    print(json.dumps(lat, indent=1), flush=True)
    return lat


if __name__ == "__main__":
    raise SystemExit(main())
