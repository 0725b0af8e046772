"""The ASGI app of ``tailrank serve``, assembled from its stages (as TEI's router):

- ``gate``: API key, body cap, response counts, the request's arrival time;
- ``validate``: a body of either dialect -> one canonical job, every limit checked;
- ``admission``: one estimate of queue time from running totals, O(1) per request;
- ``queue``: EDF rounds formed (and assembled) by a batcher thread while the previous one runs;
- ``executor``: one thread per ONNX Runtime session;
- ``routes``: the HTTP API; ``errors``: the one table mapping errors to HTTP codes.

``create_app`` builds it in-process (tests drive it through an ASGI client); ``tailrank serve``
runs it under uvicorn. The threads start with the app's lifespan.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .._ort import Priority, check_priority, lower_thread_priority
from .._validate import positive_int
from ..errors import BackendError
from .admission import Admission
from .errors import ServeError, error_of, error_response
from .executor import Executor, calibrate_reranker
from .gate import Gate
from .metrics import ServeMetrics
from .queue import Job, Queue
from .routes import Reranker, Server, add_routes
from .schemas import MAX_DEADLINE_MS
from .score_cache import DEFAULT_SCORE_CACHE_BYTES, RequestCache
from .validate import Limits

__all__ = ["create_app", "Limits", "ServeError", "SCORING_NICE", "GIL_SWITCH_INTERVAL_S"]

# Priority of the scoring threads below the event loop: while they hold every CPU, the loop
# still gets one at once to read, admit or refuse a request (a 429 in milliseconds, not after a
# batch). SCHED_IDLE rather than a nice value: a loop woken while niced threads hold both CPUs
# waited for their time slice (2-8 ms), and a waking normal thread preempts an idle-class one at once.
SCORING_NICE: Priority = "idle"
# How often (seconds) a thread holding the GIL is asked to let a waiting one run. Python's default
# is 5 ms: the loop waited that long for the GIL behind the tokenizing thread's Python work.
GIL_SWITCH_INTERVAL_S = 0.0005


def _tokenize_nice(scoring: Priority) -> int:
    """The tokenizing thread sits between the loop and scoring: 5 nice steps below the loop when
    scoring is idle-class, else half of scoring's steps."""
    return 5 if scoring == "idle" else (int(scoring) + 1) // 2


# The runners are made on their executor's thread: this thread's binding and output buffers are
# sized by its first batcher() call (the rounds themselves are assembled on the batcher thread).


def _rerank_runner(model: Reranker) -> Callable[[], Callable[[Any, float], Any]]:
    def make() -> Callable[[Any, float], Any]:
        if not _is_llm(model):  # an LLM reranker's continuation graph binds per batch
            model.batcher()
        return lambda assembly, deadline: model.score_assembly(assembly, deadline=deadline)
    return make


def _is_llm(model: Any) -> bool:
    return getattr(model, "kind", "encoder") == "llm"


def _embed_runner(emb: Any) -> Callable[[], Callable[[Any, float], Any]]:
    def make() -> Callable[[Any, float], Any]:
        emb.batcher()
        return lambda assembly, deadline: (emb.encode_assembly(assembly), np.ones(assembly.truncated.size, bool))
    return make


def _open_collection(path: str | os.PathLike[str], model: Any, threads: int | None, nice: Priority) -> Any:
    """The collection at ``path`` with the served reranker and its embedder built for serving:
    no spinning threads, and the scoring priority below the event loop (as the reranker)."""
    from ..collection import Collection  # type: ignore[import-not-found,unused-ignore]
    from ..collection import _location
    from ..collection._manifest import read_manifest, recorded_dir
    from ..embedder import Embedder

    where = _location.parse(path)
    if isinstance(where, _location.MilvusURI):  # the manifest lives in Milvus; the models on this machine
        from ..collection._milvus import recorded_model_dir

        rec = recorded_model_dir(where, "embedder")
    else:
        rec = recorded_dir(read_manifest(Path(where)), "embedder")
    emb = Embedder(rec, threads=threads, spin=False, nice=nice)
    return Collection.open(path, embedder=emb, reranker=cast(Any, model))


def create_app(
    reranker: Reranker | str | os.PathLike[str],
    *,
    collection: Any = None,
    api_key: str | None = None,
    max_batch_tokens: int | None = None,
    default_deadline_ms: float = 10_000.0,
    limits: Limits | None = None,
    auto_truncate: bool = True,
    model_name: str | None = None,
    search_threads: int = 1,
    tokenize_threads: int = 1,
    threads: int | None = None,
    round_hook: Callable[[list[Job]], None] | None = None,
    scoring_nice: Priority = SCORING_NICE,
    gil_switch_interval_s: float | None = GIL_SWITCH_INTERVAL_S,
    score_cache_bytes: int = DEFAULT_SCORE_CACHE_BYTES,
) -> FastAPI:
    """Builds the server's ASGI app.

    Args:
        reranker: A ``tailrank.CrossEncoder`` (or any object with its ``batcher``,
            ``score_assembly``, ``scores_from_logits``, ``tokenize``, ``max_length`` and
            ``n_labels``), or a model directory to load one from. An LLM reranker
            (``kind == "llm"``) is served through ``prepare_prompts`` / ``assemble_prompts``
            instead of ``batcher``, and its requests may carry an ``instruction``.
        collection: A ``tailrank.Collection`` (or its directory) served at ``POST /search``.
        api_key: When set, every endpoint but ``/health`` requires ``Authorization: Bearer <key>``.
        max_batch_tokens: Real tokens per scheduling round (default: the model's batch_tokens,
            or its max_length if larger).
        default_deadline_ms: Deadline of a request that names none.
        limits: Per-request limits (:class:`Limits`).
        auto_truncate: TEI requests without ``truncate`` are truncated (else 413 when too long).
        model_name: Echoed in responses (default: the model directory's name).
        search_threads: Threads running collection searches' first stage.
        tokenize_threads: Threads tokenizing requests (the tokenizer itself may use more).
        threads: ONNX Runtime threads when ``reranker`` is a directory.
        round_hook: Called on the rerank executor's thread with each round's jobs (for tests).
        scoring_nice: Priority of the scoring threads below the event loop (Linux): ``"idle"``
            (SCHED_IDLE, the default) or nice steps; the batcher's and executors' threads, and
            ONNX Runtime's intra-op threads' when ``reranker`` is a directory (build a
            ``CrossEncoder`` with ``nice=`` for the same). While every CPU scores, the loop still
            parses, admits and refuses requests at once. 0 turns it off; the tokenizing thread
            then keeps its priority.
        gil_switch_interval_s: ``sys.setswitchinterval`` while the app runs (restored at
            shutdown): how long the loop may wait for the GIL behind another thread's Python
            code. None leaves the process's setting.
        score_cache_bytes: Size of the score cache (default 64 MiB; 0: off). Pairs scored before
            (same query and document token ids) are answered from it without queueing, exactly
            as scored; a ``reranker`` built with its own cache (``cache_bytes``/``score_cache``)
            shares that one instead. Needs the model's ``score_fingerprint``.
    """
    from ..cross_encoder import CrossEncoder

    scoring_nice = check_priority(scoring_nice, "scoring_nice")
    score_cache_bytes = positive_int(score_cache_bytes, "score_cache_bytes", minimum=0)
    if isinstance(reranker, (str, os.PathLike)):
        # The cache lives on the model, so a collection opened with it reaches the same one.
        reranker = CrossEncoder(reranker, threads=threads, spin=False, nice=scoring_nice,
                                cache_bytes=score_cache_bytes)
    model: Reranker = reranker
    llm = _is_llm(model)
    if gil_switch_interval_s is not None and not 0 < gil_switch_interval_s <= 1:
        raise ValueError(f"gil_switch_interval_s must be in (0, 1] seconds or None, got {gil_switch_interval_s}")
    limits = limits or Limits()
    if not (0 < float(default_deadline_ms) <= MAX_DEADLINE_MS):
        raise ValueError(f"default_deadline_ms must be in (0, {MAX_DEADLINE_MS:.0f}], got {default_deadline_ms}")
    if collection is not None and isinstance(collection, (str, os.PathLike)):
        collection = _open_collection(collection, model, threads, scoring_nice)
    if collection is not None and getattr(collection, "reranker", None) is not None and \
            getattr(collection.reranker, "fingerprint", None) != getattr(model, "fingerprint", None):
        raise ValueError("the collection's reranker is not the served model: its stored tokens would be scored "
                         "by another model (open the collection with reranker=<the served model>)")
    if max_batch_tokens is None:
        max_batch_tokens = max(int(getattr(model, "batch_tokens", model.max_length)), model.max_length)
    if max_batch_tokens < model.max_length:
        raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= the model's max_length "
                         f"({model.max_length})")
    metrics = ServeMetrics()
    admission = Admission(max_queue_pairs=limits.max_queue_pairs)
    queue = Queue(admission, metrics)
    # An LLM request's pairs carry its prompt key as their query: the round's assembly groups
    # them by prompt, so each request's prefix runs once per round (see assemble_prompts).
    queue.add_kind("rerank", max_batch_tokens=max_batch_tokens,
                   make_assembler=lambda: cast(Any, model).assemble_prompts if llm else model.batcher().assemble_multi)
    executors = {"rerank": Executor(queue, "rerank", _rerank_runner(model),
                                    calibrate=lambda: calibrate_reranker(model, max_batch_tokens),
                                    round_hook=round_hook, nice=scoring_nice)}
    extra: dict[str, Any] = {}
    if llm:  # the template's own tokens (no query, no instruction), for admission's estimate
        pp = cast(Any, model).prepare_prompts("", [], instruction="")
        extra["llm_prompt_tokens"] = (int(pp.prompt_tokens), int(pp.key.size - pp.prompt_tokens - 1))
        template = getattr(model, "rerank_template", None)
        extra["llm_default_instruction_chars"] = len(getattr(template, "default_instruction", None) or "")
    if collection is not None:
        emb = collection.embedder
        queue.add_kind("embed", max_batch_tokens=max(int(emb.batch_tokens), int(emb.max_length)),
                       make_assembler=lambda: emb.batcher().assemble_multi)
        executors["embed"] = Executor(queue, "embed", _embed_runner(emb), measure=False, nice=scoring_nice)
        extra["embed_special"] = int(emb.batcher().template.n_special)
    name = model_name or os.path.basename(str(getattr(model, "model_dir", "tailrank")).rstrip("/")) or "tailrank"
    # Tokenizing sits between the loop (first) and scoring (last): admitted requests' tokens are
    # ready before a round needs them, and a refusal never waits behind them.
    tokenize_pool = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="tailrank-tokenize",
                                       initializer=lower_thread_priority,
                                       initargs=(_tokenize_nice(scoring_nice),))
    server = Server(model, None if llm else model.batcher(), admission, queue, executors, metrics, limits,
                    float(default_deadline_ms), auto_truncate, name, tokenize_pool, collection, extra=extra,
                    score_cache=RequestCache.for_model(model, score_cache_bytes))
    if server.score_cache is not None:
        metrics.watch_score_cache(server.score_cache.cache.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        switch_interval = sys.getswitchinterval()
        if gil_switch_interval_s is not None:
            sys.setswitchinterval(gil_switch_interval_s)
        queue.start(scoring_nice)
        for ex in executors.values():
            ex.start()
        if collection is not None:
            server.search_pool = ThreadPoolExecutor(search_threads, thread_name_prefix="tailrank-search")
        try:
            yield
        finally:
            sys.setswitchinterval(switch_interval)
            admission.fail("the server is shutting down")
            await run_in_threadpool(queue.close)
            for ex in executors.values():
                await run_in_threadpool(ex.join)
            tokenize_pool.shutdown(wait=True, cancel_futures=True)
            if server.search_pool is not None:
                server.search_pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="tailrank",
        description="Cross-encoder reranking with deadlines and admission control. Rerank speaks two "
        "dialects, told apart by the body: Cohere/Jina (`documents`) and text-embeddings-inference (`texts`).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.tailrank = server

    @app.exception_handler(ServeError)
    async def _on_serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(BackendError)
    async def _on_backend(request: Request, exc: BackendError) -> JSONResponse:  # the collection's store is down
        return error_response(error_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(error_of(exc))

    add_routes(app, server)
    paths = frozenset(r.path for r in app.routes if hasattr(r, "path"))  # type: ignore[attr-defined]
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes, metrics=metrics, paths=paths)
    return app
