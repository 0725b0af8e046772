"""The ASGI app of ``tailrank serve``: rerank (Cohere/Jina and TEI dialects), collection search,
health, readiness and Prometheus metrics, with deadlines, admission control and limits.

``create_app`` builds it in-process (tests drive it through an ASGI client); ``tailrank serve``
runs it under uvicorn. The model scheduler starts with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .._ort import Priority, check_priority, lower_thread_priority
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .scheduler import BatchFailed, Job, JobResult, Rejected, Reranker, Scheduler
from .schemas import (
    CohereRerankRequest,
    ErrorBody,
    RerankRequest,
    RerankResponse,
    SearchRequest,
    SearchResponse,
    TeiRerankRequest,
    document_text,
)

__all__ = ["create_app", "Limits", "ServeError"]

log = logging.getLogger("tailrank.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")
_PUBLIC_PATHS = frozenset({"/health"})
_MAX_DEADLINE_MS = 600_000.0
# Priority of the scoring threads below the event loop: while they hold every CPU, the loop
# still gets one at once to read, admit or refuse a request (a 429 in milliseconds, not after a
# batch). SCHED_IDLE rather than a nice value: a loop woken while niced threads hold both CPUs
# waited for their time slice (2-8 ms), and a waking normal thread preempts an idle-class one at once.
SCORING_NICE: Priority = "idle"
# How often (seconds) a thread holding the GIL is asked to let a waiting one run. Python's default
# is 5 ms: the loop waited that long for the GIL behind the tokenizing thread's Python work.
GIL_SWITCH_INTERVAL_S = 0.0005
# Characters per token before any request has been tokenized (English WordPiece is ~4-5).
_CHARS_PER_TOKEN = 4.0
# Tokenizer speed (characters/s) before any request has been measured.
_CHARS_PER_SECOND = 2e6


def _tokenize_nice(scoring: Priority) -> int:
    """The tokenizing thread sits between the loop and scoring: 5 nice steps below the loop when
    scoring is idle-class, else half of scoring's steps."""
    return 5 if scoring == "idle" else (int(scoring) + 1) // 2


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request over one is refused with 413 naming the limit.

    Attributes:
        max_documents: Documents per rerank request.
        max_document_chars: Characters per document.
        max_query_chars: Characters of the query.
        max_request_tokens: Tokens of all of a request's pairs after truncation.
        max_body_bytes: Request body size (checked on Content-Length and while reading).
        max_queue_pairs: Pairs admitted and not yet scored, server-wide (429 beyond).
        max_pending_searches: Collection searches running or waiting (429 beyond).
    """

    max_documents: int = 1000
    max_document_chars: int = 100_000
    max_query_chars: int = 10_000
    max_request_tokens: int = 524_288
    max_body_bytes: int = 8 << 20
    max_queue_pairs: int = 20_000
    max_pending_searches: int = 64

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


class ServeError(Exception):
    """An error answered as ``{"detail", "error_type"}`` with ``status`` (the one error table is
    :func:`_error_of`)."""

    def __init__(self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = headers or {}


def _error_of(e: Exception) -> ServeError:
    """Maps an exception of the serving path to its HTTP answer."""
    if isinstance(e, ServeError):
        return e
    if isinstance(e, Rejected):
        retry = max(1, math.ceil(e.retry_after_s))
        return ServeError(e.status, str(e), e.reason, {"Retry-After": str(retry)})
    if isinstance(e, BatchFailed):
        return ServeError(500, f"the model failed on a batch holding this request: {e}", "model_error")
    if isinstance(e, (ValueError, TypeError)):  # bad input to the collection (e.g. a filter)
        return ServeError(422, f"{type(e).__name__}: {e}", "validation")
    return ServeError(500, f"internal error: {type(e).__name__}: {e}", "internal")


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse({"detail": str(err), "error_type": err.error_type}, err.status, headers=err.headers)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


# --- the gate: auth, body cap, response counts (pure ASGI, before any routing) ------------------


class _Gate:
    """Checks the API key (every path but /health), caps the request body (Content-Length first,
    then the bytes actually streamed, refusing as soon as the cap is passed) and counts responses."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServeMetrics,
                 paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.paths else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                # Server-Timing: the server's own time (from the request's arrival at the app to
                # its response), so clients can tell it from the network and their own queueing.
                timing = (b"server-timing", f"app;dur={(time.perf_counter() - t0) * 1000:.3f}".encode())
                message = {**message, "headers": [*message.get("headers", []), timing]}
            await send(message)

        try:
            await self._handle(scope, receive, counted_send)
        finally:
            self.metrics.responses.labels(path, str(status["code"])).inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in _PUBLIC_PATHS and not self._authorized(headers):
            self.metrics.rejections.labels("unauthorized").inc()
            await _send_error(send, ServeError(
                401, "missing or wrong API key: send the header Authorization: Bearer <key>", "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            ))
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, ServeError(400, "Content-Length is not a number", "bad_request"))
                return
            if declared > self.max_body:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the connection's own events (http.disconnect)

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        assert self.key is not None
        got = headers.get("authorization", b"")
        scheme, _, token = got.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def _too_large(self, send: Send) -> None:
        self.metrics.rejections.labels("limit").inc()
        await _send_error(send, ServeError(
            413, f"the request body exceeds the limit of {self.max_body} bytes (--max-body-bytes)", "limit"
        ))


async def _send_error(send: Send, err: ServeError) -> None:
    body = json.dumps({"detail": str(err), "error_type": err.error_type}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the server's state ---------------------------------------------------------------------------


@dataclass
class _Prepared:
    queries: list[npt.NDArray[np.int32]]
    query_index: npt.NDArray[np.int64]
    docs: list[npt.NDArray[np.int32]]
    lengths: npt.NDArray[np.int64]
    seconds: float  # time the tokenization itself took (without waiting for the thread)


@dataclass
class _Server:
    model: Reranker
    scheduler: Scheduler
    metrics: ServeMetrics
    limits: Limits
    default_deadline_ms: float
    auto_truncate: bool
    model_name: str
    tokenize_pool: ThreadPoolExecutor
    collection: Any = None
    search_pool: ThreadPoolExecutor | None = None
    pending_searches: int = 0
    chars_per_token: float = _CHARS_PER_TOKEN
    # Tokenization is admitted like scoring: its backlog (characters) and speed (characters/s)
    # delay a request before its pairs can queue.
    tokenize_backlog: int = 0
    chars_per_second: float = _CHARS_PER_SECOND

    # -- request checks ---------------------------------------------------------------------

    def deadline_ms(self, header: str | None, body_ms: float | None) -> float:
        value: float | None = body_ms
        if header is not None:
            try:
                value = float(header)
            except ValueError:
                raise ServeError(422, f"X-Request-Timeout-Ms must be a number of milliseconds, got {header!r}",
                                 "validation") from None
        if value is None:
            return self.default_deadline_ms
        if not (0 < value <= _MAX_DEADLINE_MS) or math.isnan(value):
            raise ServeError(422, f"the deadline must be in (0, {_MAX_DEADLINE_MS:.0f}] ms, got {value}", "validation")
        return value

    def check_texts(self, query: str, texts: list[str]) -> None:
        lim = self.limits
        if len(texts) > lim.max_documents:
            self._limit(f"{len(texts)} documents; the limit is {lim.max_documents} per request (--max-documents)")
        if len(query) > lim.max_query_chars:
            self._limit(f"the query has {len(query)} characters; the limit is {lim.max_query_chars} (--max-query-chars)")
        for i, t in enumerate(texts):
            if len(t) > lim.max_document_chars:
                self._limit(f"document {i} has {len(t)} characters; the limit is {lim.max_document_chars} "
                            "per document (--max-document-chars)")

    def _limit(self, message: str) -> None:
        self.metrics.rejections.labels("limit").inc()
        raise ServeError(413, message, "limit")

    def estimate_tokens(self, query: str, texts: list[str]) -> int:
        """Tokens of the request's pairs, guessed from characters (before tokenizing)."""
        n_special = self.scheduler.n_special
        body = self.model.max_length - n_special
        chars = len(query) + np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        est = np.minimum(chars / self.chars_per_token, body) + n_special
        return int(est.sum())

    # -- tokenization (on a worker thread) ----------------------------------------------------

    def prepare(self, query: str, texts: list[str], *, max_tokens_per_doc: int | None, truncate: bool,
                left: bool) -> _Prepared:
        t0 = time.perf_counter()
        (q,) = self.model.tokenize([query])
        # Left truncation keeps the ends, which the token cache (that keeps starts) cannot give.
        docs = self.model.tokenize(texts) if left else self.model.document_tokens(texts, q.size)
        if max_tokens_per_doc is not None:
            docs = [d[:max_tokens_per_doc] for d in docs]
        n_special = self.scheduler.n_special
        body = self.model.max_length - n_special
        doc_lens = np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
        raw = q.size + doc_lens
        chars = len(query) + sum(len(t) for t in texts)
        if raw.sum() > 0:
            self.chars_per_token = 0.8 * self.chars_per_token + 0.2 * max(1.0, chars / float(raw.sum()))
        over = raw > body
        if over.any() and not truncate:
            i = int(np.argmax(over))
            self._limit(f"document {i} with the query is {int(raw[i]) + n_special} tokens; the model takes at most "
                        f"{self.model.max_length} (send truncate: true)")
        queries = [q]
        query_index = np.zeros(len(docs), dtype=np.int64)
        if left and over.any():
            # Keep the ends: the core's truncation keeps the starts, so pre-cut each pair to the
            # lengths it would keep. A long query may keep different lengths per pair.
            variants: dict[int, int] = {q.size: 0}
            for i in np.flatnonzero(over).tolist():
                kq, kd = self.scheduler.batcher.truncate_lengths(q.size, int(doc_lens[i]))
                if kq not in variants:
                    variants[kq] = len(queries)
                    queries.append(q[q.size - kq :])
                query_index[i] = variants[kq]
                docs[i] = docs[i][docs[i].size - kd :]
        lengths = np.minimum(raw, body) + n_special
        return _Prepared(queries, query_index, docs, lengths, time.perf_counter() - t0)

    # -- scoring ------------------------------------------------------------------------------

    async def score(self, request: Request, query: str, texts: list[str], deadline: float, *,
                    max_tokens_per_doc: int | None = None, truncate: bool = True, left: bool = False,
                    ) -> tuple[JobResult, float, int]:
        """Admits, tokenizes and schedules one request's pairs; returns (result, tokenize seconds,
        tokens). Raises ServeError for refusals and failures."""
        chars = len(query) + sum(len(t) for t in texts)
        lead_s = (self.tokenize_backlog + chars) / self.chars_per_second
        try:
            self.scheduler.check_admission(self.estimate_tokens(query, texts), len(texts), deadline, lead_s=lead_s,
                                           busy=self.tokenize_backlog > 0)
        except Rejected as e:
            self.metrics.rejections.labels(e.reason).inc()
            raise _error_of(e) from None
        t0 = time.monotonic()
        self.tokenize_backlog += chars
        try:
            prep = await asyncio.get_running_loop().run_in_executor(
                self.tokenize_pool,
                partial(self.prepare, query, texts, max_tokens_per_doc=max_tokens_per_doc, truncate=truncate,
                        left=left),
            )
        finally:
            self.tokenize_backlog -= chars
        if prep.seconds > 0:
            self.chars_per_second = 0.8 * self.chars_per_second + 0.2 * max(chars, 1) / prep.seconds
        t_tok = time.monotonic() - t0
        self.metrics.stage_seconds.labels("tokenize").observe(t_tok)
        tokens = int(prep.lengths.sum())
        if tokens > self.limits.max_request_tokens:
            self._limit(f"the request is {tokens} tokens after truncation; the limit is "
                        f"{self.limits.max_request_tokens} (--max-request-tokens)")
        job = Job(prep.queries, prep.query_index, prep.docs, prep.lengths, deadline, self.model.n_labels)
        try:
            fut = self.scheduler.submit(job, asyncio.get_running_loop())
        except Rejected as e:
            self.metrics.rejections.labels(e.reason).inc()
            raise _error_of(e) from None
        result = await self._wait(request, job, fut, deadline)
        self.metrics.stage_seconds.labels("score").observe(result.score_s)
        if result.degraded:
            self.metrics.degraded.inc()
        return result, t_tok, tokens

    async def _wait(self, request: Request, job: Job, fut: asyncio.Future[JobResult], deadline: float) -> JobResult:
        """The job's result, or at the deadline what it has; a client that disconnects cancels it."""
        gone = asyncio.ensure_future(_disconnected(request.receive))
        waiters: set[asyncio.Future[Any]] = {fut, gone}
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not fut.done():
            partial_result = self.scheduler.cancel(job)
            if partial_result is None:  # it finished meanwhile: the result is on its way
                return await _result_of(fut)
            if gone in done:
                self.metrics.rejections.labels("disconnected").inc()
                raise ServeError(499, "the client disconnected", "disconnected")
            return partial_result
        return await _result_of(fut)


async def _result_of(fut: asyncio.Future[JobResult]) -> JobResult:
    try:
        return await fut
    except BatchFailed as e:
        raise _error_of(e) from None


async def _disconnected(receive: Receive) -> None:
    """Returns when the client goes away (ASGI http.disconnect); no polling."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _ranking(model: Reranker, result: JobResult, raw: bool) -> tuple[npt.NDArray[np.int64], list[float | None]]:
    """Ranked document indices (scored best first, ties in input order; then the unscored in input
    order) and each document's score (None when not scored)."""
    scored = np.flatnonzero(result.scored)
    values = model.scores_from_logits(result.logits[scored], raw=raw).astype(np.float64)
    best = scored[np.argsort(-values, kind="stable")]
    order = np.concatenate([best, np.flatnonzero(~result.scored)]).astype(np.int64)
    scores: list[float | None] = [None] * result.scored.size
    for i, v in zip(scored.tolist(), values.tolist()):
        scores[i] = v if math.isfinite(v) else None
    return order, scores


def _timing_headers(t_tok: float, result: JobResult | None, total: float) -> dict[str, str]:
    h = {"X-Tokenize-Time": _ms(t_tok), "X-Total-Time": _ms(total)}
    if result is not None:
        h["X-Queue-Time"] = _ms(result.queue_s)
        h["X-Score-Time"] = _ms(result.score_s)
        h["X-Tailrank-Degraded"] = "true" if result.degraded else "false"
    return h


# --- the app ------------------------------------------------------------------------------------


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
) -> FastAPI:
    """Builds the server's ASGI app.

    Args:
        reranker: A ``tailrank.CrossEncoder`` (or any object with its ``batcher``,
            ``score_assembly``, ``scores_from_logits``, ``tokenize``, ``max_length`` and
            ``n_labels``), or a model directory to load one from.
        collection: A ``tailrank.Collection`` (or its directory) served at ``POST /search``.
        api_key: When set, every endpoint but ``/health`` requires ``Authorization: Bearer <key>``.
        max_batch_tokens: Real tokens per scheduling round (default: the model's batch_tokens,
            or its max_length if larger).
        default_deadline_ms: Deadline of a request that names none.
        limits: Per-request limits (:class:`Limits`).
        auto_truncate: TEI requests without ``truncate`` are truncated (else 413 when too long).
        model_name: Echoed in responses (default: the model directory's name).
        search_threads: Threads running collection searches.
        tokenize_threads: Threads tokenizing requests (the tokenizer itself may use more).
        threads: ONNX Runtime threads when ``reranker`` is a directory.
        round_hook: Called on the scheduler thread with each round's jobs (for tests).
        scoring_nice: Priority of the scoring threads below the event loop (Linux): ``"idle"``
            (SCHED_IDLE, the default) or nice steps; the scheduler thread's, and ONNX Runtime's
            intra-op threads' when ``reranker`` is a directory (build a ``CrossEncoder`` with
            ``nice=`` for the same). While every CPU scores, the loop still parses, admits and
            refuses requests at once. 0 turns it off; the tokenizing thread then keeps its priority.
        gil_switch_interval_s: ``sys.setswitchinterval`` while the app runs (restored at
            shutdown): how long the loop may wait for the GIL behind another thread's Python
            code. None leaves the process's setting.
    """
    from ..cross_encoder import CrossEncoder

    scoring_nice = check_priority(scoring_nice, "scoring_nice")
    if isinstance(reranker, (str, os.PathLike)):
        reranker = CrossEncoder(reranker, threads=threads, spin=False, nice=scoring_nice)
    model: Reranker = reranker
    if gil_switch_interval_s is not None and not 0 < gil_switch_interval_s <= 1:
        raise ValueError(f"gil_switch_interval_s must be in (0, 1] seconds or None, got {gil_switch_interval_s}")
    limits = limits or Limits()
    if not (0 < float(default_deadline_ms) <= _MAX_DEADLINE_MS):
        raise ValueError(f"default_deadline_ms must be in (0, {_MAX_DEADLINE_MS:.0f}], got {default_deadline_ms}")
    if collection is not None and isinstance(collection, (str, os.PathLike)):
        from ..collection import Collection  # type: ignore[import-not-found,unused-ignore]

        collection = Collection.open(collection, reranker=cast(Any, model))
    if max_batch_tokens is None:
        max_batch_tokens = max(int(getattr(model, "batch_tokens", model.max_length)), model.max_length)
    metrics = ServeMetrics()
    scheduler = Scheduler(model, max_batch_tokens=max_batch_tokens, max_queue_pairs=limits.max_queue_pairs,
                          metrics=metrics, round_hook=round_hook, nice=scoring_nice)
    name = model_name or os.path.basename(str(getattr(model, "model_dir", "tailrank")).rstrip("/")) or "tailrank"
    # Tokenizing sits between the loop (first) and scoring (last): admitted requests' tokens are
    # ready before a round needs them, and a refusal never waits behind them.
    tokenize_pool = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="tailrank-tokenize",
                                       initializer=lower_thread_priority,
                                       initargs=(_tokenize_nice(scoring_nice),))
    server = _Server(model, scheduler, metrics, limits, float(default_deadline_ms), auto_truncate, name,
                     tokenize_pool, collection)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        switch_interval = sys.getswitchinterval()
        if gil_switch_interval_s is not None:
            sys.setswitchinterval(gil_switch_interval_s)
        scheduler.start()
        if collection is not None:
            server.search_pool = ThreadPoolExecutor(search_threads, thread_name_prefix="tailrank-search")
        try:
            yield
        finally:
            sys.setswitchinterval(switch_interval)
            await run_in_threadpool(scheduler.close)
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
    errors: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (401, 413, 422, 429, 500, 503)}

    @app.exception_handler(ServeError)
    async def _on_serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error_response(exc)

    async def rerank(
        request: Request,
        body: RerankRequest,
        x_request_timeout_ms: str | None = Header(default=None, description="Deadline in milliseconds"),
    ) -> Response:
        t0 = time.monotonic()
        deadline = t0 + server.deadline_ms(x_request_timeout_ms, body.deadline_ms) / 1000.0
        if isinstance(body, TeiRerankRequest):
            return await _tei(request, body, t0, deadline)
        return await _cohere(request, body, t0, deadline)

    async def _cohere(request: Request, body: CohereRerankRequest, t0: float, deadline: float) -> Response:
        try:
            texts = [document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
        except ValueError as e:
            raise ServeError(422, str(e), "validation") from None
        server.check_texts(body.query, texts)
        version = "1" if request.url.path.startswith("/v1/") else "2"
        if texts:
            result, t_tok, tokens = await server.score(
                request, body.query, texts, deadline, max_tokens_per_doc=body.max_tokens_per_doc
            )
            order, scores = _ranking(model, result, raw=False)
        else:
            result, t_tok, tokens, order, scores = None, 0.0, 0, np.zeros(0, np.int64), []
        if body.top_n is not None:
            order = order[: body.top_n]
        results = []
        for i in order.tolist():
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                item["document"] = {"text": texts[i]}
            results.append(item)
        degraded = bool(result is not None and result.degraded)
        scored = int(result.scored.sum()) if result is not None else 0
        payload = {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {
                "api_version": {"version": version},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": tokens, "output_tokens": 0},
                "model": body.model or server.model_name,
                "degraded": degraded,
                "scored": scored,
            },
            "usage": {"total_tokens": tokens},
        }
        total = time.monotonic() - t0
        server.metrics.stage_seconds.labels("total").observe(total)
        return JSONResponse(payload, headers=_timing_headers(t_tok, result, total))

    async def _tei(request: Request, body: TeiRerankRequest, t0: float, deadline: float) -> Response:
        server.check_texts(body.query, body.texts)
        truncate = server.auto_truncate if body.truncate is None else body.truncate
        left = body.truncation_direction.lower() == "left"
        if body.texts:
            result, t_tok, _ = await server.score(request, body.query, body.texts, deadline, truncate=truncate,
                                                  left=left)
            order, scores = _ranking(model, result, raw=body.raw_scores)
        else:
            result, t_tok, order, scores = None, 0.0, np.zeros(0, np.int64), []
        ranks = []
        for i in order.tolist():
            item: dict[str, Any] = {"index": i, "score": scores[i]}
            if body.return_text:
                item["text"] = body.texts[i]
            ranks.append(item)
        total = time.monotonic() - t0
        server.metrics.stage_seconds.labels("total").observe(total)
        return JSONResponse(ranks, headers=_timing_headers(t_tok, result, total))

    for path in _RERANK_PATHS:
        app.add_api_route(
            path, rerank, methods=["POST"], response_model=RerankResponse, responses=errors,  # type: ignore[arg-type]
            summary="Rerank documents for a query (Cohere/Jina or TEI dialect)", tags=["rerank"],
        )

    @app.post("/search", response_model=SearchResponse, responses=errors, tags=["search"])
    async def search(
        request: Request,
        body: SearchRequest,
        x_request_timeout_ms: str | None = Header(default=None, description="Deadline in milliseconds"),
    ) -> Response:
        """First stage, then rerank, on the served collection."""
        t0 = time.monotonic()
        if server.collection is None or server.search_pool is None:
            raise ServeError(404, "no collection is served (start with --collection DIR)", "not_found")
        deadline_ms = server.deadline_ms(x_request_timeout_ms, body.deadline_ms)
        if len(body.query) > limits.max_query_chars:
            server._limit(f"the query has {len(body.query)} characters; the limit is {limits.max_query_chars} "
                          "(--max-query-chars)")
        if server.pending_searches >= limits.max_pending_searches:
            server.metrics.rejections.labels("queue_full").inc()
            raise ServeError(429, f"{server.pending_searches} searches are waiting (limit "
                             f"{limits.max_pending_searches}); retry later", "queue_full", {"Retry-After": "1"})
        server.pending_searches += 1
        try:
            call = partial(server.collection.search, body.query, k=body.k, candidates=body.candidates,
                           filter=body.filter, rerank=body.rerank, fusion=body.fusion, fusion_weight=body.fusion_weight,
                           deadline_ms=max(1.0, deadline_ms - (time.monotonic() - t0) * 1000.0))
            res = await asyncio.get_running_loop().run_in_executor(server.search_pool, call)
        except ServeError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped by the one error table
            raise _error_of(e) from None
        finally:
            server.pending_searches -= 1
        hits = [
            {"id": h.id if isinstance(h.id, (int, str)) else int(h.id), "score": _finite(h.score),
             "first_stage_score": _finite(h.first_stage_score), "text": h.text, "metadata": h.metadata,
             "truncated": bool(h.truncated), "reranked": bool(getattr(h, "reranked", True))}
            for h in res.hits
        ]
        timings = {k: float(v) for k, v in dict(res.timings).items()}
        headers = {f"X-{k.replace('_', '-').title()}-Time": f"{v:.3f}" for k, v in timings.items()}
        total = time.monotonic() - t0
        headers.setdefault("X-Total-Time", _ms(total))
        headers["X-Tailrank-Degraded"] = "true" if res.degraded else "false"
        for stage, v in timings.items():
            server.metrics.search_stage_seconds.labels(stage).observe(v / 1000.0)
        if res.degraded:
            server.metrics.degraded.inc()
        return JSONResponse({"hits": hits, "degraded": bool(res.degraded), "timings": timings}, headers=headers)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"model": ErrorBody}})
    async def ready() -> Response:
        """Readiness: the model is loaded, warmed and its throughput measured."""
        if not scheduler.ready:
            return JSONResponse({"detail": "the model is loading or failed to start", "error_type": "not_ready"}, 503)
        return JSONResponse({
            "status": "ready",
            "model": server.model_name,
            "fingerprint": str(getattr(model, "fingerprint", "")),
            "tokens_per_second": round(scheduler.tokens_per_second, 1),
            "collection": server.collection is not None,
        })

    @app.get("/metrics", tags=["ops"])
    async def metrics_endpoint() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    paths = frozenset(r.path for r in app.routes if hasattr(r, "path"))  # type: ignore[attr-defined]
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes, metrics=metrics, paths=paths)
    return app


def _finite(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None
