"""The score cache: exact hits, partial hits scattered back in order, the byte bound and LRU
eviction (counted), fingerprints that never cross, thread safety, and the server's use of it."""

from __future__ import annotations

import contextlib
import random
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models
from tailrank import CacheStats, CrossEncoder, DocStore, ScoreCache
from tailrank import cross_encoder as ce_module
from tailrank._score_cache import pair_keys

FP = b"fingerprint-a"


def texts(seed: int, n: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [models.sample_text(rng, rng.randint(1, words)) for _ in range(n)]


def ids(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.exported(tmp_path_factory, "bert", 1)[1]


@pytest.fixture(scope="module")
def plain(model_dir: Path) -> CrossEncoder:
    return CrossEncoder(model_dir, threads=1)


class RowCounter:
    """Counts the rows the model really scores (every batch goes through run_batch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        self.batches = 0
        real = ce_module._Worker.run_batch

        def counted(worker: Any, o: Any, batch: Any, out_shape: Any) -> Any:
            self.rows += batch.input_ids.shape[0]
            self.batches += 1
            return real(worker, o, batch, out_shape)

        monkeypatch.setattr(ce_module._Worker, "run_batch", counted)


# --- keys ---------------------------------------------------------------------------------------


def test_keys_are_length_framed_and_hold_the_fingerprint() -> None:
    (a,) = pair_keys(FP, [ids(1, 2)], None, [ids(3)])
    (b,) = pair_keys(FP, [ids(1)], None, [ids(2, 3)])  # same concatenation, other split
    (c,) = pair_keys(b"fingerprint-b", [ids(1, 2)], None, [ids(3)])
    (d,) = pair_keys(FP, [np.asarray([1, 2], dtype=np.int64)], None, [np.asarray([3], dtype=np.int64)])
    assert len({a, b, c}) == 3
    assert a == d and len(a) == 16  # ids hashed as int32 whatever the array's dtype
    # query_index pairs each document with its own query
    keys = pair_keys(FP, [ids(1, 2), ids(1)], np.array([1, 0]), [ids(2, 3), ids(3)])
    assert keys == [b, a]


# --- the cache alone ----------------------------------------------------------------------------


def test_byte_bound_lru_order_and_counted_evictions() -> None:
    cache = ScoreCache(0, 1)
    cache = ScoreCache(10 * cache.entry_bytes, 1)
    keys = pair_keys(FP, [ids(7)], None, [ids(i) for i in range(25)])
    values = np.arange(25, dtype=np.float32).reshape(25, 1)
    cache.store(keys[:10], values[:10])
    cache.lookup([keys[0]])  # now the most recently used: survives the next store
    cache.store(keys[10:15], values[10:15])
    s = cache.stats()
    assert (s.entries, s.evictions, s.hits, s.misses) == (10, 5, 1, 0)
    assert s.bytes == 10 * cache.entry_bytes <= s.capacity_bytes
    found = cache.lookup(keys[:15])
    assert found.miss.tolist() == [1, 2, 3, 4, 5]  # the five least recently used went
    hit = np.setdiff1d(np.arange(15), found.miss)
    assert np.array_equal(found.logits[hit], values[hit])
    cache.store(keys[15:25], values[15:25])  # a whole new set: everything older goes
    s = cache.stats()
    assert (s.entries, s.evictions) == (10, 15) and s.bytes <= s.capacity_bytes
    assert cache.lookup(keys[15:25]).all_hit


def test_holds_is_a_hint_that_counts_and_touches_nothing() -> None:
    cache = ScoreCache(3 * ScoreCache(1).entry_bytes)
    keys = pair_keys(FP, [ids(1)], None, [ids(2), ids(3), ids(4)])
    cache.store(keys[:2], [[1.0], [2.0]])
    assert cache.holds(keys).tolist() == [True, True, False]
    assert (cache.stats().hits, cache.stats().misses) == (0, 0)
    cache.store(keys[2:], [[3.0]])
    cache.store(pair_keys(FP, [ids(9)], None, [ids(9)]), [[9.0]])  # evicts the oldest: holds() did not touch it
    assert cache.holds(keys).tolist() == [False, True, True]


def test_left_cut_pairs_are_keyed_apart_from_the_same_ids_cut_keeping_starts() -> None:
    q, d = ids(1, 2), ids(3, 4, 5)
    right = pair_keys(FP, [q], None, [d, d])
    left = pair_keys(FP, [q], None, [d, d], keep_ends=[True, False])
    assert left[1] == right[1] and left[0] != right[0]
    assert pair_keys(FP + b"|truncation_side=left", [q], None, [d])[0] == left[0]


def test_request_memory_is_bounded_and_reports_what_is_uncached() -> None:
    from tailrank.serve.score_cache import RequestCache
    from tailrank.serve.validate import RerankSpec

    rc = RequestCache(ScoreCache(8 * 4096), FP)  # remembers 4 KiB of requests
    spec = RerankSpec("q", ["a", "b"], True, False, None)
    digest = RequestCache.request_digest(spec)
    assert digest != RequestCache.request_digest(RerankSpec("q", ["a", "b"], True, True, None))  # the side
    assert digest != RequestCache.request_digest(RerankSpec("q", ["ab"], True, False, None))  # the framing
    assert rc.uncached(digest) is None  # never seen
    keys = pair_keys(FP, [ids(1)], None, [ids(2), ids(3)])
    found = rc.cache.lookup(keys)
    rc.remember(digest, found)
    assert rc.uncached(digest).tolist() == [0, 1]
    rc.cache.store_misses(found, [[1.0], [2.0]])
    assert rc.uncached(digest).tolist() == []
    for i in range(40):  # 40 more requests of 2 pairs: the first is forgotten, the bound holds
        rc.remember(bytes([i]) * 16, found)
    assert rc.uncached(digest) is None and rc._requests_bytes <= rc.requests_capacity_bytes


def test_zero_capacity_keeps_nothing() -> None:
    cache = ScoreCache(0, 2)
    keys = pair_keys(FP, [ids(1)], None, [ids(2), ids(3)])
    cache.store(keys, np.ones((2, 2), np.float32))
    found = cache.lookup(keys)
    assert found.miss.tolist() == [0, 1]
    assert cache.stats() == CacheStats(hits=0, misses=2, evictions=0, entries=0, bytes=0, capacity_bytes=0)


def test_store_misses_keeps_only_scored_rows() -> None:
    cache = ScoreCache(1 << 20, 1)
    keys = pair_keys(FP, [ids(1)], None, [ids(i) for i in range(4)])
    cache.store([keys[1]], [[5.0]])
    found = cache.lookup(keys)
    assert found.miss.tolist() == [0, 2, 3]
    cache.store_misses(found, [[1.0], [np.nan], [3.0]], scored=[True, False, True])
    again = cache.lookup(keys)
    assert again.miss.tolist() == [2]  # the unscored row was not stored
    assert again.logits[[0, 1, 3], 0].tolist() == [1.0, 5.0, 3.0]


def test_charged_bytes_track_the_real_memory() -> None:
    n = 20_000
    docs = [ids(i, i + 1) for i in range(n)]
    values = np.random.default_rng(0).standard_normal((n, 1)).astype(np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = ScoreCache(1 << 30, 1)
        keys = pair_keys(FP, [ids(1)], None, docs)  # the cache ends up holding these objects
        cache.store(keys, values)
        del keys
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    charged = cache.stats().bytes
    assert 0.6 * used <= charged <= 1.5 * used, (charged, used)


def test_concurrent_threads_keep_the_stats_consistent() -> None:
    keys = pair_keys(FP, [ids(3)], None, [ids(i) for i in range(400)])
    big = ScoreCache(1 << 24, 1)
    small = ScoreCache(50 * big.entry_bytes, 1)
    n_threads, rounds, per = 8, 200, 20
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(rounds):
                picked = [keys[rng.randrange(len(keys))] for _ in range(per)]
                for cache in (big, small):
                    found = cache.lookup(picked)
                    # the value of a key is a function of the key: a hit must return it
                    for i in np.setdiff1d(np.arange(per), found.miss).tolist():
                        assert found.logits[i, 0] == float(keys.index(picked[i]))
                    missed = [picked[i] for i in found.miss.tolist()]
                    cache.store(missed, np.array([[keys.index(k)] for k in missed], np.float32).reshape(-1, 1))
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    total = n_threads * rounds * per
    for cache in (big, small):
        s = cache.stats()
        assert s.hits + s.misses == total
        assert s.bytes == s.entries * cache.entry_bytes <= s.capacity_bytes
    assert big.stats().entries == len(set(keys)) and big.stats().evictions == 0
    assert small.stats().entries == 50 and small.stats().evictions > 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("64", TypeError)])
def test_cache_bytes_validation(model_dir: Path, bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="cache_bytes"):
        ScoreCache(bad)
    with pytest.raises(error, match="cache_bytes"):
        CrossEncoder(model_dir, threads=1, cache_bytes=bad)


def test_score_cache_argument_validation(model_dir: Path) -> None:
    with pytest.raises(TypeError, match="ScoreCache"):
        CrossEncoder(model_dir, threads=1, score_cache={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        CrossEncoder(model_dir, threads=1, cache_bytes=1024, score_cache=ScoreCache(1024))
    with pytest.raises(ValueError, match="logits per pair"):
        CrossEncoder(model_dir, threads=1, score_cache=ScoreCache(1024, n_labels=2))


# --- the library ----------------------------------------------------------------------------------


def test_library_cache_is_off_by_default(plain: CrossEncoder) -> None:
    assert plain.score_cache is None and plain.cache_stats() is None


def test_hits_are_exact_and_skip_compute(model_dir: Path, plain: CrossEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    ce = CrossEncoder(model_dir, threads=1, cache_bytes=1 << 20)
    docs = texts(1, 60, words=30)
    pairs = [("a cached query", d) for d in docs]
    counter = RowCounter(monkeypatch)
    miss = ce.predict(pairs)
    assert counter.rows == 60
    assert np.array_equal(miss, plain.predict(pairs))  # a miss is scored as without the cache
    hit = ce.predict(pairs)
    assert counter.rows == 120  # plain.predict scored 60; the repeat scored none
    assert np.array_equal(hit, miss)
    s = ce.cache_stats()
    assert s is not None and (s.hits, s.misses, s.entries) == (60, 60, 60)
    # rank reads the same logits: same scores and truncation flags as the uncached model
    assert ce.rank("a cached query", docs) == plain.rank("a cached query", docs)
    assert counter.rows == 180  # only plain.rank scored


def test_partial_hits_scatter_in_request_order(model_dir: Path, plain: CrossEncoder,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ce = CrossEncoder(model_dir, threads=1, cache_bytes=1 << 20)
    docs = texts(2, 40, words=20)
    first = ce.predict([("q partial", d) for d in docs[:25]])
    mixed = docs[10:40]
    random.Random(3).shuffle(mixed)
    counter = RowCounter(monkeypatch)
    got = ce.predict([("q partial", d) for d in mixed])
    assert counter.rows == 15  # docs[25:40] only
    want = plain.predict([("q partial", d) for d in mixed])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # batch shapes differ: float rounding only
    for i, d in enumerate(mixed):
        j = docs.index(d)
        if j < 25:
            assert got[i] == first[j]  # a hit is the stored miss, bit for bit


def test_truncation_flags_and_long_queries(model_dir: Path, plain: CrossEncoder) -> None:
    ce = CrossEncoder(model_dir, threads=1, cache_bytes=1 << 20)
    rng = random.Random(4)
    docs = [models.sample_text(rng, n) for n in (2, 40, 400, 900, 5)]
    for query in ("short query", models.sample_text(rng, 600)):  # the second alone exceeds max_length
        want = plain.rank(query, docs)
        assert any(r["truncated"] for r in want)
        assert ce.rank(query, docs) == want  # misses
        assert ce.rank(query, docs) == want  # hits: flags from the lengths, not an assembly


def test_two_logit_raw_and_normalized_hits_are_exact(tmp_path_factory: pytest.TempPathFactory) -> None:
    md = models.exported(tmp_path_factory, "bert", 2)[1]
    docs = texts(5, 30)
    pairs = [("two logits", d) for d in docs]
    for activation in ("default", "none"):
        ce = CrossEncoder(md, threads=1, activation=activation, cache_bytes=1 << 20)
        miss = ce.predict(pairs)
        hit = ce.predict(pairs)
        assert np.array_equal(hit, miss) and (hit.shape == (30, 2)) == (activation == "none")
        assert ce.rank("two logits", docs) == CrossEncoder(md, threads=1, activation=activation).rank("two logits", docs)


def test_rank_ids_through_the_cache(model_dir: Path, plain: CrossEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    ce = CrossEncoder(model_dir, threads=1, cache_bytes=1 << 20)
    docs = texts(6, 30, words=200)
    store = DocStore(ce.vocab_size)
    store.add(np.arange(30) * 3, ce.tokenize_documents(docs))
    want = plain.rank_ids("stored docs", store, np.arange(30) * 3)
    counter = RowCounter(monkeypatch)
    assert ce.rank_ids("stored docs", store, np.arange(30) * 3) == want
    assert ce.rank_ids("stored docs", store, np.arange(30) * 3) == want
    assert counter.rows == 30
    with pytest.raises(KeyError):
        ce.rank_ids("stored docs", store, [1])  # an unknown id is still an UnknownIdError


def test_other_fingerprints_never_hit(model_dir: Path, tmp_path: Path) -> None:
    from tailrank.export import export

    shared = ScoreCache(1 << 22, 1)
    a = CrossEncoder(model_dir, threads=1, score_cache=shared)
    short = CrossEncoder(model_dir, threads=1, max_length=32, score_cache=shared)
    other_dir = export(models.build_checkpoint("bert", tmp_path / "hf", seed=1), tmp_path / "onnx")
    other = CrossEncoder(other_dir, threads=1, score_cache=shared)
    assert len({a.score_fingerprint, short.score_fingerprint, other.score_fingerprint}) == 3
    pairs = [("same query", d) for d in texts(7, 20)]
    a.predict(pairs)
    for m in (short, other):
        m.predict(pairs)
        assert shared.stats().hits == 0
    assert np.array_equal(CrossEncoder(model_dir, threads=1, score_cache=shared).predict(pairs), a.predict(pairs))
    assert shared.stats().hits == 40  # a reloaded identical model shares the entries
    assert shared.stats().misses == 60


# --- the Collection (reaches the cache through its CrossEncoder) -----------------------------------

from collection_fixtures import emb, emb_dir  # noqa: E402,F401  (pytest fixtures)

from tailrank.collection import Collection  # noqa: E402


@pytest.mark.parametrize("deadline_ms", [None, 60_000.0])
def test_collection_search_reuses_scores(tmp_path: Path, emb: Any, model_dir: Path, plain: CrossEncoder,
                                         monkeypatch: pytest.MonkeyPatch, deadline_ms: float | None) -> None:
    cached = CrossEncoder(model_dir, threads=1, cache_bytes=1 << 20)
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=plain)
    col.add(texts(12, 60, words=25))
    col.close()
    reference = Collection.open(tmp_path / "col", embedder=emb, reranker=plain)
    col = Collection.open(tmp_path / "col", embedder=emb, reranker=cached)
    for query in ("first search", "second search"):
        want = reference.search(query, k=10, candidates=30, deadline_ms=deadline_ms)
        counter = RowCounter(monkeypatch)
        miss = col.search(query, k=10, candidates=30, deadline_ms=deadline_ms)
        assert counter.rows == 30
        hit = col.search(query, k=10, candidates=30, deadline_ms=deadline_ms)
        assert counter.rows == 30  # the repeat scored nothing
        assert [(h.id, h.score, h.truncated) for h in hit.hits] == [(h.id, h.score, h.truncated) for h in miss.hits]
        assert hit.ids() == want.ids() and not hit.degraded
        np.testing.assert_allclose([h.score for h in hit.hits], [h.score for h in want.hits], rtol=1e-6, atol=1e-6)
        monkeypatch.undo()
    s = cached.cache_stats()
    assert s is not None and (s.hits, s.misses) == (60, 60)
    col.close()
    reference.close()


# --- the server -----------------------------------------------------------------------------------

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tailrank.serve import create_app  # noqa: E402


@contextlib.contextmanager
def serving(model: Any, **kw: Any) -> Iterator[tuple[TestClient, list[int]]]:
    """A client and the pairs of each job that reached a scheduling round, in order (recorded by
    the round hook; a job spread over several rounds counts once)."""
    jobs: list[int] = []
    held: list[Any] = []  # keeps the jobs alive, so that no id is reused

    def hook(round_jobs: list[Any]) -> None:
        for j in round_jobs:
            if not any(j is h for h in held):
                held.append(j)
                jobs.append(j.n)

    # Normal priority and no reachable deadline: exact scores whatever else keeps the CPUs busy.
    app = create_app(model, round_hook=hook, scoring_nice=0, default_deadline_ms=600_000, **kw)
    with TestClient(app) as c:
        assert app.state.tailrank.wait_ready(60)
        yield c, jobs


def metric_values(c: TestClient) -> dict[str, float]:
    families = text_string_to_metric_families(c.get("/metrics").text)
    return {s.name: s.value for f in families if f.name.startswith("tailrank_score_cache") for s in f.samples}


def test_server_repeats_are_exact_and_never_queue(plain: CrossEncoder) -> None:
    docs = texts(8, 100, words=20)
    body = {"query": "server query", "documents": docs, "return_documents": False}
    with serving(plain) as (c, rounds):
        first = c.post("/rerank", json=body).json()
        n_rounds = len(rounds)
        second = c.post("/rerank", json=body).json()
        assert len(rounds) == n_rounds  # every pair hit: no scheduling round
        m = metric_values(c)
    assert sum(rounds) == 100
    assert second["results"] == first["results"]  # same order, same floats
    assert m["tailrank_score_cache_hits_total"] == 100 and m["tailrank_score_cache_misses_total"] == 100
    assert m["tailrank_score_cache_entries"] == 100
    assert m["tailrank_score_cache_bytes"] <= m["tailrank_score_cache_capacity_bytes"] == 64 << 20
    assert m["tailrank_score_cache_evictions_total"] == 0
    assert plain.score_cache is None  # the server's cache is its own: the caller's model is unchanged


def test_server_partial_hits_queue_only_the_misses(plain: CrossEncoder) -> None:
    docs = texts(9, 30, words=20)
    mixed = docs[5:25]
    random.Random(1).shuffle(mixed)
    with serving(plain) as (c, rounds):
        c.post("/rerank", json={"query": "partial", "texts": docs[:15]})
        before = len(rounds)
        got = c.post("/rerank", json={"query": "partial", "texts": mixed, "raw_scores": True}).json()
        assert sum(rounds[before:]) == 10  # docs[15:25]
    scores = {r["index"]: r["score"] for r in got}
    want = plain.scores_from_logits(_logits(plain, "partial", mixed), raw=True)
    np.testing.assert_allclose([scores[i] for i in range(20)], want, rtol=1e-6, atol=1e-6)
    assert [r["index"] for r in got] == np.argsort(-want.astype(np.float64), kind="stable").tolist()


def _logits(ce: CrossEncoder, query: str, docs: list[str]) -> np.ndarray:
    (q,) = ce.tokenize([query])
    logits, _ = ce.score_assembly(ce.batcher().assemble(q, ce.document_tokens(docs, q.size)))
    return logits


def test_server_shares_the_models_cache_with_the_library(model_dir: Path) -> None:
    ce = CrossEncoder(model_dir, threads=1, cache_bytes=1 << 20)
    docs = texts(10, 12)
    want = ce.rank("shared", docs)
    with serving(ce, score_cache_bytes=0) as (c, rounds):  # the model's own cache wins over the size
        got = c.post("/rerank", json={"query": "shared", "documents": docs}).json()["results"]
        assert rounds == []
        assert metric_values(c)["tailrank_score_cache_hits_total"] == 12
    assert [(r["index"], r["relevance_score"]) for r in got] == [(h["corpus_id"], h["score"]) for h in want]
    s = ce.cache_stats()
    assert s is not None and s.hits == 12


def test_server_cache_off(plain: CrossEncoder) -> None:
    body = {"query": "off", "texts": texts(11, 5)}
    with serving(plain, score_cache_bytes=0) as (c, rounds):
        assert c.post("/rerank", json=body).json() == c.post("/rerank", json=body).json()
        assert sum(rounds) == 10
        assert metric_values(c) == {}


@pytest.mark.parametrize("bad, error", [(-1, ValueError), ("1", TypeError), (2.0, TypeError)])
def test_server_cache_size_validation(plain: CrossEncoder, bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="score_cache_bytes"):
        create_app(plain, score_cache_bytes=bad)


def test_cli_refuses_a_negative_cache_size(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tailrank.cli import main

    assert main(["serve", "--reranker", str(model_dir), "--score-cache-bytes", "-5"]) == 2
    assert "--score-cache-bytes must be >= 0" in capsys.readouterr().err


class CutScoring:
    """The real model, whose scoring can leave every other pair of a round unscored (NaN), as a
    deadline would, but decided by a flag instead of a clock."""

    def __init__(self, ce: CrossEncoder) -> None:
        self.ce = ce
        self.cut = False
        self.max_length, self.n_labels, self.batch_tokens = ce.max_length, ce.n_labels, ce.batch_tokens
        self.score_fingerprint = ce.score_fingerprint

    def __getattr__(self, name: str) -> Any:  # batcher, tokenize, document_tokens, scores_from_logits
        return getattr(self.ce, name)

    def score_assembly(self, assembly: Any, *, deadline: float | None = None) -> Any:
        logits, scored = self.ce.score_assembly(assembly, deadline=deadline)
        if self.cut:
            logits[::2] = np.nan
            scored[::2] = False
        return logits, scored


def test_server_stores_only_scored_pairs_of_a_degraded_answer(plain: CrossEncoder) -> None:
    model = CutScoring(plain)
    docs = texts(13, 20, words=20)
    body = {"query": "cut short", "texts": docs}
    with serving(model) as (c, jobs):
        model.cut = True
        r = c.post("/rerank", json=body)
        assert r.headers["X-Tailrank-Degraded"] == "true"
        stats = c.app.state.tailrank.score_cache.cache.stats()  # type: ignore[attr-defined]
        assert (stats.entries, stats.misses, stats.hits) == (10, 20, 0)  # the NaN rows were not kept
        model.cut = False
        r2 = c.post("/rerank", json=body)
        assert r2.headers["X-Tailrank-Degraded"] == "false"
        assert jobs == [20, 10]  # the repeat queued only the pairs left unscored
    first = {x["index"]: x["score"] for x in r.json() if x["score"] is not None}
    second = {x["index"]: x["score"] for x in r2.json()}
    assert len(first) == 10 and all(second[i] == s for i, s in first.items())  # hits: the same floats
