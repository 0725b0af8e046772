"""Cross-request batching for one model session: admission, earliest-deadline-first rounds under a
token budget, and results handed back to the asyncio loop.

The pairs of every admitted request join one queue. A single scheduler thread forms a *round*:
it takes pairs in earliest-deadline-first order (within a request, in input order) until the
round's real tokens reach ``max_batch_tokens`` or the round would end after the deadline of a
request in it. The round's pairs, whatever their queries, are assembled in one native call
(``PairBatcher.assemble_multi``: length-sorted, minimally padded batches) and scored. A round
whose model call raises fails exactly the requests that had pairs in it; the thread goes on.

Admission is decided when a request arrives, from the measured throughput (an EWMA of real
tokens per second over rounds, seeded by a calibration at start): a request that could not be
scored by its deadline behind the work already queued ahead of it is refused at once
(:class:`Rejected`, HTTP 429 with Retry-After) instead of waiting in the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._ort import Priority, check_priority, lower_thread_priority
from .metrics import ServeMetrics

__all__ = ["Reranker", "Job", "JobResult", "Rejected", "BatchFailed", "Scheduler"]

log = logging.getLogger("tailrank.serve")

# EWMA weight of the newest round in the throughput estimate.
_ALPHA = 0.2
# Fixed cost of a round beyond its tokens (assembly, Python, thread hand-offs), seconds.
_ROUND_OVERHEAD_S = 0.002
# Rounds are planned to use this share of the time left before a deadline: the throughput is an
# estimate, and a round that ends after its deadline is wasted (the request was answered without it).
_PLAN_SHARE = 0.85


class Reranker(Protocol):
    """What the scheduler needs from a model (``tailrank.CrossEncoder`` provides it)."""

    max_length: int
    n_labels: int

    def batcher(self, max_batch_size: int | None = None) -> Any: ...

    def score_assembly(
        self, assembly: Any, *, deadline: float | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...

    def scores_from_logits(self, logits: npt.ArrayLike, *, raw: bool = False) -> npt.NDArray[np.float32]: ...

    def tokenize(self, texts: Sequence[str]) -> list[npt.NDArray[np.int32]]: ...

    def document_tokens(self, documents: Sequence[str], query_len: int = 0) -> list[npt.NDArray[np.int32]]: ...


class Rejected(Exception):
    """Refused at admission: ``reason`` is a metrics label, ``retry_after_s`` a hint for clients."""

    def __init__(self, reason: str, message: str, retry_after_s: float, status: int = 429) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status


class BatchFailed(Exception):
    """The model raised on a round holding this request's pairs."""


@dataclass(frozen=True)
class JobResult:
    """Logits (NaN where not scored) and the scored mask, in the request's document order."""

    logits: npt.NDArray[np.float32]
    scored: npt.NDArray[np.bool_]
    queue_s: float
    score_s: float

    @property
    def degraded(self) -> bool:
        return not bool(self.scored.all())


class Job:
    """One request's pairs and its progress; the scheduler's lock guards the mutable fields."""

    def __init__(
        self,
        queries: list[npt.NDArray[np.int32]],
        query_index: npt.NDArray[np.int64],
        docs: list[npt.NDArray[np.int32]],
        lengths: npt.NDArray[np.int64],
        deadline: float,
        n_labels: int,
    ) -> None:
        self.queries = queries
        self.query_index = query_index
        self.docs = docs
        self.lengths = lengths
        self.cum_tokens = np.concatenate(([0], np.cumsum(lengths)))
        self.deadline = deadline
        self.n = len(docs)
        self.logits = np.full((self.n, n_labels), np.nan, dtype=np.float32)
        self.scored = np.zeros(self.n, dtype=bool)
        self.next = 0  # first pair not yet handed to a round
        self.unprocessed = self.n  # pairs neither scored nor given up
        self.done = False
        self.enqueued = 0.0
        self.started: float | None = None
        self.future: asyncio.Future[JobResult] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def tokens(self) -> int:
        return int(self.cum_tokens[-1])

    @property
    def tokens_left(self) -> int:
        """Tokens not yet handed to a round."""
        return int(self.cum_tokens[-1] - self.cum_tokens[self.next])

    def snapshot(self, now: float) -> JobResult:
        started = self.started if self.started is not None else now
        return JobResult(self.logits.copy(), self.scored.copy(), started - self.enqueued, now - started)


@dataclass
class _Round:
    items: list[tuple[Job, int, int]]  # (job, first pair, end pair)
    tokens: int


def _resolve(fut: asyncio.Future[JobResult], value: JobResult | BaseException) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


class Scheduler:
    """One thread that batches the pairs of all requests for one model session.

    Args:
        model: The reranker (see :class:`Reranker`).
        max_batch_tokens: Real tokens per round (a round may be several model batches of the
            model's own ``batch_tokens``); >= the model's max_length.
        max_queue_pairs: Pairs admitted and not yet scored, at most; beyond it requests are
            refused (reason ``queue_full``).
        metrics: Where to record.
        round_hook: Called on the scheduler thread with the jobs of each round before it runs
            (tests use it to observe and to hold rounds).
        nice: The scheduler thread (which runs its share of each batch) lowers its own priority
            by this many nice steps, or to SCHED_IDLE with ``"idle"`` (Linux), below the event
            loop that admits and refuses requests.
    """

    def __init__(
        self,
        model: Reranker,
        *,
        max_batch_tokens: int,
        max_queue_pairs: int,
        metrics: ServeMetrics,
        round_hook: Callable[[list[Job]], None] | None = None,
        nice: Priority = 0,
    ) -> None:
        if max_batch_tokens < model.max_length:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be >= the model's max_length ({model.max_length})"
            )
        self.model = model
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue_pairs = int(max_queue_pairs)
        self.metrics = metrics
        self.round_hook = round_hook
        self.nice = check_priority(nice)
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._queued_pairs = 0  # unprocessed pairs of jobs not done
        self._queued_jobs = 0
        self._rate = 0.0  # real tokens per second
        self._inflight: tuple[float, int] | None = None  # (round start, its tokens)
        self._closed = False
        self._failure: BaseException | None = None  # the thread died: every later request fails
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.batcher: Any = None  # the scheduler thread's PairBatcher (truncate_lengths is thread-safe)
        self.n_special = 0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="tailrank-scheduler", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits for the model's calibration; raises the error if the thread failed to start."""
        ok = self._ready.wait(timeout)
        if self._failure is not None:
            raise RuntimeError(f"the scheduler failed: {self._failure!r}") from self._failure
        return ok

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._failure is None and not self._closed

    @property
    def tokens_per_second(self) -> float:
        return self._rate

    def close(self) -> None:
        """Stops the thread; requests still queued get an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # --- admission -----------------------------------------------------------------------------

    def _tokens_ahead(self, deadline: float, now: float) -> tuple[int, bool]:
        """Tokens to score before a request with ``deadline`` gets its turn (EDF), and whether
        any queued request is ahead of it."""
        ahead = 0
        queued = False
        for d, _, job in self._heap:
            if not job.done and d <= deadline and job.tokens_left:
                ahead += job.tokens_left
                queued = True
        if self._inflight is not None and self._rate > 0:
            start, tokens = self._inflight
            ahead += max(0, int(tokens - (now - start) * self._rate))
        return ahead, queued

    def check_admission(self, tokens: int, pairs: int, deadline: float, *, lead_s: float = 0.0,
                        busy: bool = False) -> None:
        """Raises :class:`Rejected` if a request of ``tokens`` real tokens in ``pairs`` pairs
        could not be scored by ``deadline`` (``time.monotonic()``) behind the queued work.

        ``lead_s`` is time the request needs before it can be queued (its tokenization behind
        others); ``busy`` says that work (other requests' tokenization) is ahead of it there.
        An idle server admits anything (a request too large for its deadline is then ranked in
        part, degraded, rather than refused).
        """
        with self._cond:
            self._admit_locked(tokens, pairs, deadline, time.monotonic(), lead_s, busy)

    def _admit_locked(self, tokens: int, pairs: int, deadline: float, now: float, lead_s: float = 0.0,
                      busy: bool = False) -> None:
        if self._failure is not None or self._closed or not self._ready.is_set():
            raise Rejected("not_ready", "the model is not ready; retry shortly", 1.0, status=503)
        rate = max(self._rate, 1e-9)
        if self._queued_pairs + pairs > self.max_queue_pairs:
            excess = self._queued_pairs + pairs - self.max_queue_pairs
            per_pair = self._queued_tokens_estimate() / max(1, self._queued_pairs)
            raise Rejected(
                "queue_full",
                f"the queue is full ({self._queued_pairs} pairs waiting, limit {self.max_queue_pairs}); retry later",
                excess * per_pair / rate,
            )
        ahead, queued = self._tokens_ahead(deadline, now)
        # Its pairs start once both its tokenization and the work ahead of it are done.
        start = max(lead_s, ahead / rate)
        finish = now + start + tokens / rate + _ROUND_OVERHEAD_S
        if (queued or busy) and finish > deadline:
            raise Rejected(
                "deadline",
                f"overloaded: about {start * 1000:.0f} ms of queued work is ahead of this request, which needs "
                f"{tokens / rate * 1000:.0f} ms more; it could not finish within its deadline "
                f"({(deadline - now) * 1000:.0f} ms left)",
                finish - deadline,
            )

    def _queued_tokens_estimate(self) -> int:
        return sum(job.tokens_left for _, _, job in self._heap if not job.done)

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> asyncio.Future[JobResult]:
        """Admits and enqueues ``job``; its future resolves on ``loop`` with a :class:`JobResult`
        (degraded when the deadline cut it short) or :class:`BatchFailed`."""
        now = time.monotonic()
        with self._cond:
            self._admit_locked(job.tokens, job.n, job.deadline, now)
            job.enqueued = now
            job.loop = loop
            job.future = loop.create_future()
            heapq.heappush(self._heap, (job.deadline, next(self._seq), job))
            self._queued_pairs += job.n
            self._queued_jobs += 1
            self._gauges()
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> JobResult | None:
        """Gives up on ``job`` (deadline reached or client gone): its pairs not yet scored are
        dropped before compute. Returns what it has so far, or None if it had already finished
        (its future then holds, or is about to hold, the result)."""
        with self._cond:
            if job.done:
                return None
            result = job.snapshot(time.monotonic())
            self._finish_locked(job, None)
            return result

    # --- the scheduler thread ------------------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.queue_pairs.set(self._queued_pairs)
        self.metrics.queue_requests.set(self._queued_jobs)

    def _finish_locked(self, job: Job, value: JobResult | BaseException | None) -> None:
        """Marks ``job`` done and hands ``value`` (if any) to its loop."""
        job.done = True
        self._queued_pairs -= job.unprocessed
        self._queued_jobs -= 1
        job.unprocessed = 0
        self._gauges()
        if value is not None and job.loop is not None and job.future is not None:
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, value)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _main(self) -> None:
        lower_thread_priority(self.nice)
        try:
            self.batcher = self.model.batcher()
            self.n_special = int(self.batcher.template.n_special)
            self._calibrate()
        except BaseException as e:  # noqa: BLE001 - reported through wait_ready / ready
            log.exception("tailrank serve: the model failed its calibration")
            self._failure = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave requests hanging
            log.exception("tailrank serve: the scheduler thread failed")
            with self._cond:
                self._failure = e
        with self._cond:
            err = BatchFailed(
                "the server is shutting down" if self._failure is None else f"scheduler failed: {self._failure!r}"
            )
            while self._heap:
                _, _, job = heapq.heappop(self._heap)
                if not job.done:
                    self._finish_locked(job, err)

    def _calibrate(self) -> None:
        """Measures tokens/s on synthetic pairs (pad tokens) so that admission works from the
        first request; rounds then refine it."""
        pad = int(self.batcher.template.pad_id)
        body = self.model.max_length - self.n_special
        doc_len = max(1, body - 8)
        rows = max(1, self.max_batch_tokens // self.model.max_length)
        query = np.full(min(8, body - doc_len) or 1, pad, dtype=np.int32)
        docs = [np.full(doc_len, pad, dtype=np.int32)] * rows
        for _ in range(2):  # the second run is the warm one
            t0 = time.perf_counter()
            assembly = self.batcher.assemble_multi([query], np.zeros(rows, dtype=np.int64), docs)
            self.model.score_assembly(assembly)
            dt = time.perf_counter() - t0
        self._rate = assembly.real_tokens / max(dt, 1e-6)
        self.metrics.throughput.set(self._rate)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                rnd = self._take_round(time.monotonic())
                if rnd is not None:
                    self._inflight = (time.monotonic(), rnd.tokens)
            if rnd is not None:
                self._execute(rnd)

    def _take_round(self, now: float) -> _Round | None:
        """Pops pairs in deadline order (the lock is held). Requests whose next pair could not
        be scored before their deadline are answered now with what they have (degraded)."""
        items: list[tuple[Job, int, int]] = []
        tokens = 0
        round_deadline = math.inf
        rate = self._rate
        while self._heap:
            job = self._heap[0][2]
            if job.done:
                heapq.heappop(self._heap)
                continue
            # Tokens that still end before every deadline in the round (this job's included).
            left = min(round_deadline, job.deadline) - now - _ROUND_OVERHEAD_S
            by_time = left * _PLAN_SHARE * rate - tokens
            room = min(self.max_batch_tokens - tokens, by_time)
            start = job.next
            end = int(np.searchsorted(job.cum_tokens, job.cum_tokens[start] + room, side="right")) - 1
            end = min(max(end, start), job.n)
            if end == start:
                if items:
                    break  # the round is full (tokens or time)
                # Not one more pair fits before its deadline: answer with what it has.
                heapq.heappop(self._heap)
                if job.started is None:
                    self.metrics.rejections.labels("expired").inc()
                self._finish_locked(job, job.snapshot(now))
                continue
            items.append((job, start, end))
            tokens += int(job.cum_tokens[end] - job.cum_tokens[start])
            round_deadline = min(round_deadline, job.deadline)
            job.next = end
            if end < job.n:
                break  # budget reached inside this job
            heapq.heappop(self._heap)  # all its pairs are out; it stays alive until scored
        return _Round(items, tokens) if items else None

    def _execute(self, rnd: _Round) -> None:
        queries: list[npt.NDArray[np.int32]] = []
        index: list[npt.NDArray[np.int64]] = []
        docs: list[npt.NDArray[np.int32]] = []
        t0 = time.monotonic()
        for job, a, b in rnd.items:
            if job.started is None:
                job.started = t0
                self.metrics.stage_seconds.labels("queue").observe(t0 - job.enqueued)
            index.append(job.query_index[a:b] + len(queries))
            queries.extend(job.queries)
            docs.extend(job.docs[a:b])
        jobs = [job for job, _, _ in rnd.items]
        try:
            if self.round_hook is not None:
                self.round_hook(jobs)
            assembly = self.batcher.assemble_multi(queries, np.concatenate(index), docs)
            logits, scored = self.model.score_assembly(assembly, deadline=max(j.deadline for j in jobs))
        except Exception as e:  # noqa: BLE001 - the model's error fails exactly this round's requests
            log.error("tailrank serve: a batch of %d pairs from %d requests failed: %r", len(docs), len(jobs), e)
            self.metrics.batch_failures.inc()
            err = BatchFailed(f"{type(e).__name__}: {e}")
            with self._cond:
                self._inflight = None
                for job in jobs:
                    if not job.done:
                        self._finish_locked(job, err)
            return
        dt = time.monotonic() - t0
        self.metrics.round_seconds.observe(dt)
        self.metrics.batch_requests.observe(len(jobs))
        for batch in assembly.batches:
            self.metrics.batch_rows.observe(batch.input_ids.shape[0])
            self.metrics.batch_tokens.observe(batch.input_ids.size)
        if scored.all() and dt > 0:
            measured = assembly.real_tokens / dt
            self._rate = (1 - _ALPHA) * self._rate + _ALPHA * measured
            self.metrics.throughput.set(self._rate)
        now = time.monotonic()
        with self._cond:
            self._inflight = None
            offset = 0
            for job, a, b in rnd.items:
                k = b - a
                if not job.done:
                    job.logits[a:b] = logits[offset : offset + k]
                    job.scored[a:b] = scored[offset : offset + k]
                    job.unprocessed -= k
                    self._queued_pairs -= k
                    if job.unprocessed == 0:
                        self._finish_locked(job, job.snapshot(now))
                offset += k
            self._gauges()
