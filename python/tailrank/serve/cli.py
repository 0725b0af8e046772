"""``tailrank serve``: the HTTP server under uvicorn (needs the ``serve`` extra).

Only argparse at import time: the command line registers every command on start-up.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

_LIMIT_FLAGS = (  # flag, Limits field, help
    ("--max-documents", "max_documents", "documents per rerank request (default 1000)"),
    ("--max-document-chars", "max_document_chars", "characters per document (default 100000)"),
    ("--max-query-chars", "max_query_chars", "characters of a query (default 10000)"),
    ("--max-instruction-chars", "max_instruction_chars", "characters of an LLM reranker's instruction (default 10000)"),
    ("--max-request-tokens", "max_request_tokens", "tokens of a request's pairs after truncation (default 524288)"),
    ("--max-body-bytes", "max_body_bytes", "request body size (default 8 MiB)"),
    ("--max-queue-pairs", "max_queue_pairs", "pairs admitted and not yet scored, server-wide (default 20000)"),
    ("--max-pending-searches", "max_pending_searches", "searches in their first stage at once (default 64)"),
    ("--max-k", "max_k", "hits a search may ask for (default 1000)"),
    ("--max-candidates", "max_candidates", "first-stage candidates a search may ask for (default 1000)"),
    ("--max-filter-nodes", "max_filter_nodes", "keys, operators and values of a search filter (default 256)"),
)


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="HTTP reranking server (Cohere/Jina and TEI rerank APIs, collection search, metrics)",
        description="Serves a cross-encoder (and optionally a collection) over HTTP with cross-request "
        "batching, per-request deadlines and admission control. OpenAPI docs at /docs.",
    )
    s.add_argument("--reranker", required=True, help="cross-encoder model directory (from `tailrank export`)")
    s.add_argument("--collection", default=None, help="collection directory or milvus://HOST:PORT/NAME served at POST /search")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    s.add_argument(
        "--api-key", default=None,
        help="require Authorization: Bearer KEY on every endpoint but /health (default: $TAILRANK_API_KEY)",
    )
    s.add_argument("--max-batch-tokens", type=int, default=None,
                   help="real tokens per scheduling round (default: the model's batch_tokens)")
    s.add_argument("--default-deadline-ms", type=float, default=10_000.0,
                   help="deadline of requests that name none (default 10000)")
    s.add_argument("--no-auto-truncate", action="store_true",
                   help="TEI requests without `truncate` get 413 for pairs over max_length instead of truncation")
    s.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: the CPU quota)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | openvino (default auto)")
    s.add_argument("--scoring-nice", default=None,
                   help="priority of the scoring threads below the HTTP event loop, so that requests are "
                   "admitted or refused at once while every CPU scores (Linux): idle (SCHED_IDLE, the "
                   "default) or nice steps 0-19 (0 turns it off)")
    s.add_argument("--score-cache-bytes", type=int, default=None,
                   help="memory for the score cache: repeated (query, document) pairs are answered from it, "
                   "exactly as scored, without queueing (default 67108864 = 64 MiB; 0 turns it off)")
    s.add_argument("--model-name", default=None, help="name echoed in responses (default: the model dir's name)")
    for flag, _, help_ in _LIMIT_FLAGS:
        s.add_argument(flag, type=int, default=None, help=help_)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .._ort import check_priority
    from ..cross_encoder import CrossEncoder
    from .app import SCORING_NICE, Limits, create_app
    from .score_cache import DEFAULT_SCORE_CACHE_BYTES

    api_key = args.api_key or os.environ.get("TAILRANK_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"tailrank serve: warning: listening on {args.host} without an API key; anyone who can reach "
              "it may use it (set --api-key or TAILRANK_API_KEY)", file=sys.stderr)
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in _LIMIT_FLAGS}
    limits = Limits(**{k: v for k, v in overrides.items() if v is not None})
    raw = args.scoring_nice
    try:
        nice = check_priority(SCORING_NICE if raw is None else "idle" if raw == "idle" else int(raw))
    except ValueError:
        print(f"tailrank serve: --scoring-nice must be idle or an int in [0, 19], got {raw}", file=sys.stderr)
        return 2
    cache_bytes = DEFAULT_SCORE_CACHE_BYTES if args.score_cache_bytes is None else args.score_cache_bytes
    if cache_bytes < 0:
        print(f"tailrank serve: --score-cache-bytes must be >= 0, got {cache_bytes}", file=sys.stderr)
        return 2
    # The cache lives on the model, so that the collection's reranking (same model) shares it.
    model = CrossEncoder(args.reranker, threads=args.threads, device=args.device, spin=False, nice=nice,
                         cache_bytes=cache_bytes)
    app = create_app(
        model,
        collection=args.collection,
        api_key=api_key,
        max_batch_tokens=args.max_batch_tokens,
        default_deadline_ms=args.default_deadline_ms,
        limits=limits,
        auto_truncate=not args.no_auto_truncate,
        model_name=args.model_name,
        scoring_nice=nice,
        score_cache_bytes=cache_bytes,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
