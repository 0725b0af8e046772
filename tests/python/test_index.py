"""tailrank.VectorIndex: recall against brute force, deletes and replaces, allow-lists, input
checks, persistence and thread safety."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tailrank import DocStore, VectorIndex
from tailrank.errors import CorruptFileError, TailrankError, UnknownIdError

METRICS = ("cosine", "ip", "l2")
EMBED_DIM = 384


def exact_scores(data: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """[n_queries, n_data] scores with the index's conventions, in float64."""
    x = np.asarray(data, np.float64)
    q = np.atleast_2d(np.asarray(queries, np.float64))
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        return (q**2).sum(1)[:, None] - 2.0 * q @ x.T + (x**2).sum(1)[None, :]
    return q @ x.T


def assert_best_first(scores: np.ndarray, metric: str) -> None:
    steps = np.diff(np.atleast_2d(scores), axis=1)
    assert np.all(steps >= 0) if metric == "l2" else np.all(steps <= 0)


def small_index(
    embeddings, metric: str, n: int = 1000, *, seed: int = 3, **kwargs
) -> tuple[VectorIndex, np.ndarray]:
    """n realistic vectors under ids 0..n-1 (a quick build: ef_construction 64)."""
    data = embeddings.sample(n, seed=seed)
    kwargs.setdefault("ef_construction", 64)
    index = VectorIndex(EMBED_DIM, metric, **kwargs)
    index.add(data, np.arange(n))
    return index, data


# --- recall against brute force on 20,000 realistic vectors -------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
    metric: str
    index: VectorIndex
    data: np.ndarray
    ids: np.ndarray
    queries: np.ndarray
    build_s: float


@pytest.fixture(scope="module")
def corpus(embeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = embeddings.sample(20_000, seed=1)
    ids = np.random.default_rng(11).choice(2**40, size=len(data), replace=False).astype(np.int64)
    queries = embeddings.sample(200, seed=2)  # same distribution, not taken from the data
    return data, ids, queries


@pytest.fixture(scope="module", params=METRICS)
def built(request, corpus) -> Built:
    """A default-configured index over the corpus, built once per metric with all cores."""
    data, ids, queries = corpus
    index = VectorIndex(EMBED_DIM, request.param)
    start = time.perf_counter()
    index.add(data, ids)
    return Built(request.param, index, data, ids, queries, time.perf_counter() - start)


@pytest.mark.slow
def test_recall_at_default_ef(built: Built, brute_force, recall, record_property) -> None:
    found, scores = built.index.search(built.queries, 10)
    truth, _ = brute_force(built.data, built.ids, built.queries, 10, built.metric)
    r = recall(found, truth)
    record_property("recall_at_10", r)
    record_property("build_s", built.build_s)
    print(
        f"{built.metric}: recall@10={r:.4f} at default ef={built.index.ef}; build of {len(built.ids)} "
        f"vectors {built.build_s:.1f}s on {os.cpu_count()} cores"
    )
    assert len(built.index) == len(built.ids)
    assert r >= 0.97, f"recall@10 {r:.4f} at the default ef={built.index.ef} ({built.metric})"
    # The scores are the exact scores of the returned ids, best first.
    by_id = np.argsort(built.ids)
    rows = by_id[np.searchsorted(built.ids[by_id], found)]
    expected = [exact_scores(built.data[r], q, built.metric)[0] for r, q in zip(rows, built.queries)]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert_best_first(scores, built.metric)


@pytest.mark.slow
def test_large_allow_list_returns_only_allowed_ids(built: Built, brute_force, recall) -> None:
    # Half the ids: far above the exact-scan cutoff, so the filter runs inside the HNSW walk.
    rng = np.random.default_rng(5)
    allowed = rng.choice(built.ids, size=len(built.ids) // 2, replace=False)
    found, _ = built.index.search(built.queries, 10, allow=set(allowed.tolist()))
    assert np.isin(found, allowed).all()
    keep = np.isin(built.ids, allowed)
    truth, _ = brute_force(built.data[keep], built.ids[keep], built.queries, 10, built.metric)
    assert recall(found, truth) >= 0.95


# --- deletes and replaces -----------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_deleted_ids_are_never_returned(embeddings, metric: str) -> None:
    index, data = small_index(embeddings, metric)
    rng = np.random.default_rng(1)
    deleted = rng.choice(len(data), size=len(data) // 2, replace=False)
    index.delete(deleted[:100])
    index.delete(deleted[100:].tolist())
    live = np.setdiff1d(np.arange(len(data)), deleted)

    assert len(index) == len(live)
    np.testing.assert_array_equal(index.ids(), live)
    assert not any(int(i) in index for i in deleted)
    assert all(int(i) in index for i in live)
    # Querying with the deleted vectors themselves, which would score best.
    found, _ = index.search(data, 20)
    assert not np.isin(found, deleted).any()
    assert (found[np.isin(np.arange(len(data)), live), 0] == live).mean() >= 0.99


def test_delete_unknown_id_raises_and_deletes_nothing(embeddings) -> None:
    index, _ = small_index(embeddings, "cosine", n=50)
    with pytest.raises(UnknownIdError, match="12345"):
        index.delete([1, 2, 12345])
    assert len(index) == 50 and 1 in index and 2 in index

    index.delete([3, 3])  # a repeated id is deleted once
    assert len(index) == 49
    with pytest.raises(KeyError):  # UnknownIdError is a KeyError; deleting twice is unknown
        index.delete(3)
    with pytest.raises(UnknownIdError):
        VectorIndex(4).delete([0])
    assert len(index) == 49


@pytest.mark.parametrize("metric", METRICS)
def test_replaced_vector_is_found_by_its_new_vector_only(embeddings, metric: str) -> None:
    index, data = small_index(embeddings, metric)
    old = data[7]
    candidates = embeddings.sample(200, seed=99)
    new = candidates[np.argmin(candidates @ old)]  # a vector far from the old one
    old_score = exact_scores(old[None], old, metric)[0, 0]
    new_vs_old = exact_scores(new[None], old, metric)[0, 0]

    index.add(new, 7)
    assert len(index) == len(data) and 7 in index
    ids, scores = index.search(old, 10)
    assert 7 not in ids or np.isclose(scores[ids == 7][0], new_vs_old, atol=1e-4)
    assert not np.isclose(new_vs_old, old_score, atol=1e-2)
    ids, scores = index.search(new, 1)
    assert ids[0] == 7
    assert scores[0] == pytest.approx(exact_scores(new[None], new, metric)[0, 0], abs=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_delete_then_re_add(embeddings, threads: int) -> None:
    index, data = small_index(embeddings, "cosine", n=300)
    index.delete(np.arange(100))
    fresh = embeddings.sample(100, seed=42)
    # Revive 50 deleted ids with new vectors and add 50 new ids (they reuse deleted slots).
    index.add(fresh, np.r_[np.arange(50), np.arange(1000, 1050)], threads=threads)
    assert len(index) == 300
    np.testing.assert_array_equal(index.ids(), np.r_[np.arange(50), np.arange(100, 300), np.arange(1000, 1050)])
    found, _ = index.search(fresh, 1)
    np.testing.assert_array_equal(found[:, 0], np.r_[np.arange(50), np.arange(1000, 1050)])
    found, _ = index.search(data[50:100], 10)
    assert not np.isin(found, np.arange(50, 100)).any()


@pytest.mark.parametrize("threads", [1, 2])
def test_revive_and_new_id_in_one_batch_when_full(threads: int) -> None:
    # Regression: a revived id keeps its slot, so it must not count as a vacancy for new ids.
    rng = np.random.default_rng(0)
    index = VectorIndex(8, "l2", capacity=1024)
    index.add(rng.standard_normal((index.capacity, 8)), np.arange(index.capacity))
    index.delete([0, 1])
    index.add(rng.standard_normal((4, 8)), [0, 5000, 1, 5001], threads=threads)
    assert len(index) == 1026 and index.capacity >= 1026
    assert all(i in index for i in (0, 1, 5000, 5001))


def test_repeated_id_in_one_batch_keeps_the_last_vector() -> None:
    index = VectorIndex(3, "l2")
    index.add([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [4, 4, 5])
    assert len(index) == 2
    ids, scores = index.search([0, 1, 0], 1)
    assert ids[0] == 4 and scores[0] == pytest.approx(0.0)


# --- allow-lists --------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_small_allow_list_is_exact(embeddings, metric: str, brute_force) -> None:
    index, data = small_index(embeddings, metric)
    queries = embeddings.sample(20, seed=8)
    allowed = np.random.default_rng(2).choice(len(data), size=40, replace=False)
    found, scores = index.search(queries, 10, allow=allowed)
    truth, truth_scores = brute_force(data[allowed], allowed, queries, 10, metric)
    np.testing.assert_array_equal(found, truth)
    np.testing.assert_allclose(scores, truth_scores, rtol=1e-4, atol=1e-4)
    for other in (set(allowed.tolist()), allowed.tolist(), frozenset(allowed.tolist())):
        np.testing.assert_array_equal(index.search(queries, 10, allow=other)[0], found)


def test_allow_list_skips_deleted_and_unknown_ids(embeddings) -> None:
    index, data = small_index(embeddings, "cosine", n=200)
    index.delete([3, 4])
    ids, _ = index.search(data[3], 6, allow=[3, 4, 5, 6, 999_999])
    assert set(ids[:2].tolist()) == {5, 6}
    np.testing.assert_array_equal(ids[2:], -1)
    ids, _ = index.search(data[:2], 3, allow=[])
    np.testing.assert_array_equal(ids, -1)


def test_allow_list_validation(embeddings) -> None:
    index, data = small_index(embeddings, "cosine", n=20)
    with pytest.raises(ValueError):
        index.search(data[0], 3, allow=[-1])
    with pytest.raises(ValueError):
        index.search(data[0], 3, allow=[1.5])


# --- inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_other_dtypes_are_converted(dtype) -> None:
    rng = np.random.default_rng(3)
    vectors = (rng.standard_normal((300, 16)) * 4).astype(dtype)
    queries = (rng.standard_normal((10, 16)) * 4).astype(dtype)
    a, b = VectorIndex(16, "l2"), VectorIndex(16, "l2")
    a.add(vectors, np.arange(300), threads=1)
    b.add(vectors.astype(np.float32), np.arange(300), threads=1)
    for got, want in zip(a.search(queries, 5), b.search(queries.astype(np.float32), 5)):
        np.testing.assert_array_equal(got, want)
    assert a.search(queries, 5)[1].dtype == np.float32


def test_non_contiguous_inputs_are_accepted() -> None:
    rng = np.random.default_rng(4)
    wide = rng.standard_normal((200, 32)).astype(np.float32)
    strided = wide[:, ::2]  # [200, 16], not contiguous
    fortran = np.asfortranarray(strided)
    a, b = VectorIndex(16, "ip"), VectorIndex(16, "ip")
    a.add(strided, np.arange(200), threads=1)
    b.add(fortran, np.arange(200), threads=1)
    q = wide[:5, 1::2]
    np.testing.assert_array_equal(a.search(q, 4)[0], b.search(np.ascontiguousarray(q), 4)[0])


@pytest.mark.parametrize("shape", [(5, 7), (5, 9), (2, 5, 8), (7,), (), (0,)])
def test_wrong_shapes_say_the_expected_shape(shape: tuple[int, ...]) -> None:
    index = VectorIndex(8)
    with pytest.raises(ValueError, match=r"\[n, 8\] \(or \[8\] for one vector\)") as info:
        index.add(np.ones(shape, np.float32), np.arange(shape[0] if shape else 1))
    assert str(list(shape)) in str(info.value)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        index.search(np.ones(shape, np.float32), 1)
    assert len(index) == 0


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0, 1, 2], "4 vectors but 3 ids"),
        ([0, 1, 2, 3, 4], "4 vectors but 5 ids"),
        ([0, -1, 2, 3], ">= 0"),
        ([0.0, 1.0, 2.0, 3.0], "integers"),
        ([True, False, True, False], "integers"),
        (np.array([0, 1, 2, 2**63], np.uint64), "2\\*\\*63-1"),
        ([[0, 1], [2, 3]], "1-D"),
        (["a", "b", "c", "d"], "integers"),
    ],
)
def test_bad_ids_raise_value_error(ids, message: str) -> None:
    index = VectorIndex(4)
    with pytest.raises(ValueError, match=message):
        index.add(np.ones((4, 4), np.float32), ids)
    assert len(index) == 0


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, np.float64(1e39)], ids=["nan", "inf", "-inf", "beyond-float32"]
)
def test_non_finite_vectors_raise_and_add_nothing(bad) -> None:
    index = VectorIndex(4, "l2")
    vectors = np.ones((3, 4))
    vectors[2, 1] = bad
    with pytest.raises(ValueError, match="row 2"):
        index.add(vectors, [0, 1, 2])
    assert len(index) == 0 and 0 not in index
    index.add(np.ones((1, 4)), [0])
    with pytest.raises(ValueError, match="finite"):
        index.search(vectors, 1)


def test_non_numeric_vectors_raise_value_error() -> None:
    with pytest.raises(ValueError, match="numeric"):
        VectorIndex(2).add([["a", "b"]], [0])


def test_single_query_returns_1d_and_batch_returns_2d(embeddings) -> None:
    index, data = small_index(embeddings, "cosine", n=50)
    ids, scores = index.search(data[0], 5)
    assert ids.shape == (5,) and scores.shape == (5,)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert ids[0] == 0
    ids, scores = index.search(data[:3], 5)
    assert ids.shape == (3, 5) and scores.shape == (3, 5)
    ids, scores = index.search(data[:1], 5)  # a batch of one stays 2-D
    assert ids.shape == (1, 5)


@pytest.mark.parametrize("metric", METRICS)
def test_k_beyond_size_pads_with_minus_one(metric: str) -> None:
    rng = np.random.default_rng(6)
    index = VectorIndex(8, metric)
    index.add(rng.standard_normal((5, 8)), [10, 11, 12, 13, 14])
    ids, scores = index.search(rng.standard_normal((2, 8)), 8)
    assert ids.shape == (2, 8)
    assert (np.sort(ids[:, :5], axis=1) == [10, 11, 12, 13, 14]).all()
    np.testing.assert_array_equal(ids[:, 5:], -1)
    assert np.isfinite(scores[:, :5]).all()
    assert_best_first(scores[:, :5], metric)
    assert index.search(rng.standard_normal((2, 8)), 0)[0].shape == (2, 0)
    np.testing.assert_array_equal(VectorIndex(8, metric).search(np.ones(8), 3)[0], -1)


def test_capacity_grows_by_itself() -> None:
    rng = np.random.default_rng(7)
    index = VectorIndex(16, "l2", capacity=10)
    first = index.capacity
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    for part in np.array_split(np.arange(3000), 3):
        index.add(vectors[part], part)
    assert len(index) == 3000 and index.capacity >= 3000 > first
    found, _ = index.search(vectors, 1)
    assert (found[:, 0] == np.arange(3000)).mean() >= 0.99


def test_cosine_ignores_vector_length(embeddings) -> None:
    index, data = small_index(embeddings, "cosine", n=100)
    index.add(data[5] * 7.5, 5)
    ids, scores = index.search(data[5] * 0.01, 1)
    assert ids[0] == 5 and scores[0] == pytest.approx(1.0, abs=1e-5)


def test_knobs_are_checked() -> None:
    with pytest.raises(ValueError):
        VectorIndex(0)
    with pytest.raises(ValueError, match="metric"):
        VectorIndex(4, "dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VectorIndex(4, M=1)
    with pytest.raises(ValueError):
        VectorIndex(4, ef_construction=0)
    with pytest.raises(TypeError):
        VectorIndex("4")  # type: ignore[arg-type]
    index = VectorIndex(4, ef_construction=300)
    assert index.ef >= 64
    index.ef = 17
    assert index.ef == 17
    with pytest.raises(ValueError):
        index.ef = 0
    with pytest.raises(TypeError):
        index.ef = True
    with pytest.raises(ValueError):
        index.search(np.ones(4), -1)
    with pytest.raises(ValueError):
        index.search(np.ones(4), 1, ef=0)


def test_contains_len_and_repr(embeddings) -> None:
    index, _ = small_index(embeddings, "ip", n=10)
    assert len(index) == 10
    assert 3 in index and np.int64(3) in index and np.uint64(3) in index
    for other in (10, -1, 2**64, True, "3", 3.0, None):
        assert other not in index
    assert repr(index) == f"VectorIndex(dim=384, metric='ip', size=10, ef={index.ef})"
    assert index.dim == 384 and index.metric == "ip"


# --- persistence --------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_save_load_round_trip(embeddings, metric: str, tmp_path: Path, native_tmp: Path) -> None:
    index, data = small_index(embeddings, metric)
    index.delete(np.arange(0, 1000, 3))
    index.ef = 48
    path = tmp_path / "index.trx"
    index.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.trx"]  # no temp files left
    loaded = VectorIndex.load(str(path))
    assert not list(native_tmp.glob("tailrank-*")), "load left its staging file behind"

    assert (loaded.dim, loaded.metric, loaded.ef, len(loaded)) == (index.dim, index.metric, 48, len(index))
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    queries = embeddings.sample(50, seed=12)
    for kwargs in ({}, {"ef": 200}, {"allow": np.arange(0, 1000, 2)}, {"allow": np.arange(0, 1000, 100)}):
        for got, want in zip(loaded.search(queries, 10, **kwargs), index.search(queries, 10, **kwargs)):
            np.testing.assert_array_equal(got, want)

    # The loaded index keeps working: revive, replace, add past capacity, delete.
    more = embeddings.sample(1500, seed=13)
    loaded.add(more, np.arange(3000, 4500))
    loaded.add(data[:1], [0])
    loaded.delete([1])
    assert len(loaded) == len(index) + 1500 + 1 - 1
    assert loaded.search(data[0], 1)[0][0] == 0


def test_save_overwrites_and_concurrent_saves_are_safe(embeddings, tmp_path: Path) -> None:
    index, _ = small_index(embeddings, "l2", n=500)
    path = tmp_path / "index.trx"
    VectorIndex(4).save(path)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            for _ in range(3):
                index.save(path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors
    loaded = VectorIndex.load(path)
    assert len(loaded) == 500 and loaded.dim == EMBED_DIM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.trx"]


@pytest.fixture(scope="module")
def damaged_index_files(embeddings, tmp_path_factory, damaged_copies) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("damaged-index")
    index, _ = small_index(embeddings, "cosine", n=200)
    index.delete([5])
    good = root / "good.trx"
    index.save(good)
    store = DocStore(100)
    store.add([1, 2], [[1, 2, 3], [4, 5]])
    store.save(root / "docstore.trd")
    return good, damaged_copies(good, root / "docstore.trd", root)


def test_damaged_files_raise_corrupt_file_error(damaged_index_files, native_tmp: Path, assert_all_corrupt) -> None:
    good, damaged = damaged_index_files
    assert_all_corrupt(VectorIndex.load, damaged)
    assert len(VectorIndex.load(good)) == 199
    assert not list(native_tmp.glob("tailrank-*")), "the core left staging files behind"


def test_any_flipped_byte_is_caught(damaged_index_files, tmp_path: Path) -> None:
    good, _ = damaged_index_files
    data = good.read_bytes()
    rng = np.random.default_rng(9)
    for pos in np.r_[np.arange(80), rng.choice(np.arange(80, len(data)), size=40, replace=False)]:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        path = tmp_path / "flipped.trx"
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptFileError):
            VectorIndex.load(path)


def test_corrupt_file_error_is_a_tailrank_error(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(TailrankError, match="empty"):
        VectorIndex.load(tmp_path / "empty")


# --- threads ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_search_add_delete(make_mixture, tmp_path: Path) -> None:
    """8 threads search while one adds, replaces, revives, deletes and saves for ~4 s."""
    mixture = make_mixture(64, seed=5)
    rng = np.random.default_rng(13)
    index = VectorIndex(64, "cosine", ef_construction=64)
    start_n = 3000
    vectors = {i: v for i, v in enumerate(mixture.sample(start_n, seed=1))}
    index.add(np.stack(list(vectors.values())), np.arange(start_n))
    pool = mixture.sample(40_000, seed=2)  # vectors for the writer, drawn up front
    queries = mixture.sample(512, seed=3)

    ever_added = set(vectors)  # updated *before* each add: a search may see an add mid-way
    added_lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []
    searches = [0] * 8
    writer_rounds = [0]

    def searcher(slot: int) -> None:
        local = np.random.default_rng(100 + slot)
        try:
            while not stop.is_set():
                batch = queries[local.integers(len(queries), size=int(local.integers(1, 17)))]
                k = int(local.integers(1, 31))
                allow = None
                if slot % 4 == 1:
                    allow = local.choice(start_n, size=40, replace=False)  # exact scan
                elif slot % 4 == 2:
                    allow = np.arange(0, 50_000, 2)  # filtered HNSW walk
                ids, scores = index.search(batch, k, allow=allow, threads=1 if slot % 2 else None)
                with added_lock:
                    unknown = set(ids[ids >= 0].tolist()) - ever_added
                if unknown:
                    errors.append(f"never-added ids returned: {sorted(unknown)[:5]}")
                for row, row_scores in zip(ids, scores):
                    valid = row[row >= 0]
                    if (row[: len(valid)] < 0).any() or len(set(valid.tolist())) != len(valid):
                        errors.append(f"bad row {row}")
                    if allow is not None and not np.isin(valid, allow).all():
                        errors.append("an id outside the allow-list")
                    if not np.isfinite(row_scores[: len(valid)]).all():
                        errors.append("a non-finite score")
                if slot == 0:
                    _ = (len(index), 17 in index, index.ids())
                searches[slot] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"searcher {slot}: {e!r}")

    live = set(vectors)
    deleted: set[int] = set()

    def writer() -> None:
        next_id, next_row = start_n, 0
        deadline = time.monotonic() + 4.0
        saved = False
        try:
            while time.monotonic() < deadline and next_row + 200 <= len(pool):
                new = np.arange(next_id, next_id + 150)
                rows = pool[next_row : next_row + 150]
                next_id, next_row = next_id + 150, next_row + 150
                replace = rng.choice(sorted(live), size=20, replace=False)
                revive = rng.choice(sorted(deleted), size=min(10, len(deleted)), replace=False)
                ids = np.r_[new, replace, revive].astype(np.int64)
                vecs = np.r_[rows, pool[next_row : next_row + len(replace) + len(revive)]]
                next_row += len(replace) + len(revive)
                with added_lock:
                    ever_added.update(ids.tolist())
                index.add(vecs, ids)
                vectors.update(zip(ids.tolist(), vecs))
                live.update(ids.tolist())
                deleted.difference_update(ids.tolist())

                gone = rng.choice(sorted(live), size=60, replace=False)
                index.delete(gone)
                live.difference_update(gone.tolist())
                deleted.update(gone.tolist())
                try:
                    index.delete([int(gone[0]), 10**12])
                    errors.append("deleting an unknown id did not raise")
                except UnknownIdError:
                    pass
                if not saved and writer_rounds[0] == 2:
                    index.save(tmp_path / "mid.trx")
                    saved = True
                writer_rounds[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"writer: {e!r}")
        finally:
            stop.set()

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    assert not [t for t in threads if t.is_alive()], "a thread is stuck (deadlock?)"
    assert not errors, errors[:10]
    assert writer_rounds[0] >= 3 and min(searches) > 0, (writer_rounds, searches)

    # The final state is exactly what the writer did.
    np.testing.assert_array_equal(index.ids(), sorted(live))
    found, _ = index.search(np.stack([vectors[i] for i in sorted(deleted)]), 10)
    assert not np.isin(found, sorted(deleted)).any()
    sample = rng.choice(sorted(live), size=300, replace=False)
    found, _ = index.search(np.stack([vectors[i] for i in sample]), 1)
    assert (found[:, 0] == sample).mean() >= 0.95
    mid = VectorIndex.load(tmp_path / "mid.trx")
    assert len(mid) == len(mid.ids()) > 0


def _another_thread_ran_inside(calls) -> int:
    """Runs the calls one by one on this thread while another Python thread ticks; returns how
    many calls ran before one of its ticks fell inside a call (0 if none ever did).

    No clock: the switch interval is made far longer than the test, so this thread keeps the GIL
    between calls, and the ticker (which sleeps, releasing it, between ticks) can take it only
    when a call releases it. A call that held the GIL would never let it tick.
    """
    state = {"ticks": 0, "stop": False}
    go = threading.Event()

    def ticker() -> None:
        go.wait()
        while not state["stop"]:
            state["ticks"] += 1
            time.sleep(0.0005)

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    interval = sys.getswitchinterval()
    try:
        sys.setswitchinterval(1000.0)
        go.set()
        for n, call in enumerate(calls, 1):
            before = state["ticks"]
            call()
            if state["ticks"] > before:
                return n
        return 0
    finally:
        sys.setswitchinterval(interval)
        state["stop"] = True
        go.set()
        t.join(timeout=60)


@pytest.mark.parametrize("op", ["search", "add"])
def test_heavy_calls_release_the_gil(embeddings, op: str) -> None:
    data = embeddings.sample(3000, seed=21)
    index = VectorIndex(EMBED_DIM, "cosine", ef_construction=100)
    if op == "search":
        index.add(data, np.arange(len(data)))
        queries = np.ascontiguousarray(embeddings.sample(500, seed=22), dtype=np.float32)
        calls = [lambda: index.search(queries, 10, ef=400, threads=1)] * 50
    else:
        calls = [lambda i=i: index.add(data[i : i + 100], np.arange(i, i + 100), threads=1)
                 for i in range(0, len(data), 100)]
    assert _another_thread_ran_inside(calls) >= 1, "no other thread ran while the core worked: the GIL was held"
