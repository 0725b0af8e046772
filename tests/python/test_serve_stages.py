"""The serving stages on their own: admission (running totals, an injected clock), the queue
(EDF rounds, a round formed while the executor is blocked, drops, failures) and validation
(dialects -> one canonical job, limits, truncation from the core's rule)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import models

pytest.importorskip("fastapi")

from tailrank import CrossEncoder  # noqa: E402
from tailrank.errors import LimitError  # noqa: E402
from tailrank.serve.admission import ROUND_OVERHEAD_S, Admission  # noqa: E402
from tailrank.serve.errors import BatchFailed, Rejected, error_of  # noqa: E402
from tailrank.serve.executor import Executor  # noqa: E402
from tailrank.serve.metrics import ServeMetrics  # noqa: E402
from tailrank.serve.queue import Queue, make_job  # noqa: E402
from tailrank.serve.schemas import CohereRerankRequest, SearchRequest, TeiRerankRequest  # noqa: E402
from tailrank.serve.validate import Limits, Pairs, rerank_spec, search_spec, tokenize_pairs  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --- admission --------------------------------------------------------------------------------


def test_admission_refuses_what_cannot_end_by_its_deadline_from_totals() -> None:
    clock = Clock()
    adm = Admission(max_queue_pairs=1000, clock=clock)
    with pytest.raises(Rejected) as e:
        adm.enqueue(10, 1, clock.t + 1)
    assert e.value.status == 503 and e.value.reason == "not_ready"
    adm.open(100.0)  # 100 tokens/s
    adm.enqueue(500, 5, clock.t + 60)  # an idle server admits anything
    assert (adm.queued_tokens, adm.queued_pairs, adm.queued_jobs) == (500, 5, 1)
    adm.enqueue(50, 1, clock.t + 5.5 + ROUND_OVERHEAD_S + 1e-6)  # 5 s ahead + 0.5 s: fits
    with pytest.raises(Rejected) as e:
        adm.enqueue(60, 1, clock.t + 6.0)  # 5.5 s ahead + 0.6 s > 6 s
    assert e.value.status == 429 and e.value.reason == "deadline"
    assert e.value.retry_after_s == pytest.approx(0.1 + ROUND_OVERHEAD_S)
    assert error_of(e.value).headers["Retry-After"] == "1"
    # The round running now counts down with the clock: 2 s into a 200-token round, 200 tokens less ahead.
    adm.round_started(200)
    clock.t += 2.0
    adm.enqueue(60, 1, clock.t + 4.2)  # (550 - 200) / 100 + 0.6 = 4.1 s: fits (6.1 s without the progress)
    assert adm.queued_tokens == 610
    adm.round_ended(tokens=200, pairs=2, seconds=1.0)  # measured 200 tokens/s: the EWMA moves
    assert adm.tokens_per_s == pytest.approx(100 + 0.2 * 100)
    adm.settled(tokens=610, pairs=7, job_done=True)
    assert adm.queued_tokens == 0 and adm.queued_pairs == 0


def test_admission_reads_totals_only_not_the_queue() -> None:
    """The same admitted work as one job or as 10,000 jobs gives the same decision: nothing is
    walked (the estimator holds no job at all)."""
    decisions = []
    for jobs in (1, 10_000):
        clock = Clock()
        adm = Admission(max_queue_pairs=10**9, clock=clock)
        adm.open(1000.0)
        adm.enqueue(1, 1, clock.t + 60)
        for _ in range(jobs):
            adm.enqueue(10_000 // jobs, 1, clock.t + 60)
        out = []
        for tokens in (40_000, 60_000):
            try:
                adm.enqueue(tokens, 1, clock.t + 60)
                out.append("admitted")
            except Rejected as e:
                out.append(e.reason)
        decisions.append(out)
        assert not any(isinstance(v, (list, dict)) for v in vars(adm).values())
    assert decisions[0] == decisions[1] == ["admitted", "deadline"]


def test_admission_queue_cap_and_tokenizing_backlog() -> None:
    clock = Clock()
    adm = Admission(max_queue_pairs=10, clock=clock)
    adm.open(1000.0)
    adm.enqueue(80, 8, clock.t + 60)
    with pytest.raises(Rejected) as e:
        adm.enqueue(30, 3, clock.t + 60)
    assert e.value.reason == "queue_full" and e.value.retry_after_s == pytest.approx(1 * 10 / 1000)
    # Characters waiting to be tokenized delay a request before its pairs can queue.
    adm.settled(tokens=80, pairs=8, job_done=True)
    adm.chars_per_s = 1000.0
    first = adm.before_tokenizing(10, 1, 3000, clock.t + 60)  # idle: admitted
    with pytest.raises(Rejected):
        adm.before_tokenizing(10, 1, 1000, clock.t + 3.5)  # 4 s of characters ahead of it
    assert adm.tokenizing_chars == 3000
    adm.tokenized(first, tokens=1000, seconds=1.0)
    adm.tokenized(first, tokens=1000, seconds=1.0)  # a ticket is closed once
    assert adm.tokenizing_chars == 0
    assert adm.chars_per_token == pytest.approx(4.0 + 0.2 * (3.0 - 4.0))
    assert adm.estimate_tokens(4, [36, 3996], max_length=64, n_special=3) == int(
        min(40 / adm.chars_per_token, 61) + 3 + 61 + 3)


# --- the queue --------------------------------------------------------------------------------


@dataclass
class FakeAssembly:
    docs: list[Any]
    real_tokens: int
    batches: tuple[Any, ...] = ()


@dataclass
class Model:
    """An executor's model that records each round and can block in one of them."""

    block_round: int | None = None
    fail_token: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    blocked: threading.Event = field(default_factory=threading.Event)
    rounds: list[list[int]] = field(default_factory=list)
    assembled: list[list[int]] = field(default_factory=list)

    def assemble(self, queries: list[Any], index: Any, docs: list[Any], *, keep_ends: Any = None) -> FakeAssembly:
        self.assembled.append([int(d[0]) for d in docs])
        return FakeAssembly(docs, sum(d.size for d in docs))

    def run(self, assembly: FakeAssembly, deadline: float) -> tuple[Any, Any]:
        self.rounds.append([int(d[0]) for d in assembly.docs])
        if len(self.rounds) == self.block_round:
            self.blocked.set()
            assert self.release.wait(30)
        if self.fail_token is not None and any(int(d[0]) == self.fail_token for d in assembly.docs):
            raise RuntimeError("injected")
        values = np.array([[float(d[0])] for d in assembly.docs], dtype=np.float32)
        return values, np.ones(len(assembly.docs), dtype=bool)


def pairs(tag: int, n: int, tokens: int = 10) -> Pairs:
    """n pairs of ``tokens`` tokens whose documents start with ``tag`` (to follow them)."""
    doc = np.full(tokens, tag, dtype=np.int32)
    return Pairs([np.array([1], np.int32)], np.zeros(n, np.int64), [doc] * n, np.full(n, tokens, np.int64))


@dataclass
class Served:
    queue: Queue
    model: Model
    executor: Executor
    clock: Clock


def served(model: Model, *, budget: int = 20, rate: float = 1e6) -> Served:
    clock = Clock()
    adm = Admission(max_queue_pairs=10_000, clock=clock)
    queue = Queue(adm, ServeMetrics(), clock=clock)
    queue.add_kind("rerank", max_batch_tokens=budget, make_assembler=lambda: model.assemble)
    ex = Executor(queue, "rerank", lambda: model.run, calibrate=lambda: rate, measure=False)
    queue.start()
    ex.start()
    assert ex.ready.wait(30)
    return Served(queue, model, ex, clock)


def stop(s: Served) -> None:
    s.model.release.set()
    s.queue.close()
    s.executor.join()


async def until(predicate: Any) -> None:
    for _ in range(6000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never reached")


def test_queue_forms_the_next_round_while_the_executor_is_blocked_and_serves_edf() -> None:
    model = Model(block_round=1)
    s = served(model, budget=20)

    async def go() -> list[Any]:
        loop = asyncio.get_running_loop()
        t = s.clock.t
        first = s.queue.submit(make_job("rerank", pairs(1, 2), t + 50, 1), loop)
        await asyncio.to_thread(model.blocked.wait, 30)  # round 1 runs (and blocks)
        late = s.queue.submit(make_job("rerank", pairs(2, 2), t + 40, 1), loop)
        await until(lambda: len(model.assembled) == 2)
        # Round 2 was formed and assembled while the executor is still inside round 1.
        assert model.blocked.is_set() and not model.release.is_set() and len(model.rounds) == 1
        assert s.queue._lanes["rerank"].slot is not None
        # Queued behind the formed round, in deadline order whatever the arrival order.
        later = s.queue.submit(make_job("rerank", pairs(3, 2), t + 30, 1), loop)
        earliest = s.queue.submit(make_job("rerank", pairs(4, 2), t + 10, 1), loop)
        model.release.set()
        return await asyncio.gather(first, late, later, earliest)

    try:
        results = asyncio.run(go())
    finally:
        stop(s)
    assert model.rounds == [[1, 1], [2, 2], [4, 4], [3, 3]]
    for tag, r in zip((1, 2, 3, 4), results):
        assert r.scored.all() and r.values[:, 0].tolist() == [tag, tag]


def test_queue_splits_by_budget_and_drops_cancelled_jobs_before_compute() -> None:
    model = Model(block_round=1)
    s = served(model, budget=30)

    async def go() -> tuple[Any, Any, Any]:
        loop = asyncio.get_running_loop()
        t = s.clock.t
        hold = s.queue.submit(make_job("rerank", pairs(1, 1), t + 50, 1), loop)
        await asyncio.to_thread(model.blocked.wait, 30)
        gone_job = make_job("rerank", pairs(2, 2), t + 50, 1)
        s.queue.submit(gone_job, loop)
        await until(lambda: s.queue._lanes["rerank"].slot is not None)  # formed and waiting
        partial = s.queue.cancel(gone_job)
        big = s.queue.submit(make_job("rerank", pairs(3, 7), t + 60, 1), loop)  # 70 tokens: 3 rounds
        model.release.set()
        return await hold, partial, await big

    try:
        _, partial, big = asyncio.run(go())
    finally:
        stop(s)
    assert partial is not None and not partial.scored.any()
    assert [2, 2] in model.assembled and [2, 2] not in model.rounds  # assembled, never computed
    assert model.rounds[1:] == [[3, 3, 3], [3, 3, 3], [3]] and big.scored.all()
    assert s.queue.admission.queued_tokens == 0 and s.queue.admission.queued_jobs == 0


def test_queue_failure_fails_exactly_its_round_and_expired_jobs_get_what_they_have() -> None:
    model = Model(fail_token=2)
    s = served(model, budget=10, rate=10.0)  # one pair per round; 10 tokens/s: a pair takes 1 s

    async def go() -> list[Any]:
        loop = asyncio.get_running_loop()
        t = s.clock.t
        ok = s.queue.submit(make_job("rerank", pairs(1, 1), t + 50, 1), loop)
        bad = s.queue.submit(make_job("rerank", pairs(2, 1), t + 50, 1), loop)
        out: list[Any] = [await ok]
        try:
            await bad
        except BatchFailed as e:
            out.append(e)
        # No pair of it can end before its deadline (0.5 s at 1 s per pair): answered unscored.
        out.append(await s.queue.submit(make_job("rerank", pairs(5, 1), s.clock.t + 0.5, 1), loop))
        return out

    try:
        ok, failed, expired = asyncio.run(go())
    finally:
        stop(s)
    assert ok.scored.all() and isinstance(failed, BatchFailed) and "injected" in str(failed)
    assert expired.degraded and not expired.scored.any() and [5] not in model.assembled


# --- validation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ce(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoder:
    _, model_dir = models.exported(tmp_path_factory, "bert", 1)
    return CrossEncoder(model_dir, threads=1)


def test_both_dialects_become_one_canonical_job() -> None:
    lim = Limits()
    cohere = rerank_spec(CohereRerankRequest(query="q", documents=["a", {"text": "b"}]), lim, auto_truncate=True)
    tei = rerank_spec(TeiRerankRequest(query="q", texts=["a", "b"]), lim, auto_truncate=True)
    assert cohere == tei
    assert rerank_spec(TeiRerankRequest(query="q", texts=["a"], truncate=False), lim, auto_truncate=True).truncate is False
    assert rerank_spec(TeiRerankRequest(query="q", texts=["a"]), lim, auto_truncate=False).truncate is False
    assert rerank_spec(TeiRerankRequest(query="q", texts=["a"], truncation_direction="left"), lim,
                       auto_truncate=True).left is True
    small = Limits(max_documents=2, max_document_chars=5, max_query_chars=3)
    for body, message in [
        (TeiRerankRequest(query="q", texts=["a", "b", "c"]), "3 documents; the limit is 2"),
        (CohereRerankRequest(query="q", documents=["abcdef"]), "documents[0] has 6 characters; the limit is 5"),
        (TeiRerankRequest(query="qqqq", texts=["a"]), "the query has 4 characters; the limit is 3"),
    ]:
        with pytest.raises(LimitError, match=message.replace("[", r"\[").replace("]", r"\]")):
            rerank_spec(body, small, auto_truncate=True)
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        rerank_spec(TeiRerankRequest(query="q", texts=["a", "\ud800"]), lim, auto_truncate=True)


def test_search_spec_limits_and_passes_other_fields_by_keyword() -> None:
    lim = Limits(max_k=10, max_candidates=50, max_filter_nodes=4)
    spec = search_spec(SearchRequest(query="q", k=10, candidates=50, filter={"year": {"$gte": 2000}}), lim)
    assert (spec.k, spec.candidates, spec.filter, spec.options) == (10, 50, {"year": {"$gte": 2000}}, {})
    for body, message in [
        (SearchRequest(query="q", k=11), "k is 11; the limit is 10"),
        (SearchRequest(query="q", candidates=51), "candidates is 51; the limit is 50"),
        (SearchRequest(query="q", candidates=50, filter={"$or": [{"a": 1}, {"b": 2}]}), "the filter has 6 keys and"),
    ]:
        with pytest.raises(LimitError, match=message):
            search_spec(body, lim)
    with pytest.raises(ValueError, match="filter key is not valid Unicode"):
        search_spec(SearchRequest(query="q", candidates=50, filter={"a\udcff": 1}), lim)


def test_tokenized_pairs_follow_the_cores_truncation_rule(ce: CrossEncoder) -> None:
    rules = ce.batcher()
    n_special = int(rules.template.n_special)
    long_doc = " ".join(["cells"] * 100) + " cancer tumor"
    spec = rerank_spec(TeiRerankRequest(query="q", texts=["a b", long_doc]), Limits(), auto_truncate=True)
    right = tokenize_pairs(ce, rules, spec, Limits())
    q = ce.tokenize(["q"])[0]
    d = ce.tokenize([long_doc])[0]
    kq, kd = rules.truncate_lengths(q.size, d.size)
    assert right.lengths.tolist() == [q.size + 2 + n_special, kq + kd + n_special] and right.lengths[1] == ce.max_length
    left_spec = rerank_spec(TeiRerankRequest(query="q", texts=["a b", long_doc], truncation_direction="left"),
                            Limits(), auto_truncate=True)
    left = tokenize_pairs(ce, rules, left_spec, Limits())
    assert left.lengths.tolist() == right.lengths.tolist()
    # Whole documents travel; only the cut pair is marked, and the core's assembly keeps its ends:
    # the same row as the pre-cut pair (the ends, as many as the core keeps) assembled as it is.
    np.testing.assert_array_equal(left.docs[1], d)
    assert right.keep_ends is None and left.keep_ends is not None and left.keep_ends.tolist() == [False, True]
    got = rules.assemble_multi(left.queries, left.query_index[1:], left.docs[1:], keep_ends=left.keep_ends[1:])
    got_ids = got.batches[0].input_ids.copy()
    pre_cut = rules.assemble(q[q.size - kq :], [d[d.size - kd :]])
    np.testing.assert_array_equal(got_ids, pre_cut.batches[0].input_ids)
    strict = rerank_spec(TeiRerankRequest(query="q", texts=[long_doc], truncate=False), Limits(), auto_truncate=True)
    with pytest.raises(LimitError, match="the model takes at most 64"):
        tokenize_pairs(ce, rules, strict, Limits())
    with pytest.raises(LimitError, match="--max-request-tokens"):
        tokenize_pairs(ce, rules, spec, Limits(max_request_tokens=10))


def test_queue_close_answers_every_waiter() -> None:
    """Shutdown while a round runs, one waits assembled and more are queued: every waiter gets
    a result or BatchFailed, none hangs."""
    model = Model(block_round=1)
    s = served(model, budget=10)

    async def go() -> list[Any]:
        loop = asyncio.get_running_loop()
        t = s.clock.t
        futs = [s.queue.submit(make_job("rerank", pairs(1, 1), t + 50, 1), loop)]
        await asyncio.to_thread(model.blocked.wait, 30)
        futs += [s.queue.submit(make_job("rerank", pairs(i, 1), t + 50, 1), loop) for i in (2, 3, 4)]
        await until(lambda: s.queue._lanes["rerank"].slot is not None)
        closing = asyncio.ensure_future(asyncio.to_thread(s.queue.close))
        await until(lambda: all(f.done() for f in futs[1:]))
        model.release.set()
        await closing
        return await asyncio.gather(*futs, return_exceptions=True)

    try:
        out = asyncio.run(go())
    finally:
        stop(s)
    assert out[0].scored.all()  # the running round still delivers
    assert all(isinstance(x, BatchFailed) and "shutting down" in str(x) for x in out[1:])
