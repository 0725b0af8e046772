"""The main job: a two-stage search pipeline on a BEIR folder (default: SciFact).

Builds (or reuses) a Collection from a sample of the corpus with the default embedder
(all-MiniLM-L6-v2, exported to ONNX once and cached) and a cross-encoder (default:
../shared/models/scifact-minilm-l6-ce when present, exported once), chooses the collection's
default score fusion once (``tailrank tune`` on train claims of the sample, held out on test
claims; stored in the collection's manifest and reused by later runs), then runs a few judged
queries with that default and prints the hits with per-stage timings:

    python -m tailrank.demo --data ../shared/data/scifact --docs 1000 --queries 3
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import time
from pathlib import Path

from ._beir import doc_text, iter_corpus, load_qrels, load_queries
from ._cli_collection import format_hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join("..", "shared", "data", "scifact"), help="BEIR folder")
    ap.add_argument("--docs", type=int, default=1000, help="corpus documents to ingest (a sample: the first N)")
    ap.add_argument("--queries", type=int, default=3, help="judged queries to run")
    ap.add_argument("-k", type=int, default=5, help="hits to print per query")
    ap.add_argument("--candidates", type=int, default=100, help="first-stage candidates to rerank")
    ap.add_argument("--embedder", default=None, help="bi-encoder model dir (default: all-MiniLM-L6-v2)")
    ap.add_argument(
        "--reranker",
        default=None,
        help="cross-encoder: an exported model dir, or a Hugging Face checkpoint (exported once into "
        "--cache); default: ../shared/models/scifact-minilm-l6-ce when present",
    )
    ap.add_argument("--cache", default=".cache", help="where exported models and the collection are kept")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: the CPU quota)")
    ap.add_argument("--tune-queries", type=int, default=10,
                    help="train claims (and as many held-out test claims) to tune the fusion on, once per collection "
                    "(0: no tuning, rank by the reranker alone)")
    args = ap.parse_args(argv)

    from . import Collection, CrossEncoder, Embedder, distance_isa
    from .collection._manifest import FORMAT_VERSION
    from .embedder import default_embedder_dir

    t0 = time.perf_counter()
    emb = Embedder(args.embedder or default_embedder_dir(args.cache), threads=args.threads)
    rr_dir = _reranker_dir(args)
    ce = CrossEncoder(rr_dir, threads=args.threads) if rr_dir else None
    print(f"tailrank demo | data={args.data} | distance kernels: {distance_isa()}")
    print(f"embedder: {emb.model_dir} ({emb.dim}-d, {emb.pooling}) | reranker: {rr_dir or 'none (first stage only)'}"
          f" | models ready in {time.perf_counter() - t0:.1f}s")

    docs = list(itertools.islice(iter_corpus(args.data), args.docs))
    ids = [str(d["_id"]) for d in docs]
    texts = [doc_text(d) for d in docs]
    # The collection format version is part of the key: a cache of an older format is rebuilt.
    key = hashlib.sha256(f"v{FORMAT_VERSION}\0".encode() + "\0".join(ids).encode() + emb.fingerprint.encode()
                         + (ce.fingerprint.encode() if ce else b"")).hexdigest()[:12]
    path = Path(args.cache) / "collections" / f"{Path(args.data).name}-{len(docs)}-{key}"
    t0 = time.perf_counter()
    if (path / "manifest.json").is_file():
        col = Collection.open(path, embedder=emb, reranker=ce)
        print(f"reused {col!r}")
    else:
        col = Collection.create(path, embedder=emb, reranker=ce)
        col.add(texts, ids=ids, metadata=[{"title": d.get("title", "")} for d in docs])
        print(f"built {col!r} in {time.perf_counter() - t0:.1f}s (embedded, pre-tokenized, indexed, committed)")

    queries = load_queries(args.data)
    qrels = load_qrels(args.data)
    have = set(ids)
    if ce is not None:
        _fusion_default(col, args, queries, qrels, have)
    chosen = [q for q in qrels if any(d in have for d in qrels[q])][: args.queries]
    for qid in chosen:
        res = col.search(queries[qid], k=args.k, candidates=args.candidates, rerank=ce is not None)
        relevant = {d for d in qrels[qid] if d in have}
        print(f"\nquery {qid}: {queries[qid][:100]}")
        print(format_hits(res))
        found = [r + 1 for r, h in enumerate(res.hits) if h.id in relevant]
        print(f"     relevant documents in the top {args.k}: ranks {found or 'none'} (of {len(relevant)} judged)")
    return 0


def _fusion_default(col: object, args: argparse.Namespace, queries: dict[str, str], test_qrels: dict[str, dict[str, int]],
                    have: set[str]) -> None:
    """Tunes and stores the collection's default fusion unless it has one; says which is used."""
    from . import _tune
    from ._beir import load_qrels

    fz = col.default_fusion  # type: ignore[attr-defined]
    if fz is None and args.tune_queries > 0:
        judged = lambda qr: [q for q in qr if q in queries and any(d in have for d in qr[q])]  # noqa: E731
        train = load_qrels(args.data, "train")
        dev, held = judged(train)[: args.tune_queries], judged(test_qrels)[: args.tune_queries]
        if dev and held:
            t0 = time.perf_counter()
            rep = _tune.tune(col, queries, train, test_qrels, dev=dev, heldout=held, candidates=args.candidates)
            fz = _tune.store(col, rep)
            print(f"tuned the fusion in {time.perf_counter() - t0:.1f}s (tailrank tune on {len(dev)} train claims, "
                  f"held out on {len(held)} test claims; stored in the collection's manifest)")
    if fz is None:
        print("fusion: none (hits ranked by the reranker alone)")
        return
    note = col.default_fusion_tuning or {}  # type: ignore[attr-defined]
    how = ""
    if note:
        how = (f"; held-out nDCG@10 on {note['heldout_queries']} test claims: first stage "
               f"{note['first_stage_heldout_ndcg@10']:.3f}, reranker alone {note['none_heldout_ndcg@10']:.3f}, "
               f"this fusion {note['heldout_ndcg@10']:.3f}")
    print(f"fusion: {fz.describe()}, the collection's tuned default (ranks hits by the fused score){how}")


def _reranker_dir(args: argparse.Namespace) -> str | None:
    """The cross-encoder's model dir (a Hugging Face checkpoint is exported once into the cache)."""
    from .bench.models import prepare_reranker

    src = args.reranker
    if src is None:
        src = os.path.join(os.path.dirname(os.path.abspath(args.data.rstrip("/"))), "..", "models", "scifact-minilm-l6-ce")
        if not os.path.isdir(src):
            return None
    onnx_dir, _ = prepare_reranker(os.path.normpath(src), os.path.join(args.cache, "models"))
    return str(onnx_dir)


if __name__ == "__main__":
    raise SystemExit(main())
