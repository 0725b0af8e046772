"""The queue: admitted jobs in earliest-deadline-first order, and the batcher thread that forms
and assembles the next round while an executor runs the current one.

A *job* is one request's pairs for one model (``"rerank"``: query/document pairs for the
cross-encoder; ``"embed"``: a search's query for the bi-encoder). The batcher thread takes pairs
in deadline order (within a job, in input order) until the round's real tokens reach the kind's
budget or the round would end after the deadline of a job in it, assembles them in one native
call (``assemble_multi``: length-sorted, minimally padded batches) and leaves the round in its
kind's one-round slot. The kind's executor takes it from there, and the batcher forms the next
one meanwhile: two rounds' host inputs exist at once (the core's buffers are reference-counted,
so the second assembly takes a fresh buffer while the first is being read).

Jobs whose next pair cannot end before their deadline are answered with what they have
(degraded); a job cancelled (deadline, client gone) is dropped before compute, and a formed round
whose jobs are all gone is skipped. Every waiter gets a result or an error, even at shutdown.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .._ort import Priority, lower_thread_priority
from .admission import ROUND_OVERHEAD_S, Admission
from .errors import BatchFailed, ServeError
from .metrics import ServeMetrics
from .validate import Pairs

__all__ = ["Kind", "Assemble", "Job", "JobResult", "Round", "Queue", "make_job"]

log = logging.getLogger("tailrank.serve")

Kind = Literal["rerank", "embed"]
# Rounds are planned to use this share of the time left before a deadline: the speed is an
# estimate, and a round that ends after its deadline is wasted (the request was answered without it).
_PLAN_SHARE = 0.85


@dataclass(frozen=True)
class JobResult:
    """Model outputs per pair (logits, or embeddings; NaN where not scored) and the scored mask,
    in the request's order."""

    values: npt.NDArray[np.float32]
    scored: npt.NDArray[np.bool_]
    queue_s: float
    score_s: float

    @property
    def degraded(self) -> bool:
        return not bool(self.scored.all())


class Job:
    """One request's pairs for one model and their progress; the queue's lock guards the
    mutable fields."""

    def __init__(self, kind: Kind, pairs: Pairs, deadline: float, width: int) -> None:
        self.kind = kind
        self.queries = pairs.queries
        self.query_index = pairs.query_index
        self.docs = pairs.docs
        self.lengths = pairs.lengths
        self.keep_ends = pairs.keep_ends
        self.cum_tokens = np.concatenate(([0], np.cumsum(pairs.lengths))).astype(np.int64)
        # LLM rerankers: the prompt's prefix tokens, run once in each round that holds this job.
        self.prompt_tokens = int(pairs.prompt_tokens)
        self.deadline = deadline
        self.n = len(pairs.docs)
        self.values = np.full((self.n, width), np.nan, dtype=np.float32)
        self.scored = np.zeros(self.n, dtype=bool)
        self.next = 0  # first pair not yet handed to a round
        self.unprocessed = self.n  # pairs neither scored nor given up
        self.unprocessed_tokens = int(self.cum_tokens[-1]) + self.prompt_tokens
        self.done = False
        self.enqueued = 0.0
        self.started: float | None = None
        self.future: asyncio.Future[JobResult] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def tokens(self) -> int:
        return int(self.cum_tokens[-1]) + self.prompt_tokens

    def tokens_between(self, a: int, b: int) -> int:
        return int(self.cum_tokens[b] - self.cum_tokens[a])

    def snapshot(self, now: float) -> JobResult:
        started = self.started if self.started is not None else now
        return JobResult(self.values.copy(), self.scored.copy(), started - self.enqueued, now - started)


def make_job(kind: Kind, pairs: Pairs, deadline: float, width: int) -> Job:
    """Where a request's pairs become a scoring job (the one place to look pairs up before
    they are queued)."""
    return Job(kind, pairs, deadline, width)


@dataclass
class Round:
    kind: Kind
    items: list[tuple[Job, int, int]]  # (job, first pair, end pair)
    tokens: int
    assembly: Any = None
    jobs: list[Job] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return sum(b - a for _, a, b in self.items)


def _resolve(fut: asyncio.Future[JobResult], value: JobResult | BaseException) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


Assemble = Callable[..., Any]
"""``(queries, query_index, docs, *, keep_ends) -> assembly``: ``PairBatcher.assemble_multi``."""


@dataclass
class _Lane:
    """One kind's queue state: its heap, its token budget, its assembler, its one-round slot."""

    budget: int
    make_assembler: Callable[[], Assemble]
    heap: list[tuple[float, int, Job]] = field(default_factory=list)
    slot: Round | None = None
    forming: bool = False
    running: tuple[float, int] | None = None  # (start, tokens) of the round its executor runs
    assemble: Assemble | None = None


class Queue:
    """EDF rounds over every admitted job, formed by one batcher thread.

    Args:
        admission: The running totals every admitted pair counts in.
        metrics: Where to record.
        clock: ``time.monotonic`` or a stand-in (tests); deadlines are on this clock.
    """

    def __init__(self, admission: Admission, metrics: ServeMetrics, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.admission = admission
        self.metrics = metrics
        self.clock = clock
        self._cond = threading.Condition()
        self._lanes: dict[Kind, _Lane] = {}
        self._seq = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add_kind(self, kind: Kind, *, max_batch_tokens: int,
                 make_assembler: Callable[[], Assemble]) -> None:
        """A model served by this queue: its token budget per round and a factory (called on the
        batcher thread) of its assembly function (:data:`Assemble`)."""
        self._lanes[kind] = _Lane(int(max_batch_tokens), make_assembler)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, nice: Priority = 0) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._batcher_main, args=(nice,), name="tailrank-batcher",
                                            daemon=True)
            self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def close(self, why: str = "the server is shutting down") -> None:
        """Stops the batcher; executors' :meth:`take` returns None; every job still waiting gets
        an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        err = BatchFailed(why)
        with self._cond:
            for lane in self._lanes.values():
                rounds = [lane.slot] if lane.slot is not None else []
                lane.slot = None
                for _, _, job in lane.heap:
                    self._finish_locked(job, err)
                lane.heap.clear()
                for rnd in rounds:
                    for job in rnd.jobs:
                        self._finish_locked(job, err)

    # --- requests (the event loop) ---------------------------------------------------------

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> asyncio.Future[JobResult]:
        """Admits (on its real tokens) and enqueues ``job``; its future resolves on ``loop``."""
        with self._cond:
            if self._closed:
                raise BatchFailed("the server is shutting down")
            self.admission.enqueue(job.tokens, job.n, job.deadline)  # raises Rejected
            job.enqueued = self.clock()
            job.loop = loop
            job.future = loop.create_future()
            heapq.heappush(self._lanes[job.kind].heap, (job.deadline, next(self._seq), job))
            self._gauges()
            self._cond.notify_all()
        return job.future

    def cancel(self, job: Job) -> JobResult | None:
        """Gives up on ``job`` (deadline reached or client gone): its pairs not yet scored are
        dropped before compute. Returns what it has so far, or None if it had already finished
        (its future then holds, or is about to hold, the result)."""
        with self._cond:
            if job.done:
                return None
            result = job.snapshot(self.clock())
            self._finish_locked(job, None)
            return result

    async def wait(self, job: Job, fut: asyncio.Future[JobResult], deadline: float,
                   disconnected: Awaitable[None]) -> JobResult:
        """The job's result, or at the deadline what it has; a client that disconnects cancels
        it (ServeError 499)."""
        gone = asyncio.ensure_future(disconnected)
        waiters: set[asyncio.Future[Any]] = {fut, gone}
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, deadline - self.clock()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not fut.done():
            partial = self.cancel(job)
            if partial is None:  # it finished meanwhile: the result is on its way
                return await fut
            if gone in done:
                self.metrics.rejections.labels("disconnected").inc()
                raise ServeError(499, "the client disconnected", "disconnected")
            return partial
        return await fut

    # --- bookkeeping (lock held) -----------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.queue_pairs.set(self.admission.queued_pairs)
        self.metrics.queue_requests.set(self.admission.queued_jobs)

    def _finish_locked(self, job: Job, value: JobResult | BaseException | None) -> None:
        """Marks ``job`` done, settles what it had left, and hands ``value`` (if any) to its loop."""
        if job.done:
            return
        job.done = True
        self.admission.settled(tokens=job.unprocessed_tokens, pairs=job.unprocessed, job_done=True)
        job.unprocessed = job.unprocessed_tokens = 0
        self._gauges()
        if value is not None and job.loop is not None and job.future is not None:
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, value)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    # --- the batcher thread ----------------------------------------------------------------

    def _batcher_main(self, nice: Priority) -> None:
        lower_thread_priority(nice)
        try:
            for lane in self._lanes.values():
                lane.assemble = lane.make_assembler()
            while True:
                with self._cond:
                    kind = self._next_kind()
                    while kind is None and not self._closed:
                        self._cond.wait()
                        kind = self._next_kind()
                    if self._closed:
                        return
                    assert kind is not None
                    lane = self._lanes[kind]
                    rnd = self._form(kind, lane, self.clock())
                    if rnd is None:
                        continue
                    lane.forming = True
                self._assemble(lane, rnd)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave requests hanging
            log.exception("tailrank serve: the batcher thread failed")
            self.admission.fail(f"the batcher failed: {e!r}")
            threading.Thread(target=self.close, args=(f"the batcher failed: {e!r}",), daemon=True).start()

    def _next_kind(self) -> Kind | None:
        """The kind whose earliest live job is the earliest, among kinds with a free slot."""
        best: tuple[float, Kind] | None = None
        for kind, lane in self._lanes.items():
            while lane.heap and lane.heap[0][2].done:
                heapq.heappop(lane.heap)
            if lane.heap and lane.slot is None and not lane.forming:
                d = lane.heap[0][0]
                if best is None or d < best[0]:
                    best = (d, kind)
        return None if best is None else best[1]

    def _form(self, kind: Kind, lane: _Lane, now: float) -> Round | None:
        """Pops pairs in deadline order (lock held), planned to start when the round running now
        ends. Jobs whose next pair could not end before their deadline are answered now with
        what they have (degraded)."""
        rate = self.admission.tokens_per_s
        start = now
        if lane.running is not None and rate > 0:
            t0, tokens = lane.running
            start = max(now, t0 + tokens / rate)
        items: list[tuple[Job, int, int]] = []
        tokens = 0
        round_deadline = math.inf
        heap = lane.heap
        while heap:
            job = heap[0][2]
            if job.done:
                heapq.heappop(heap)
                continue
            # Tokens that still end before every deadline in the round (this job's included).
            left = min(round_deadline, job.deadline) - start - ROUND_OVERHEAD_S
            by_time = left * _PLAN_SHARE * rate - tokens if rate > 0 else math.inf
            # An LLM job's prefix runs once in this round on top of its pairs' tokens.
            room = min(lane.budget - tokens, by_time) - job.prompt_tokens
            a = job.next
            b = int(np.searchsorted(job.cum_tokens, job.cum_tokens[a] + room, side="right")) - 1
            b = min(max(b, a), job.n)
            if b == a:
                if items:
                    break  # the round is full (tokens or time)
                # Not one more pair fits before its deadline: answer with what it has.
                heapq.heappop(heap)
                if job.started is None:
                    self.metrics.rejections.labels("expired").inc()
                self._finish_locked(job, job.snapshot(now))
                continue
            items.append((job, a, b))
            tokens += job.tokens_between(a, b) + job.prompt_tokens
            round_deadline = min(round_deadline, job.deadline)
            job.next = b
            if b < job.n:
                break  # budget reached inside this job
            heapq.heappop(heap)  # all its pairs are out; it stays alive until scored
        if not items:
            return None
        return Round(kind, items, tokens, jobs=[job for job, _, _ in items])

    def _assemble(self, lane: _Lane, rnd: Round) -> None:
        """Builds the round's host inputs (outside the lock) and leaves it in the lane's slot."""
        queries: list[npt.NDArray[np.int32]] = []
        index: list[npt.NDArray[np.int64]] = []
        docs: list[npt.NDArray[np.int32]] = []
        for job, a, b in rnd.items:
            index.append(job.query_index[a:b] + len(queries))
            queries.extend(job.queries)
            docs.extend(job.docs[a:b])
        # Left-truncated pairs share the round; the core keeps their ends (None: every pair's starts).
        keep_ends = None
        if any(job.keep_ends is not None for job, _, _ in rnd.items):
            keep_ends = np.concatenate([job.keep_ends[a:b] if job.keep_ends is not None else np.zeros(b - a, bool)
                                        for job, a, b in rnd.items])
        assert lane.assemble is not None
        try:
            rnd.assembly = lane.assemble(queries, np.concatenate(index), docs, keep_ends=keep_ends)
        except Exception as e:  # noqa: BLE001 - bad pairs fail exactly this round's requests
            with self._cond:
                lane.forming = False
                self._fail_locked(rnd, e)
                self._cond.notify_all()
            return
        with self._cond:
            lane.forming = False
            lane.slot = rnd
            self._cond.notify_all()

    # --- executors -------------------------------------------------------------------------

    def take(self, kind: Kind) -> Round | None:
        """The next assembled round of ``kind`` (blocks); None once the queue is closed."""
        lane = self._lanes[kind]
        with self._cond:
            while lane.slot is None and not self._closed:
                self._cond.wait()
            rnd = lane.slot
            if self._closed or rnd is None:
                return None  # a round left in the slot is failed by close()
            lane.slot = None
            now = self.clock()
            lane.running = (now, rnd.tokens)
            for job in rnd.jobs:
                if job.started is None and not job.done:
                    job.started = now
                    self.metrics.stage_seconds.labels("queue").observe(now - job.enqueued)
            self._cond.notify_all()  # the batcher may form the next round now
        return rnd

    def live(self, rnd: Round) -> list[Job]:
        with self._cond:
            return [job for job in rnd.jobs if not job.done]

    def skip(self, rnd: Round) -> None:
        """Its jobs are all gone: nothing to compute."""
        with self._cond:
            self._lanes[rnd.kind].running = None
            self._cond.notify_all()

    def deliver(self, rnd: Round, values: npt.NDArray[np.float32], scored: npt.NDArray[np.bool_]) -> None:
        """A round's outputs came back (in the round's pair order)."""
        now = self.clock()
        with self._cond:
            self._lanes[rnd.kind].running = None
            offset = 0
            for job, a, b in rnd.items:
                k = b - a
                if not job.done:
                    self._scores_returned(job, a, b, values[offset : offset + k], scored[offset : offset + k])
                    if job.unprocessed == 0:
                        self._finish_locked(job, job.snapshot(now))
                offset += k
            self._gauges()
            self._cond.notify_all()

    def _scores_returned(self, job: Job, a: int, b: int, values: npt.NDArray[np.float32],
                         scored: npt.NDArray[np.bool_]) -> None:
        """Where a job's scores come back: pairs [a, b) of ``job`` (lock held)."""
        job.values[a:b] = values
        job.scored[a:b] = scored
        tokens = job.tokens_between(a, b)
        job.unprocessed -= b - a
        job.unprocessed_tokens -= tokens
        self.admission.settled(tokens=tokens, pairs=b - a, job_done=False)

    def fail(self, rnd: Round, error: BaseException) -> None:
        """The model raised on ``rnd``: exactly its jobs get the error."""
        with self._cond:
            self._lanes[rnd.kind].running = None
            self._fail_locked(rnd, error)
            self._cond.notify_all()

    def _fail_locked(self, rnd: Round, error: BaseException) -> None:
        log.error("tailrank serve: a batch of %d pairs from %d requests failed: %r", rnd.pairs, len(rnd.jobs), error)
        self.metrics.batch_failures.inc()
        err = error if isinstance(error, BatchFailed) else BatchFailed(f"{type(error).__name__}: {error}")
        for job in rnd.jobs:
            self._finish_locked(job, err)
