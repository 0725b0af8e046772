"""Executors: one thread per ONNX Runtime session, running the rounds the queue assembled.

The thread lowers its own priority below the event loop (scoring never delays a refusal),
calibrates its model once (rerank: real tokens/s on synthetic pairs, so that admission works
from the first request), then takes rounds from its kind's slot: a round whose jobs are all gone
is skipped, a round the model raises on fails exactly its jobs, and the thread goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .._ort import Priority, lower_thread_priority
from .queue import Job, Kind, Queue, Round

__all__ = ["Executor", "RunRound", "calibrate_reranker"]

log = logging.getLogger("tailrank.serve")

RunRound = Callable[[Any, float], tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]]
"""``(assembly, deadline) -> (values [pairs, width], scored [pairs])`` on the executor's thread."""


class Executor:
    """Runs ``kind``'s rounds on one thread.

    Args:
        queue: Where rounds come from and results go.
        kind: The model it runs.
        make_run: Called on the thread: returns the :data:`RunRound` for this thread's session
            binding.
        calibrate: Called on the thread before the first round: the model's tokens/s, which
            opens admission (None: this executor does not open it).
        measure: Whether its rounds' speed updates admission's estimate.
        round_hook: Called on the thread with each round's live jobs before it runs (tests).
        nice: Priority below the event loop (see ``lower_thread_priority``).
    """

    def __init__(self, queue: Queue, kind: Kind, make_run: Callable[[], RunRound], *,
                 calibrate: Callable[[], float] | None = None, measure: bool = True,
                 round_hook: Callable[[list[Job]], None] | None = None, nice: Priority = 0) -> None:
        self.queue = queue
        self.kind = kind
        self.make_run = make_run
        self.calibrate = calibrate
        self.measure = measure
        self.round_hook = round_hook
        self.nice = nice
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._main, name=f"tailrank-{self.kind}", daemon=True)
            self.thread.start()

    def join(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def _main(self) -> None:
        lower_thread_priority(self.nice)
        admission = self.queue.admission
        try:
            run = self.make_run()
            if self.calibrate is not None:
                rate = self.calibrate()
                self.queue.metrics.throughput.set(rate)
                admission.open(rate)
        except BaseException as e:  # noqa: BLE001 - reported through ready / wait_ready
            log.exception("tailrank serve: the %s model failed to start", self.kind)
            self.failure = e
            admission.fail(f"the {self.kind} model failed to start: {e!r}")
            self.ready.set()
            return
        self.ready.set()
        try:
            while (rnd := self.queue.take(self.kind)) is not None:
                self._run(run, rnd)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave requests hanging
            log.exception("tailrank serve: the %s executor failed", self.kind)
            self.failure = e
            admission.fail(f"the {self.kind} executor failed: {e!r}")
            self.queue.close(f"the {self.kind} executor failed: {e!r}")

    def _run(self, run: RunRound, rnd: Round) -> None:
        admission = self.queue.admission
        live = self.queue.live(rnd)
        if not live:
            self.queue.skip(rnd)
            return
        metrics = self.queue.metrics
        if self.measure:
            admission.round_started(rnd.tokens)
        t0 = time.perf_counter()
        try:
            if self.round_hook is not None:
                self.round_hook(live)
            values, scored = run(rnd.assembly, max(j.deadline for j in live))
        except Exception as e:  # noqa: BLE001 - the model's error fails exactly this round's requests
            if self.measure:
                admission.round_ended(tokens=rnd.tokens, pairs=rnd.pairs, seconds=None)
            self.queue.fail(rnd, e)
            return
        dt = time.perf_counter() - t0
        metrics.round_seconds.observe(dt)
        metrics.batch_requests.observe(len(live))
        for batch in rnd.assembly.batches:
            metrics.batch_rows.observe(batch.input_ids.shape[0])
            metrics.batch_tokens.observe(batch.input_ids.size)
        if self.measure:
            real = int(rnd.assembly.real_tokens)
            admission.round_ended(tokens=real, pairs=rnd.pairs, seconds=dt if scored.all() else None)
            metrics.throughput.set(admission.tokens_per_s)
        self.queue.deliver(rnd, values, scored)


def calibrate_reranker(model: Any, max_batch_tokens: int) -> float:
    """Real tokens/s of ``model`` on one round of synthetic pairs (pad tokens), run twice (the
    second, warm run counts)."""
    if getattr(model, "kind", "encoder") == "llm":
        return _calibrate_llm(model, max_batch_tokens)
    batcher = model.batcher()
    n_special = int(batcher.template.n_special)
    pad = int(batcher.template.pad_id)
    body = int(model.max_length) - n_special
    doc_len = max(1, body - 8)
    rows = max(1, max_batch_tokens // int(model.max_length))
    query = np.full(min(8, body - doc_len) or 1, pad, dtype=np.int32)
    docs = [np.full(doc_len, pad, dtype=np.int32)] * rows
    dt = 1e-6
    for _ in range(2):
        t0 = time.perf_counter()
        assembly = batcher.assemble_multi([query], np.zeros(rows, dtype=np.int64), docs)
        model.score_assembly(assembly)
        dt = time.perf_counter() - t0
    return float(assembly.real_tokens) / max(dt, 1e-6)


def _calibrate_llm(model: Any, max_batch_tokens: int) -> float:
    """The same for an LLM reranker: one default prompt (its prefix once) and documents filling
    the room it leaves, as one round."""
    probe = model.prepare_prompts("", [])
    room = int(model.max_length) - int(probe.key.size) + 1  # the key holds one separator
    pp = model.prepare_prompts("", [np.full(max(1, room - 8), int(probe.key[0]), dtype=np.int32)])
    rows = max(1, max_batch_tokens // int(model.max_length))
    dt = 1e-6
    for _ in range(2):
        t0 = time.perf_counter()
        assembly = model.assemble_prompts([pp.key], np.zeros(rows, dtype=np.int64), pp.docs * rows)
        model.score_assembly(assembly)
        dt = time.perf_counter() - t0
    return float(assembly.real_tokens) / max(dt, 1e-6)
