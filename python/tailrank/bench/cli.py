"""``tailrank bench``: the command-line front of :mod:`tailrank.bench.suite`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .models import PRECISIONS
from .suite import PEERS


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from e

    return parse


def add_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="latency percentiles, compute floor and quality of reranking vs peers; optional serve-mode load test",
        description="Times tailrank at each precision and the installed peers on the same pairs with the same "
        "threads, measures the compute floor and quality, and writes results.json, report.md and PNG plots.",
    )
    b.add_argument("--reranker", required=True, help="cross-encoder: an ONNX model dir (tailrank export) or a HF checkpoint")
    b.add_argument("--reranker-hf", default=None, help="the HF checkpoint of an ONNX --reranker (for the st peer)")
    b.add_argument("--embedder", default=None, help="embedding model dir: first stage = its top --candidates by HNSW")
    b.add_argument("--dataset", required=True, help="BEIR folder: corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv")
    b.add_argument("--split", default="test", help="qrels split (default test)")
    b.add_argument("--candidates", type=int, default=100, help="candidates per query (default 100)")
    b.add_argument("--queries", type=int, default=20, help="queries timed (default 20)")
    b.add_argument("--repeats", type=int, default=1, help="timed passes over the queries (default 1)")
    b.add_argument("--warmup", type=int, default=2, help="untimed warm-up requests per system (default 2)")
    b.add_argument("--threads", type=int, default=None, help="thread budget of every system (default: the CPU quota)")
    b.add_argument("--precisions", type=_csv(str), default=["fp32", "int8"],
                   help=f"tailrank precisions, comma-separated: {','.join(PRECISIONS)} (default fp32,int8)")
    b.add_argument("--peers", type=_csv(str), default=list(PEERS),
                   help=f"peers to compare, comma-separated: {','.join(PEERS)} (default all); missing or "
                   "conflicting ones are skipped with the reason")
    b.add_argument("--serve", action="store_true", help="also run `tailrank serve` under open-loop Poisson load")
    b.add_argument("--rates", type=_csv(float), default=[1.0, 2.0, 4.0], help="serve mode: requests/s (default 1,2,4)")
    b.add_argument("--serve-duration", type=float, default=10.0, help="serve mode: seconds per rate (default 10)")
    b.add_argument("--seed", type=int, default=0, help="seed of candidate sampling and load (default 0)")
    b.add_argument("--out", default="bench-results", help="output directory (default bench-results)")
    b.add_argument("--cache", default=None, help="cache of exported/optimized models and embeddings (default OUT/cache)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .deps import DependencyError
    from .suite import BenchConfig, run_bench, write_outputs

    cfg = BenchConfig(
        reranker=args.reranker, reranker_hf=args.reranker_hf, embedder=args.embedder, dataset=args.dataset,
        split=args.split, candidates=args.candidates, queries=args.queries, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads, precisions=args.precisions, peers=args.peers, serve=args.serve, rates=args.rates,
        serve_duration_s=args.serve_duration, seed=args.seed, out=args.out, cache=args.cache,
        progress=not args.no_progress,
    )
    try:
        cfg.validate()
    except ValueError as e:
        print(f"tailrank bench: {e}", file=sys.stderr)
        return 2
    try:
        res = run_bench(cfg)
    except DependencyError as e:
        print(f"tailrank bench: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(res, args.out)
    print((paths[1]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
