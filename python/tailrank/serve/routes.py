"""The routes: rerank (Cohere/Jina and TEI dialects), search, health, readiness, metrics; and
the per-request pipeline they share: validate -> admit -> tokenize -> queue -> wait."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response

from ..errors import TailrankError
from .admission import Admission
from .errors import BatchFailed, Rejected, ServeError, error_of
from .executor import Executor
from .gate import arrival_of
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .._score_cache import CacheLookup
from .queue import JobResult, Queue, make_job
from .score_cache import RequestCache
from .schemas import (
    MAX_DEADLINE_MS,
    CohereRerankRequest,
    ErrorBody,
    RerankRequest,
    RerankResponse,
    SearchRequest,
    SearchResponse,
    TeiRerankRequest,
)
from .validate import Limits, Pairs, RerankSpec, deadline_s, prompt_pairs, rerank_spec, search_spec, tokenize_pairs

__all__ = ["Reranker", "Server", "add_routes", "RERANK_PATHS"]

RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")

# Bad input found below the routes; error_of maps each to its 4xx (or, for an unforeseen
# TailrankError, a JSON 500 naming it).
_BAD_INPUT = (ValueError, TypeError, TailrankError)

_TIMEOUT_HEADER = Header(default=None, gt=0, le=MAX_DEADLINE_MS,
                         description="Deadline in milliseconds (overrides the body's deadline_ms)")


class Reranker(Protocol):
    """What the server needs from a model (``tailrank.CrossEncoder`` provides it)."""

    max_length: int
    n_labels: int

    def batcher(self, max_batch_size: int | None = None) -> Any: ...

    def score_assembly(
        self, assembly: Any, *, deadline: float | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...

    def scores_from_logits(self, logits: npt.ArrayLike, *, raw: bool = False) -> npt.NDArray[np.float32]: ...

    def tokenize(self, texts: list[str]) -> list[npt.NDArray[np.int32]]: ...

    def document_tokens(self, documents: list[str], query_len: int = 0) -> list[npt.NDArray[np.int32]]: ...


@dataclass
class Server:
    """The state one app serves from."""

    model: Reranker
    rules: Any  # a PairBatcher of the model: template and truncation rule (thread-safe reads)
    admission: Admission
    queue: Queue
    executors: dict[str, Executor]
    metrics: ServeMetrics
    limits: Limits
    default_deadline_ms: float
    auto_truncate: bool
    model_name: str
    tokenize_pool: ThreadPoolExecutor
    collection: Any = None
    search_pool: ThreadPoolExecutor | None = None
    pending_searches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    score_cache: RequestCache | None = None

    @property
    def llm(self) -> bool:
        """The served model is an LLM reranker: pairs travel as prompt keys (``prepare_prompts``)."""
        return getattr(self.model, "kind", "encoder") == "llm"

    @property
    def n_special(self) -> int:
        return int(self.rules.template.n_special)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits for every executor's start (calibration); raises if one failed."""
        for ex in self.executors.values():
            ok = ex.ready.wait(timeout)
            if ex.failure is not None:
                raise RuntimeError(f"the {ex.kind} executor failed: {ex.failure!r}") from ex.failure
            if not ok:
                return False
        return True

    def refuse(self, e: Exception) -> ServeError:
        """A refusal, counted by reason, as its HTTP answer."""
        err = error_of(e)
        if isinstance(e, Rejected):
            self.metrics.rejections.labels(e.reason).inc()
        elif err.error_type == "limit":
            self.metrics.rejections.labels("limit").inc()
        return err

    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """Where bad input surfaces below the routes (validation, tokenizing, planning, the
        first stage): its exception becomes its answer from the one table, counted."""
        try:
            yield
        except _BAD_INPUT as e:
            raise self.refuse(e) from None

    # -- the rerank pipeline ------------------------------------------------------------------

    async def rerank(self, request: Request, spec: RerankSpec, deadline: float) -> tuple[JobResult, float, int]:
        """Admits, tokenizes, queues and waits for one request's pairs; returns (result,
        tokenize seconds, tokens). Raises ServeError for refusals and failures."""
        est = self._estimate(spec, range(len(spec.texts)))
        try:
            ticket = self.admission.before_tokenizing(est, len(spec.texts), spec.chars, deadline)
        except Rejected as e:
            ticket = self._admit_uncached(spec, e, deadline)
        t0 = time.perf_counter()
        pairs: Pairs | None = None
        try:
            with self.refusing():
                pairs, found = await asyncio.get_running_loop().run_in_executor(
                    self.tokenize_pool, partial(self._tokenize, spec))
        finally:
            t_tok = time.perf_counter() - t0
            self.admission.tokenized(ticket, tokens=pairs.tokens if pairs is not None else 0,
                                     seconds=t_tok if pairs is not None else None)
        assert pairs is not None
        self.metrics.stage_seconds.labels("tokenize").observe(t_tok)
        result = await self.score_pairs(pairs, found, deadline, request)
        self.metrics.stage_seconds.labels("score").observe(result.score_s)
        if result.degraded:
            self.metrics.degraded.inc()
        return result, t_tok, pairs.tokens

    def _estimate(self, spec: RerankSpec, which: Any) -> int:
        """Estimated tokens of the request's pairs ``which`` (before tokenizing)."""
        if self.llm:
            fixed_before, suffix = self.extra["llm_prompt_tokens"]
            inst = len(spec.instruction) if spec.instruction is not None else self.extra["llm_default_instruction_chars"]
            chars = len(spec.query) + inst
            return self.admission.estimate_prompt_tokens(chars, [len(spec.texts[i]) for i in which], fixed_before,
                                                         suffix, int(self.model.max_length))
        return self.admission.estimate_tokens(len(spec.query), [len(spec.texts[i]) for i in which],
                                              int(self.model.max_length), self.n_special)

    def _admit_uncached(self, spec: RerankSpec, refused: Rejected, deadline: float) -> Any:
        """A request the full estimate refused for queue time or room: admitted on the pairs the
        score cache does not hold (when a request with the same texts was seen), so that cached
        pairs never cost it queue time they would not use. Raises the refusal otherwise."""
        cache = self.score_cache
        if cache is None or refused.reason not in ("deadline", "queue_full"):
            raise self.refuse(refused) from None
        miss = cache.uncached(RequestCache.request_digest(spec))
        if miss is None or miss.size == len(spec.texts):
            raise self.refuse(refused) from None
        try:
            ticket = self.admission.before_tokenizing(self._estimate(spec, miss.tolist()), int(miss.size),
                                                      spec.chars, deadline)
        except Rejected as e:
            raise self.refuse(e) from None
        self.metrics.cache_admitted.inc()
        return ticket

    # -- the search pipeline ------------------------------------------------------------------

    async def search(self, request: Request, plan: Any, deadline: float, arrival: float,
                     instruction: str | None = None) -> Any:
        """One search as jobs of the same queue: the query's embedding (an ``embed`` job), the
        first stage on one committed state (the search pool), the candidates' pairs (a
        ``rerank`` job, EDF with every /rerank), then the collection's own finishing stage.
        The deadline counts from ``arrival``; a deadline that cuts reranking (or a rerank job
        the queue cannot take in time) leaves first-stage order (``degraded``)."""
        coll = self.collection
        emb = coll.embedder
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter() - (time.monotonic() - arrival)  # perf_counter at the arrival
        per_pair = self.admission.tokens_per_pair or float(self.model.max_length)
        rerank_tokens = int(plan.candidates * per_pair) if plan.rerank else 0
        est = self.admission.estimate_tokens(0, [len(plan.query)], int(emb.max_length),
                                             int(self.extra["embed_special"])) + rerank_tokens
        chars = len(plan.query) * (2 if plan.rerank else 1)
        try:
            ticket = self.admission.before_tokenizing(est, 1 + (plan.candidates if plan.rerank else 0), chars,
                                                      deadline)
        except Rejected as e:
            raise self.refuse(e) from None
        t = time.perf_counter()
        tokens: tuple[Any, Any] | None = None
        try:
            tokens = await loop.run_in_executor(self.tokenize_pool, _search_tokens, emb, self.model, plan)
        finally:
            self.admission.tokenized(ticket, tokens=int(tokens[0].size) if tokens else 0,
                                     seconds=time.perf_counter() - t if tokens else None)
        emb_tok, rr_tok = tokens
        n_special = int(self.extra["embed_special"])
        embed = Pairs([np.zeros(0, np.int32)], np.zeros(1, np.int64), [emb_tok],
                      np.array([min(emb_tok.size + n_special, int(emb.max_length))], np.int64))
        t = time.perf_counter()
        vec = await self.run_job("embed", embed, deadline, int(emb.dim), request)
        embed_ms = (time.perf_counter() - t) * 1000.0
        if not vec.scored.all():  # the deadline passed before the query was embedded: nothing to rank
            self.metrics.degraded.inc()
            return _empty_result(embed_ms, t0)
        cands = await self._first_stage(plan, vec.values[0], rr_tok)
        cands.timings["embed"] = embed_ms
        if not plan.rerank or cands.keys.size == 0 or cands.docs is None:
            return coll.finish_search(plan, cands, t0=t0)
        if self.llm:  # the prompt around the slot is tokenized here, off the loop
            with self.refusing():
                pairs, truncated = await loop.run_in_executor(
                    self.tokenize_pool, prompt_pairs, self.model, plan.query, cands.docs, instruction)
        else:
            pairs = _candidate_pairs(rr_tok, cands.docs, int(self.model.max_length), self.n_special)
            body = int(self.model.max_length) - self.n_special
            truncated = (rr_tok.size + np.fromiter((d.size for d in cands.docs), np.int64, len(cands.docs))) > body
        found = await loop.run_in_executor(self.tokenize_pool, self.lookup, pairs) if self.score_cache else None
        result = await self.score_pairs(pairs, found, deadline, request, degrade_on_refusal=True)
        cands.timings["queue"] = result.queue_s * 1000.0
        cands.timings["score"] = result.score_s * 1000.0
        if result.degraded:
            self.metrics.degraded.inc()
        scores = self.model.scores_from_logits(np.nan_to_num(result.values))
        return coll.finish_search(plan, cands, scores, result.scored, truncated, t0=t0)

    async def _first_stage(self, plan: Any, vec: npt.NDArray[np.float32], rr_tok: Any) -> Any:
        """The collection's first stage on the search pool (bounded: 429 beyond)."""
        limits = self.limits
        if self.pending_searches >= limits.max_pending_searches:
            raise self.refuse(Rejected("queue_full", f"{self.pending_searches} searches are in their first stage "
                                       f"(limit {limits.max_pending_searches}); retry later", 1.0))
        self.pending_searches += 1
        try:
            with self.refusing():
                call = partial(self.collection.first_stage, plan, vec, rr_tok)
                return await asyncio.get_running_loop().run_in_executor(self.search_pool, call)
        finally:
            self.pending_searches -= 1

    def _tokenize(self, spec: RerankSpec) -> tuple[Pairs, CacheLookup | None]:
        """On the tokenizing thread: the request's pairs, and the score cache's hits among them
        (hashing there, not on the loop)."""
        pairs = tokenize_pairs(self.model, self.rules, spec, self.limits)
        found = self.lookup(pairs)
        if found is not None:
            assert self.score_cache is not None
            self.score_cache.remember(RequestCache.request_digest(spec), found)
        return pairs, found

    def lookup(self, pairs: Pairs) -> CacheLookup | None:
        """Where a request's pairs become a scoring job: the score cache's hits (None: no cache)."""
        if self.score_cache is None:
            return None
        return self.score_cache.lookup(pairs)

    async def score_pairs(self, pairs: Pairs, found: CacheLookup | None, deadline: float, request: Request,
                          *, degrade_on_refusal: bool = False) -> JobResult:
        """Scores a request's pairs: cache hits at once, the misses as one rerank job of the queue;
        the job's scores come back into the cache. ``degrade_on_refusal``: a job the queue
        cannot take in time leaves the pairs unscored instead of answering 429."""
        cache = self.score_cache
        if found is not None and found.all_hit:  # every pair cached: nothing to queue
            assert cache is not None
            return cache.finish(found, None)
        job_pairs = pairs if found is None else RequestCache.misses(found, pairs)
        job = make_job("rerank", job_pairs, deadline, int(self.model.n_labels))
        try:
            fut = self.queue.submit(job, asyncio.get_running_loop())
        except (Rejected, BatchFailed) as e:
            if not degrade_on_refusal:
                raise self.refuse(e) from None
            result = JobResult(job.values.copy(), job.scored.copy(), 0.0, 0.0)  # nothing scored
        else:
            try:
                result = await self.queue.wait(job, fut, deadline, _disconnected(request.receive))
            except BatchFailed as e:
                raise error_of(e) from None
        return result if found is None else cache.finish(found, result)  # type: ignore[union-attr]

    async def run_job(self, kind: Any, pairs: Pairs, deadline: float, width: int, request: Request) -> JobResult:
        """Queues one job and waits for it (deadline, disconnect); refusals as ServeError."""
        job = make_job(kind, pairs, deadline, width)
        try:
            fut = self.queue.submit(job, asyncio.get_running_loop())
        except (Rejected, BatchFailed) as e:
            raise self.refuse(e) from None
        try:
            return await self.queue.wait(job, fut, deadline, _disconnected(request.receive))
        except BatchFailed as e:
            raise error_of(e) from None


def _search_tokens(emb: Any, model: Any, plan: Any) -> tuple[Any, Any]:
    """The query's token ids for the embedder and (to rerank) for the reranker."""
    (emb_tok,) = emb.tokenize([plan.query])
    rr_tok = model.tokenize([plan.query])[0] if plan.rerank else None
    return emb_tok, rr_tok


def _candidate_pairs(q: Any, docs: list[Any], max_length: int, n_special: int) -> Pairs:
    """The (query, candidate) pairs of a search; lengths after the core's truncation (longest
    first keeps exactly max_length tokens of an over-long pair)."""
    raw = q.size + np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
    return Pairs([q], np.zeros(len(docs), np.int64), docs, np.minimum(raw, max_length - n_special) + n_special)


def _empty_result(embed_ms: float, t0: float) -> Any:
    from ..collection import SearchResult  # type: ignore[import-not-found,unused-ignore]

    return SearchResult(hits=[], degraded=True, timings={"embed": embed_ms, "total": (time.perf_counter() - t0) * 1000})


async def _disconnected(receive: Callable[[], Awaitable[Any]]) -> None:
    """Returns when the client goes away (ASGI http.disconnect); no polling."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _ranking(model: Reranker, result: JobResult, raw: bool) -> tuple[npt.NDArray[np.int64], list[float | None]]:
    """Ranked document indices (scored best first, ties in input order; then the unscored in input
    order) and each document's score (None when not scored)."""
    scored = np.flatnonzero(result.scored)
    values = model.scores_from_logits(result.values[scored], raw=raw).astype(np.float64)
    best = scored[np.argsort(-values, kind="stable")]
    order = np.concatenate([best, np.flatnonzero(~result.scored)]).astype(np.int64)
    scores: list[float | None] = [None] * result.scored.size
    for i, v in zip(scored.tolist(), values.tolist()):
        scores[i] = v if math.isfinite(v) else None
    return order, scores


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _timing_headers(t_tok: float, result: JobResult | None, total: float) -> dict[str, str]:
    h = {"X-Tokenize-Time": _ms(t_tok), "X-Total-Time": _ms(total)}
    if result is not None:
        h["X-Queue-Time"] = _ms(result.queue_s)
        h["X-Score-Time"] = _ms(result.score_s)
        h["X-Tailrank-Degraded"] = "true" if result.degraded else "false"
    return h


def _finite(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def add_routes(app: FastAPI, server: Server) -> None:
    """Registers every route of the API on ``app``."""
    model = server.model
    errors: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (401, 413, 422, 429, 500, 503)}

    async def rerank(
        request: Request,
        body: RerankRequest,
        x_request_timeout_ms: float = _TIMEOUT_HEADER,  # None when absent
    ) -> Response:
        t0 = arrival_of(request.scope)
        deadline = t0 + deadline_s(x_request_timeout_ms, body.deadline_ms, server.default_deadline_ms)
        with server.refusing():
            spec = rerank_spec(body, server.limits, auto_truncate=server.auto_truncate, llm=server.llm)
        result, t_tok, tokens = None, 0.0, 0
        if spec.texts:
            result, t_tok, tokens = await server.rerank(request, spec, deadline)
        if isinstance(body, TeiRerankRequest):
            payload: Any = _tei_body(model, body, spec, result)
        else:
            payload = _cohere_body(model, body, spec, result, tokens, request.url.path, server.model_name)
        total = time.monotonic() - t0
        server.metrics.stage_seconds.labels("total").observe(total)
        return JSONResponse(payload, headers=_timing_headers(t_tok, result, total))

    for path in RERANK_PATHS:
        app.add_api_route(
            path, rerank, methods=["POST"], response_model=RerankResponse, responses=errors,  # type: ignore[arg-type]
            summary="Rerank documents for a query (Cohere/Jina or TEI dialect)", tags=["rerank"],
        )

    @app.post("/search", response_model=SearchResponse, responses={**errors, 404: {"model": ErrorBody}},
              tags=["search"])
    async def search(
        request: Request,
        body: SearchRequest,
        x_request_timeout_ms: float = _TIMEOUT_HEADER,  # None when absent
    ) -> Response:
        """First stage, then rerank, on the served collection."""
        t0 = arrival_of(request.scope)
        if server.collection is None or server.search_pool is None:
            raise ServeError(404, "no collection is served (start with --collection DIR)", "not_found")
        deadline = t0 + deadline_s(x_request_timeout_ms, body.deadline_ms, server.default_deadline_ms)
        with server.refusing():
            spec = search_spec(body, server.limits, llm=server.llm)
            plan = server.collection.plan_search(spec.query, k=spec.k, candidates=spec.candidates,
                                                 filter=spec.filter, rerank=spec.rerank, **spec.options)
        res = await server.search(request, plan, deadline, t0, spec.instruction)
        return _search_response(server, res, t0)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={s: {"model": ErrorBody} for s in (401, 503)})
    async def ready() -> Response:
        """Readiness: the model is loaded, warmed and its throughput measured."""
        if not server.admission.ready:
            return JSONResponse({"detail": "the model is loading or failed to start", "error_type": "not_ready"}, 503)
        return JSONResponse({
            "status": "ready",
            "model": server.model_name,
            "fingerprint": str(getattr(model, "fingerprint", "")),
            "tokens_per_second": round(server.admission.tokens_per_s, 1),
            "collection": server.collection is not None,
        })

    @app.get("/metrics", tags=["ops"], response_class=Response, responses={
        200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {"model": ErrorBody, "content": {"application/json": {}}},
    })
    async def metrics_endpoint() -> Response:
        """Prometheus text exposition."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _cohere_body(model: Reranker, body: CohereRerankRequest, spec: RerankSpec, result: JobResult | None,
                 tokens: int, path: str, model_name: str) -> dict[str, Any]:
    if result is not None:
        order, scores = _ranking(model, result, raw=False)
    else:
        order, scores = np.zeros(0, np.int64), []
    if body.top_n is not None:
        order = order[: body.top_n]
    results = []
    for i in order.tolist():
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            item["document"] = {"text": spec.texts[i]}
        results.append(item)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {
            "api_version": {"version": "1" if path.startswith("/v1/") else "2"},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            "model": body.model or model_name,
            "degraded": bool(result is not None and result.degraded),
            "scored": int(result.scored.sum()) if result is not None else 0,
        },
        "usage": {"total_tokens": tokens},
    }


def _tei_body(model: Reranker, body: TeiRerankRequest, spec: RerankSpec, result: JobResult | None
              ) -> list[dict[str, Any]]:
    if result is None:
        return []
    order, scores = _ranking(model, result, raw=body.raw_scores)
    ranks = []
    for i in order.tolist():
        item: dict[str, Any] = {"index": i, "score": scores[i]}
        if body.return_text:
            item["text"] = spec.texts[i]
        ranks.append(item)
    return ranks


def _search_hit(h: Any, fused: bool) -> dict[str, Any]:
    """One hit as ``SearchHit``: the ranking score and each of the scores it came from."""
    reranked = bool(h.reranked)
    rerank = _finite(h.rerank_score) if reranked and h.rerank_score is not None else None
    return {"id": h.id if isinstance(h.id, (int, str)) else int(h.id), "score": _finite(h.score),
            "first_stage_score": _finite(h.first_stage_score), "rerank_score": rerank,
            "fused_score": _finite(h.score) if fused and reranked else None, "text": h.text,
            "metadata": h.metadata, "truncated": bool(h.truncated), "reranked": reranked}


def _search_response(server: Server, res: Any, t0: float) -> Response:
    fusion = str(res.fusion)
    hits = [_search_hit(h, fusion != "none") for h in res.hits]
    timings = {k: float(v) for k, v in dict(res.timings).items()}
    headers = {f"X-{k.replace('_', '-').title()}-Time": f"{v:.3f}" for k, v in timings.items()}
    headers.setdefault("X-Total-Time", _ms(time.monotonic() - t0))
    headers["X-Tailrank-Degraded"] = "true" if res.degraded else "false"
    for stage, v in timings.items():
        server.metrics.search_stage_seconds.labels(stage).observe(v / 1000.0)
    if res.degraded:
        server.metrics.degraded.inc()
    weight = None if res.fusion_weight is None else float(res.fusion_weight)
    return JSONResponse({"hits": hits, "degraded": bool(res.degraded), "fusion": fusion, "fusion_weight": weight,
                         "timings": timings}, headers=headers)
