"""``tailrank ingest`` / ``search`` / ``eval``: a Collection from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ._beir import doc_text, read_jsonl, read_qrels
from .errors import TailrankError

_TEXT_FIELDS = ("_id", "title", "text")


def add_parser(sub: Any) -> None:
    i = sub.add_parser("ingest", help="add a JSONL corpus (BEIR lines: _id, title, text) to a collection")
    i.add_argument("path", help="collection folder (created when missing)")
    i.add_argument("--jsonl", required=True, help="corpus file (.jsonl or .jsonl.gz); other fields become metadata")
    i.add_argument("--embedder", help="bi-encoder model dir (default: all-MiniLM-L6-v2, exported once and cached)")
    i.add_argument("--reranker", help="cross-encoder model dir (made by `tailrank export`)")
    i.add_argument("--metric", default="cosine", choices=("cosine", "ip", "l2"))
    i.add_argument("--chunk-tokens", type=int, default=None, help="split documents into chunks of N tokens")
    i.add_argument("--chunk-overlap", type=int, default=0, help="tokens shared by consecutive chunks")
    i.add_argument("--batch", type=int, default=1000, help="documents per commit (default 1000)")
    i.add_argument("--limit", type=int, default=None, help="ingest only the first N documents")
    i.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")

    s = sub.add_parser("search", help="search a collection")
    s.add_argument("path", help="collection folder")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=10, help="hits to return (default 10)")
    s.add_argument("--candidates", type=int, default=100, help="first-stage candidates to rerank (default 100)")
    s.add_argument("--no-rerank", action="store_true", help="first stage only")
    s.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"year": {"$in": [2020, 2021]}}\'')
    s.add_argument("--deadline-ms", type=float, default=None, help="time budget; rerank what fits")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    _model_args(s)

    e = sub.add_parser("eval", help="nDCG@10 and Recall@{10,100} of the first stage and after reranking")
    e.add_argument("path", help="collection folder")
    e.add_argument("--queries", required=True, help="queries.jsonl (BEIR: _id, text)")
    e.add_argument("--qrels", required=True, help="qrels TSV (query-id, corpus-id, score; header optional)")
    e.add_argument("--candidates", type=int, default=100, help="first-stage candidates (default 100)")
    e.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N judged queries")
    e.add_argument("--no-rerank", action="store_true", help="first stage only")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _model_args(e)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", help="bi-encoder model dir (default: the one recorded in the collection)")
    p.add_argument("--reranker", help="cross-encoder model dir (default: the one recorded in the collection)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def run(args: argparse.Namespace) -> int:
    return {"ingest": _ingest, "search": _search, "eval": _eval}[args.command](args)


# --- ingest ----------------------------------------------------------------------------------


def beir_record(rec: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    """(id, text, metadata) of a BEIR corpus line: text is title and text; other fields metadata."""
    if "_id" not in rec or not isinstance(rec["_id"], (str, int)):
        raise ValueError(f"{where}: missing or invalid _id")
    title, text = rec.get("title") or "", rec.get("text") or ""
    if not isinstance(title, str) or not isinstance(text, str):
        raise ValueError(f"{where}: title and text must be strings")
    meta = {k: v for k, v in rec.items() if k not in _TEXT_FIELDS}
    if title:
        meta["title"] = title
    return str(rec["_id"]), doc_text(rec), meta


def _ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .collection import Collection
    from .embedder import default_embedder_dir

    path = Path(args.path)
    if (path / "manifest.json").is_file():
        col = Collection.open(path, embedder=args.embedder, reranker=args.reranker, threads=args.threads)
    else:
        col = Collection.create(
            path,
            embedder=args.embedder or default_embedder_dir(),
            reranker=args.reranker,
            metric=args.metric,
            chunk_tokens=args.chunk_tokens,
            chunk_overlap=args.chunk_overlap,
            threads=args.threads,
        )
    t0 = time.perf_counter()
    done = 0
    batch: list[tuple[str, str, dict[str, Any]]] = []
    with tqdm(desc="ingest", unit="doc", disable=not sys.stderr.isatty()) as bar:
        for n, rec in enumerate(read_jsonl(args.jsonl), 1):
            if args.limit is not None and done + len(batch) >= args.limit:
                break
            batch.append(beir_record(rec, f"{args.jsonl}:{n}"))
            if len(batch) >= args.batch:
                done += _flush(col, batch)
                bar.update(len(batch))
                batch = []
        if batch:
            done += _flush(col, batch)
            bar.update(len(batch))
    col.close()  # a checkpoint of the whole ingest: the next open replays nothing
    print(f"ingested {done} documents into {path} in {time.perf_counter() - t0:.1f} s ({len(col)} in all, "
          f"{col.chunk_count} chunks)")
    return 0


def _flush(col: Any, batch: list[tuple[str, str, dict[str, Any]]]) -> int:
    ids = [b[0] for b in batch]
    col.upsert([b[1] for b in batch], ids=ids, metadata=[b[2] for b in batch])
    return len(batch)


# --- search ----------------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> Any:
    from .collection import Collection

    return Collection.open(args.path, embedder=args.embedder, reranker=args.reranker, threads=args.threads)


def _search(args: argparse.Namespace) -> int:
    flt = None
    if args.filter:
        try:
            flt = json.loads(args.filter)
        except ValueError as e:
            print(f"tailrank search: --filter is not JSON: {e}", file=sys.stderr)
            return 2
    col = _open(args)
    res = col.search(args.query, k=args.k, candidates=args.candidates, filter=flt, rerank=not args.no_rerank,
                     deadline_ms=args.deadline_ms)
    if args.json:
        out = {
            "hits": [h.__dict__ for h in res.hits],
            "degraded": res.degraded,
            "timings_ms": res.timings,
            "candidates": res.candidates,
            "reranked": res.reranked,
        }
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return 0
    print(format_hits(res))
    return 0


def format_hits(res: Any, width: int = 100) -> str:
    """Human-readable hits and per-stage timings of a SearchResult."""
    lines = []
    for rank, h in enumerate(res.hits, 1):
        text = " ".join(h.text.split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"{rank:>3}. [{h.id}] score={h.score:.4f} first_stage={h.first_stage_score:.4f}  {text}")
    t = res.timings
    stages = " ".join(f"{k}={t[k]:.1f}" for k in ("embed", "ann", "assemble", "score", "total") if k in t)
    lines.append(f"     timings (ms): {stages}; candidates={res.candidates} reranked={res.reranked}"
                 + (" DEGRADED (deadline)" if res.degraded else ""))
    return "\n".join(lines)


# --- eval ------------------------------------------------------------------------------------


def search_runs(
    col: Any, queries: dict[str, str], *, candidates: int = 100, rerank: bool = True
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[dict[str, float]]]:
    """One search per query: the first-stage run (the candidates by first-stage score), the final
    run (as returned), and each search's stage timings in ms."""
    first: dict[str, dict[str, float]] = {}
    final: dict[str, dict[str, float]] = {}
    timings: list[dict[str, float]] = []
    for qid, text in queries.items():
        res = col.search(text, k=candidates, candidates=candidates, rerank=rerank)
        ranked = sorted(res.hits, key=lambda h: h.first_stage_score, reverse=col.metric != "l2")
        n = len(ranked)
        first[qid] = {str(h.id): float(n - i) for i, h in enumerate(ranked)}
        final[qid] = {str(h.id): float(n - i) for i, h in enumerate(res.hits)}
        timings.append(res.timings)
    return first, final, timings


def evaluate(
    col: Any, queries: dict[str, str], qrels: dict[str, dict[str, int]], *, candidates: int = 100,
    rerank: bool = True,
) -> dict[str, Any]:
    """nDCG@10 and Recall@{10,100} (pytrec-eval-terrier) of the first stage and, with ``rerank``,
    after reranking the first stage's ``candidates``; one search per judged query."""
    try:
        from .bench.quality import evaluate as metrics

        import pytrec_eval  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as e:
        raise TailrankError("eval needs pytrec-eval-terrier: pip install 'tailrank[eval]'") from e
    judged = {q: t for q, t in queries.items() if q in qrels}
    first, final, _ = search_runs(col, judged, candidates=candidates, rerank=rerank)
    out: dict[str, Any] = {"queries": len(judged), "candidates": candidates}
    out["first_stage"] = {k: v for k, v in metrics(qrels, first).items() if k != "queries"}
    if rerank:
        out["reranked"] = {k: v for k, v in metrics(qrels, final).items() if k != "queries"}
    return out


def _eval(args: argparse.Namespace) -> int:
    queries: dict[str, str] = {}
    for rec in read_jsonl(args.queries):
        queries[str(rec["_id"])] = str(rec["text"])
    qrels = read_qrels(args.qrels)
    if args.max_queries is not None:
        judged = [q for q in queries if q in qrels][: args.max_queries]
        queries = {q: queries[q] for q in judged}
    col = _open(args)
    res = evaluate(col, queries, qrels, candidates=args.candidates, rerank=not args.no_rerank)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{res['queries']} judged queries, {res['candidates']} candidates")
    print(f"{'stage':<12} {'nDCG@10':>8} {'R@10':>8} {'R@100':>8}")
    for stage in ("first_stage", "reranked"):
        if stage in res:
            m = res[stage]
            print(f"{stage:<12} {m['ndcg@10']:>8.4f} {m['recall@10']:>8.4f} {m['recall@100']:>8.4f}")
    return 0
