"""``tailrank ingest`` / ``search`` / ``eval`` / ``tune``: a Collection from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ._beir import doc_text, read_jsonl, read_qrels
from .errors import TailrankError

_TEXT_FIELDS = ("_id", "title", "text")


def add_parser(sub: Any) -> None:
    i = sub.add_parser("ingest", help="add a JSONL corpus (BEIR lines: _id, title, text) to a collection")
    i.add_argument("path", help="collection folder or milvus://HOST:PORT/NAME (created when missing)")
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
    s.add_argument("path", help="collection folder or milvus://HOST:PORT/NAME")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=10, help="hits to return (default 10)")
    s.add_argument("--candidates", type=int, default=100, help="first-stage candidates to rerank (default 100)")
    s.add_argument("--no-rerank", action="store_true", help="first stage only")
    s.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"year": {"$in": [2020, 2021]}}\'')
    s.add_argument("--deadline-ms", type=float, default=None, help="time budget; rerank what fits")
    s.add_argument("--fusion", choices=("none", "rrf", "linear"), default=None,
                   help="rank by the reranker alone, reciprocal-rank fusion, or a weighted sum of the min-max "
                   "normalized scores (default: the collection's stored default, set by `tailrank tune`, else none)")
    s.add_argument("--fusion-weight", type=float, default=None,
                   help="linear fusion: the reranker's weight in [0, 1] (default: the stored one, else 0.5)")
    s.add_argument("--rrf-k", type=int, default=None, help="rrf fusion: the k of 1/(k + rank) (default 60)")
    s.add_argument("--instruction", default=None,
                   help="LLM rerankers: the task instruction of the prompt (default: the template's)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    _model_args(s)

    e = sub.add_parser("eval", help="nDCG@10 and Recall@{10,100} of the first stage and after reranking")
    e.add_argument("path", help="collection folder or milvus://HOST:PORT/NAME")
    e.add_argument("--queries", required=True, help="queries.jsonl (BEIR: _id, text)")
    e.add_argument("--qrels", required=True, help="qrels TSV (query-id, corpus-id, score; header optional)")
    e.add_argument("--candidates", type=int, default=100, help="first-stage candidates (default 100)")
    e.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N judged queries")
    e.add_argument("--no-rerank", action="store_true", help="first stage only")
    e.add_argument("--fusion", choices=("none", "rrf", "linear"), default=None,
                   help="fusion of the reranked run (default: the collection's stored default, else none)")
    e.add_argument("--fusion-weight", type=float, default=None, help="linear fusion: the reranker's weight in [0, 1]")
    e.add_argument("--instruction", default=None,
                   help="LLM rerankers: the task instruction of every query's prompt (default: the template's)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _model_args(e)

    t = sub.add_parser(
        "tune",
        help="choose the collection's default score fusion on judged queries and store it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Searches each judged query once (every candidate reranked), then measures nDCG@10 of the "
        "first stage, the reranker alone (none), reciprocal-rank fusion (rrf) and the linear fusion at each weight "
        "w = 0, 0.05, ..., 1 of the reranker. The weight is chosen on the dev queries; the fusion with the best dev "
        "nDCG@10 is stored in the collection's manifest as its default (searches use it when given no --fusion). "
        "The held-out queries only report how the choice generalizes.\n\n"
        "Dev and held-out: with --test-qrels, dev is --qrels and held-out is --test-qrels (e.g. BEIR's train.tsv and "
        "test.tsv); without it, a seeded split of --qrels' queries (--dev-fraction, --seed).",
    )
    t.add_argument("path", help="collection folder (with its reranker)")
    t.add_argument("--queries", required=True, help="queries.jsonl (BEIR: _id, text)")
    t.add_argument("--qrels", required=True, help="qrels TSV of the dev queries (or of all, split by --dev-fraction)")
    t.add_argument("--test-qrels", help="qrels TSV of the held-out queries (default: split --qrels)")
    t.add_argument("--dev-fraction", type=float, default=0.5, help="share of --qrels' queries used as dev (default 0.5)")
    t.add_argument("--seed", type=int, default=0, help="seed of the dev/held-out split (default 0)")
    t.add_argument("--candidates", type=int, default=100, help="first-stage candidates reranked (default 100)")
    t.add_argument("--max-queries", type=int, default=None, help="at most N dev and N held-out queries (a fixed cost)")
    t.add_argument("--rrf-k", type=int, default=60, help="rrf's k (default 60)")
    t.add_argument("--no-store", action="store_true", help="report only; leave the manifest as it is")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    _model_args(t)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", help="bi-encoder model dir (default: the one recorded in the collection)")
    p.add_argument("--reranker", help="cross-encoder model dir (default: the one recorded in the collection)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def run(args: argparse.Namespace) -> int:
    return {"ingest": _ingest, "search": _search, "eval": _eval, "tune": _tune}[args.command](args)


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

    path = args.path
    if Collection.exists(path):
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
    total, chunks = len(col), col.chunk_count
    col.close()  # a checkpoint of the whole ingest: the next open replays nothing
    print(f"ingested {done} documents into {path} in {time.perf_counter() - t0:.1f} s ({total} in all, "
          f"{chunks} chunks)")
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
    try:
        res = col.search(args.query, k=args.k, candidates=args.candidates, filter=flt, rerank=not args.no_rerank,
                         deadline_ms=args.deadline_ms, fusion=args.fusion, fusion_weight=args.fusion_weight,
                         rrf_k=args.rrf_k, instruction=args.instruction)
    except ValueError as e:  # e.g. --instruction with a sequence-classifier reranker
        print(f"tailrank search: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {
            "hits": [h.__dict__ for h in res.hits],
            "fusion": res.fusion,
            "fusion_weight": res.fusion_weight,
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
        rr = f" rerank={h.rerank_score:.4f}" if res.fusion != "none" and h.rerank_score is not None else ""
        lines.append(f"{rank:>3}. [{h.id}] score={h.score:.4f}{rr} first_stage={h.first_stage_score:.4f}  {text}")
    t = res.timings
    stages = " ".join(f"{k}={t[k]:.1f}" for k in ("embed", "ann", "assemble", "score", "total") if k in t)
    fused = f" fusion={res.fusion}" if res.fusion == "rrf" else ""
    if res.fusion == "linear":
        fused = f" fusion=linear(w={res.fusion_weight:g})"
    lines.append(f"     timings (ms): {stages}; candidates={res.candidates} reranked={res.reranked}{fused}"
                 + (" DEGRADED (deadline)" if res.degraded else ""))
    return "\n".join(lines)


# --- eval ------------------------------------------------------------------------------------


def search_runs(
    col: Any, queries: dict[str, str], *, candidates: int = 100, rerank: bool = True, **fusion: Any
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[dict[str, float]]]:
    """One search per query: the first-stage run (the candidates by first-stage score), the final
    run (as returned; ``fusion``: Collection.search's fusion keywords), and each search's stage
    timings in ms."""
    first: dict[str, dict[str, float]] = {}
    final: dict[str, dict[str, float]] = {}
    timings: list[dict[str, float]] = []
    for qid, text in queries.items():
        res = col.search(text, k=candidates, candidates=candidates, rerank=rerank, **fusion)
        ranked = sorted(res.hits, key=lambda h: h.first_stage_score, reverse=col.metric != "l2")
        n = len(ranked)
        first[qid] = {str(h.id): float(n - i) for i, h in enumerate(ranked)}
        final[qid] = {str(h.id): float(n - i) for i, h in enumerate(res.hits)}
        timings.append(res.timings)
    return first, final, timings


def evaluate(
    col: Any, queries: dict[str, str], qrels: dict[str, dict[str, int]], *, candidates: int = 100,
    rerank: bool = True, fusion: str | None = None, fusion_weight: float | None = None,
    instruction: str | None = None,
) -> dict[str, Any]:
    """nDCG@10 and Recall@{10,100} (pytrec-eval-terrier) of the first stage and, with ``rerank``,
    after reranking the first stage's ``candidates`` (ranked as ``fusion`` says; default: the
    collection's stored default); one search per judged query. ``instruction``: an LLM
    reranker's task instruction for every query."""
    try:
        from .bench.quality import evaluate as metrics

        import pytrec_eval  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as e:
        raise TailrankError("eval needs pytrec-eval-terrier: pip install 'tailrank[eval]'") from e
    judged = {q: t for q, t in queries.items() if q in qrels}
    from .collection._fusion import resolve

    fz = resolve(col.default_fusion, fusion, fusion_weight) if rerank else None
    kw: dict[str, Any] = {"fusion": fz.method, "fusion_weight": fz.weight} if fz is not None else {}
    if instruction is not None:
        kw["instruction"] = instruction
    first, final, _ = search_runs(col, judged, candidates=candidates, rerank=rerank, **kw)
    out: dict[str, Any] = {"queries": len(judged), "candidates": candidates,
                           "fusion": fz.describe() if fz is not None else None}
    out["first_stage"] = {k: v for k, v in metrics(qrels, first).items() if k != "queries"}
    if rerank:
        out["reranked"] = {k: v for k, v in metrics(qrels, final).items() if k != "queries"}
    return out


def _eval(args: argparse.Namespace) -> int:
    queries = _read_queries(args.queries)
    qrels = read_qrels(args.qrels)
    if args.max_queries is not None:
        judged = [q for q in queries if q in qrels][: args.max_queries]
        queries = {q: queries[q] for q in judged}
    col = _open(args)
    try:
        res = evaluate(col, queries, qrels, candidates=args.candidates, rerank=not args.no_rerank,
                       fusion=args.fusion, fusion_weight=args.fusion_weight, instruction=args.instruction)
    except ValueError as e:  # e.g. --instruction with a sequence-classifier reranker
        print(f"tailrank eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    fused = f", reranked run ranked by fusion {res['fusion']}" if res.get("fusion") else ""
    print(f"{res['queries']} judged queries, {res['candidates']} candidates{fused}")
    print(f"{'stage':<12} {'nDCG@10':>8} {'R@10':>8} {'R@100':>8}")
    for stage in ("first_stage", "reranked"):
        if stage in res:
            m = res[stage]
            print(f"{stage:<12} {m['ndcg@10']:>8.4f} {m['recall@10']:>8.4f} {m['recall@100']:>8.4f}")
    return 0


# --- tune ------------------------------------------------------------------------------------


def _read_queries(path: str) -> dict[str, str]:
    return {str(rec["_id"]): str(rec["text"]) for rec in read_jsonl(path)}


def _tune(args: argparse.Namespace) -> int:
    from . import _tune as tuning

    queries = _read_queries(args.queries)
    qrels = read_qrels(args.qrels)
    judged = [q for q in qrels if q in queries]
    if args.test_qrels:
        held_qrels = read_qrels(args.test_qrels)
        dev, held = judged, [q for q in held_qrels if q in queries]
        overlap = set(dev) & set(held)
        if overlap:
            raise TailrankError(f"{len(overlap)} queries are judged in both --qrels and --test-qrels, "
                                f"e.g. {sorted(overlap)[0]!r}: the held-out split must be disjoint")
    else:
        held_qrels = qrels
        dev, held = tuning.split(judged, args.dev_fraction, args.seed)
    if args.max_queries is not None:
        dev, held = dev[: args.max_queries], held[: args.max_queries]
    col = _open(args)
    rep = tuning.tune(col, queries, qrels, held_qrels, dev=dev, heldout=held, candidates=args.candidates,
                      rrf_k=args.rrf_k)
    if not args.no_store:
        tuning.store(col, rep)
    rep["stored"] = not args.no_store
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(format_tune(rep, args.path))
    return 0


def format_tune(rep: dict[str, Any], path: str) -> str:
    """The table of a tune report: nDCG@10 per fusion on dev and held-out."""
    w = rep["best"]["weight"] if rep["best"]["method"] == "linear" else None
    w_lin = max(rep["grid"], key=lambda x: rep["dev"]["linear_grid"][f"{x:g}"])
    rows = [("first stage only", "first_stage"), ("none (reranker)", "none"), (f"rrf (k={rep['best']['rrf_k']})", "rrf"),
            (f"linear (w={w_lin:g})", "linear")]
    lines = [f"{rep['dev']['queries']} dev and {rep['heldout']['queries']} held-out queries, "
             f"{rep['candidates']} candidates; nDCG@10:",
             f"{'fusion':<20} {'dev':>8} {'held-out':>9}"]
    for label, key in rows:
        lines.append(f"{label:<20} {rep['dev'][key]:>8.4f} {rep['heldout'][key]:>9.4f}")
    best = rep["best"]["method"] + (f" (w={w:g})" if w is not None else "")
    where = f"stored as the default of {path}" if rep.get("stored") else "not stored (--no-store)"
    lines.append(f"best on dev: {best}; {where}")
    return "\n".join(lines)
