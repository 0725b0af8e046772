"""The native core treats files as untrusted and never blocks Python: golden files of every format
version, forged structural fields with valid checksums, deterministic builds, the persistent
thread pool, GIL-free accessors and bounds on caller-chosen sizes."""

from __future__ import annotations

import os
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tailrank import DocStore, VectorIndex, _core
from tailrank.errors import CorruptFileError

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
import golden_data  # noqa: E402

HEADER = 80


def _exact(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, metric: str, k: int) -> list[list[int]]:
    if metric == "cosine":
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    score = -((q[:, None, :] - vecs[None]) ** 2).sum(-1) if metric == "l2" else q @ vecs.T
    return [[int(ids[j]) for j in np.argsort(-row, kind="stable")[:k]] for row in score]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_golden_index_files_load_and_search(version: str, metric: str, tmp_path: Path) -> None:
    path = GOLDEN / version / f"index-{metric}.bin"
    index = VectorIndex.load(path)
    vecs, ids = golden_data.index_data()
    keep = np.setdiff1d(np.arange(golden_data.N), golden_data.DELETED)
    assert len(index) == len(keep)
    assert index.ids().tolist() == sorted(int(i) for i in ids[keep])
    q = golden_data.queries()
    index.ef = 400  # above the element count: the beam holds every element, so results are exact
    got, _ = index.search(q, k=10)
    assert got.tolist() == _exact(vecs[keep], ids[keep], q, metric, 10)
    # A file read in an older version is saved in the current one, with the same results.
    index.save(tmp_path / "again.bin")
    again = VectorIndex.load(tmp_path / "again.bin")
    again.ef = 400
    assert again.search(q, k=10)[0].tolist() == got.tolist()


@pytest.mark.parametrize("name,vocab", [("narrow", golden_data.VOCAB_NARROW), ("wide", golden_data.VOCAB_WIDE)])
def test_golden_docstore_files_load(name: str, vocab: int) -> None:
    store = DocStore.load(GOLDEN / "v1" / f"docstore-{name}.bin")
    ids, docs = golden_data.docstore_data(vocab)
    assert len(store) == len(ids) - 3
    for i, d in zip(ids[3:], docs[3:]):
        assert store.get(int(i)).tolist() == d.tolist()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _reseal(raw: bytearray) -> bytes:
    """Recomputes both checksums, as anyone editing a file can."""
    payload = bytes(raw[HEADER:])
    struct.pack_into("<Q", raw, 64, len(payload))
    struct.pack_into("<I", raw, 72, _crc32c(payload))
    struct.pack_into("<I", raw, 76, _crc32c(bytes(raw[:76])))
    return bytes(raw)


def _small_index(tmp_path: Path) -> tuple[bytes, dict[str, int]]:
    rng = np.random.default_rng(0)
    index = VectorIndex(4, "l2", M=4, ef_construction=20)
    index.add(rng.standard_normal((60, 4)).astype(np.float32), np.arange(60))
    index.delete([3, 5])
    index.save(tmp_path / "small.bin")
    raw = (tmp_path / "small.bin").read_bytes()
    slots, _, maxm0, maxm, max_level, entry, deleted, _ = struct.unpack_from("<QQQQqQQQ", raw, HEADER)
    sdpe = 4 + 4 * maxm0 + 4 * 4 + 8
    lvl0 = HEADER + 64
    levels_at = lvl0 + slots * sdpe
    layout = dict(slots=slots, maxm0=maxm0, maxm=maxm, max_level=max_level, entry=entry, deleted=deleted,
                  sdpe=sdpe, lvl0=lvl0, levels_at=levels_at, upper=levels_at + 4 * slots)
    return raw, layout


def _forge(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, at, value)
    return _reseal(b)


def _forgeries(raw: bytes, L: dict[str, int]) -> dict[str, bytes]:
    levels = struct.unpack_from(f"<{L['slots']}I", raw, L["levels_at"])
    tall = next(i for i, lv in enumerate(levels) if lv > 0)
    short = next(i for i, lv in enumerate(levels) if lv == 0)
    upper_of_tall = L["upper"] + sum(lv for lv in levels[:tall]) * (4 + 4 * L["maxm"])
    first_link = lambda i: L["lvl0"] + i * L["sdpe"] + 4  # noqa: E731
    label_at = lambda i: L["lvl0"] + i * L["sdpe"] + 4 + 4 * L["maxm0"] + 16  # noqa: E731
    vec_at = lambda i: L["lvl0"] + i * L["sdpe"] + 4 + 4 * L["maxm0"]  # noqa: E731
    P = HEADER
    return {
        "count above capacity": _forge(raw, P + 8, "<Q", L["slots"] - 1),
        "capacity": _forge(raw, P + 8, "<Q", 1 << 40),
        "element count": _forge(raw, P, "<Q", L["slots"] + 1),
        "maxM0": _forge(raw, P + 16, "<Q", L["maxm0"] + 1),
        "maxM": _forge(raw, P + 24, "<Q", L["maxm"] * 4),
        "max level": _forge(raw, P + 32, "<q", L["max_level"] + 1),
        "max level negative": _forge(raw, P + 32, "<q", -1),
        "entry point": _forge(raw, P + 40, "<Q", L["slots"]),
        "entry point level": _forge(raw, P + 40, "<Q", short),
        "deleted count": _forge(raw, P + 48, "<Q", L["deleted"] + 1),
        "link count": _forge(raw, L["lvl0"] + short * L["sdpe"], "<H", L["maxm0"] + 1),
        "link header bits": _forge(raw, L["lvl0"] + short * L["sdpe"] + 3, "<B", 1),
        "neighbour id": _forge(raw, first_link(short), "<I", L["slots"] + 7),
        "upper link count": _forge(raw, upper_of_tall, "<I", L["maxm"] + 1),
        "upper neighbour id": _forge(_forge(raw, upper_of_tall, "<I", 1), upper_of_tall + 4, "<I", 1 << 31),
        "upper neighbour level": _forge(_forge(raw, upper_of_tall, "<I", 1), upper_of_tall + 4, "<I", short),
        "level above max": _forge(raw, L["levels_at"] + 4 * short, "<I", L["max_level"] + 1),
        "levels vs lists": _forge(raw, L["levels_at"] + 4 * short, "<I", 1),
        "duplicate label": _forge(raw, label_at(1), "<Q", struct.unpack_from("<Q", raw, label_at(0))[0]),
        "label range": _forge(raw, label_at(2), "<Q", 1 << 63),
        "vector": _forge(raw, vec_at(4), "<I", 0x7FC00000),  # NaN
        "vector norm": _forge(raw, vec_at(4), "<I", struct.unpack("<I", struct.pack("<f", 1e30))[0]),  # l2 scores overflow
        "deleted mark": _forge(raw, L["lvl0"] + short * L["sdpe"] + 2, "<B", 2),
        "dim": _forge(raw, 16, "<Q", 5),
        "M": _forge(raw, 40, "<Q", 8),
        "live count": _forge(raw, 32, "<Q", L["slots"]),
        "metric": _forge(raw, 24, "<Q", 9),
    }


def test_forged_index_fields_with_valid_checksums_raise(tmp_path: Path) -> None:
    raw, layout = _small_index(tmp_path)
    VectorIndex.load(tmp_path / "small.bin")  # the untouched file loads
    forged = _forgeries(raw, layout)
    assert len(forged) >= 20
    for name, data in forged.items():
        p = tmp_path / f"forged-{name.replace(' ', '-')}.bin"
        p.write_bytes(data)
        with pytest.raises(CorruptFileError):
            VectorIndex.load(p)


def test_forged_docstore_fields_raise(tmp_path: Path) -> None:
    store = DocStore(100)
    store.add([1, 2, 3], [[5, 6], [7], [8, 9, 10]])
    store.save(tmp_path / "s.bin")
    raw = (tmp_path / "s.bin").read_bytes()
    cases = {
        "vocab": _forge(raw, 16, "<Q", 0),
        "width": _forge(raw, 24, "<Q", 1),
        "count": _forge(raw, 32, "<Q", 4),
        "tokens": _forge(raw, 40, "<Q", 7),
        "reserved": _forge(raw, 48, "<Q", 1),
        "id order": _forge(raw, HEADER + 12, "<Q", 1),
        "id range": _forge(raw, HEADER + 24, "<Q", 1 << 63),
        "length": _forge(raw, HEADER + 8, "<I", 3),
        "token id": _forge(raw, HEADER + 36, "<H", 100),
    }
    for name, data in cases.items():
        p = tmp_path / f"forged-{name}.bin"
        p.write_bytes(data)
        with pytest.raises(CorruptFileError):
            DocStore.load(p)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_same_seed_data_give_byte_identical_files(tmp_path: Path, threads: int) -> None:
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((3000, 16)).astype(np.float32)
    files = []
    for run in range(2):
        index = VectorIndex(16, "cosine", M=8, ef_construction=64)
        index.add(vecs, np.arange(3000), threads=threads)
        index.add(vecs[:100] * 2, np.arange(100), threads=threads)  # in-place updates
        index.delete(np.arange(200, 260))
        index.add(vecs[200:230], np.arange(5000, 5030), threads=threads)  # reuses deleted slots
        p = tmp_path / f"t{threads}-{run}.bin"
        index.save(p)
        files.append(p.read_bytes())
    assert files[0] == files[1]
    one = VectorIndex(16, "cosine", M=8, ef_construction=64)
    one.add(vecs, np.arange(3000), threads=1)
    one.add(vecs[:100] * 2, np.arange(100), threads=1)
    one.delete(np.arange(200, 260))
    one.add(vecs[200:230], np.arange(5000, 5030), threads=1)
    one.save(tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes() == files[0]  # the graph does not depend on threads


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_parallel_work_reuses_one_pool() -> None:
    rng = np.random.default_rng(2)
    index = VectorIndex(8, "ip")
    index.add(rng.standard_normal((2000, 8)).astype(np.float32), np.arange(2000), threads=2)
    q = rng.standard_normal((64, 8)).astype(np.float32)
    index.search(q, k=5, threads=4)
    workers, before = _core._pool_workers(), _native_threads()
    for _ in range(50):
        index.search(q, k=5, threads=4)
        index.add(rng.standard_normal((40, 8)).astype(np.float32), rng.integers(0, 10**6, size=40), threads=4)
    assert _core._pool_workers() == workers and _native_threads() == before


def test_accessors_do_not_hold_the_gil_while_a_writer_holds_the_index() -> None:
    index = VectorIndex(8, "l2")
    index.add(np.ones((10, 8), np.float32), np.arange(10))
    holding, release, reader_done = threading.Event(), threading.Event(), threading.Event()
    reader_started = threading.Event()
    ran_while_blocked = []

    def writer() -> None:
        index._compiled._hold_write_lock(lambda: (holding.set(), release.wait(30)))

    def reader() -> None:
        reader_started.set()
        len(index), 3 in index, index.ef, index.capacity  # each waits for the writer
        reader_done.set()

    w = threading.Thread(target=writer)
    w.start()
    assert holding.wait(30)
    r = threading.Thread(target=reader)
    r.start()
    assert reader_started.wait(30)
    # This thread runs Python while the reader waits for the core's lock: it must not hold the GIL.
    for i in range(200):
        ran_while_blocked.append(i)
        if reader_done.is_set():
            break
    assert not reader_done.is_set() and len(ran_while_blocked) == 200
    release.set()
    w.join(30)
    r.join(30)
    assert reader_done.is_set()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda ix: ix.search(np.zeros(8, np.float32), k=1 << 21), "at most 1048576"),
        (lambda ix: ix.search(np.zeros(8, np.float32), k=5, ef=1 << 21), "at most 1048576"),
        (lambda ix: ix.search(np.zeros((1 << 12, 8), np.float32), k=1 << 17), "results per call"),
        (lambda ix: ix.add(np.zeros((1, 8), np.float32), [1], threads=5000), "at most 1024"),
    ],
)
def test_caller_sizes_are_bounded(call, match) -> None:  # type: ignore[no-untyped-def]
    index = VectorIndex(8, "l2")
    index.add(np.ones((3, 8), np.float32), np.arange(3))
    with pytest.raises(ValueError, match=match):
        call(index)
    with pytest.raises(ValueError, match="capacity"):
        VectorIndex(8, "l2", capacity=1 << 33)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_vectors_whose_scores_overflow_float32_are_refused(metric: str, tmp_path: Path) -> None:
    # Were accepted: every dot product / squared distance of two such vectors is inf (or NaN for ip).
    index = VectorIndex(4, metric)
    huge = np.array([[1e30, 0, 0, 0], [0, -3e38, 0, 0]], dtype=np.float32)
    for row in huge:
        with pytest.raises(ValueError, match="norm above 1e18"):
            index.add(np.stack([np.ones(4, np.float32), row]), [1, 2])
    assert len(index) == 0
    index.add(np.array([[1e17, 0, 0, 0], [0, 1e17, 0, 0]], dtype=np.float32), [1, 2])
    _, scores = index.search(np.array([1, 1, 0, 0], dtype=np.float32), 2)
    assert np.isfinite(scores).all()


def test_forged_index_vector_of_huge_norm_is_corrupt(tmp_path: Path) -> None:
    raw, L = _small_index(tmp_path)
    vec = L["lvl0"] + 4 * L["sdpe"] + 4 + 4 * L["maxm0"]
    p = tmp_path / "huge.bin"
    p.write_bytes(_forge(raw, vec, "<I", struct.unpack("<I", struct.pack("<f", 1e30))[0]))
    with pytest.raises(CorruptFileError, match="norm"):
        VectorIndex.load(p)


def test_tiny_cosine_vectors_normalize_in_double() -> None:
    # Was inf / NaN in the graph: 1 / norm overflowed float for |x| ~ 1e-45.
    index = VectorIndex(4, "cosine")
    index.add(np.array([[1e-45, 0, 0, 0], [0, 1e-40, 1e-40, 0]], dtype=np.float32), [1, 2])
    ids, scores = index.search(np.array([1, 0, 0, 0], dtype=np.float32), 2)
    assert ids.tolist() == [1, 2] and scores.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


# --- arrays handed to Python outlive the objects that made them -----------------------------------


def _churn() -> None:
    """Collects garbage, then allocates and fills as much as was freed: a freed buffer still
    read through a stale array would now hold 0x5A bytes (ASan reports the read itself)."""
    import gc

    gc.collect()
    junk = [np.full(1 << 14, 0x5A, dtype=np.uint8) for _ in range(256)]
    del junk


def _owners_of(arr: np.ndarray) -> list[str]:
    chain = []
    base = arr.base
    while base is not None:
        chain.append(type(base).__name__)
        base = getattr(base, "base", None)
    return chain


def test_arrays_from_the_core_stay_valid_after_their_owners_are_dropped() -> None:
    from tailrank.pairs import PairBatcher, PairTemplate, retrieve_and_assemble

    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((40, 8)).astype(np.float32)
    docs = [rng.integers(5, 90, rng.integers(3, 20)).astype(np.int32) for _ in range(40)]
    index, store = VectorIndex(8, "cosine"), DocStore(100)
    index.add(vecs, np.arange(40))
    store.add(np.arange(40), docs)
    batcher = PairBatcher(PairTemplate.bert(cls_id=1, sep_id=2), max_length=24, batch_tokens=96)
    q, qtok = vecs[7], np.array([10, 11, 12], dtype=np.int32)

    ids, scores = index.search(q, 5)
    batch_ids, batch_scores = index.search(vecs[:3], 4)
    live = index.ids()
    tokens, stored = store.get(7), store.ids()
    asm = batcher.assemble(qtok, docs[:9])
    f_ids, f_scores, f_asm = retrieve_and_assemble(index, store, batcher, q, qtok, k=6)
    held = {"ids": ids, "scores": scores, "batch_ids": batch_ids, "batch_scores": batch_scores, "live": live,
            "tokens": tokens, "stored": stored, "f_ids": f_ids, "f_scores": f_scores}  # fmt: skip
    for name, a in (("asm", asm), ("f_asm", f_asm)):
        for i, b in enumerate(a.batches):
            for field in ("input_ids", "attention_mask", "token_type_ids", "rows"):
                held[f"{name}.{i}.{field}"] = getattr(b, field)
        held[f"{name}.order"], held[f"{name}.lengths"] = a.order, a.lengths
    want = {k: v.copy() for k, v in held.items()}
    # The assembler's buffers reach Python as views: each is owned through a capsule.
    assert "PyCapsule" in _owners_of(asm.batches[0].input_ids) and "PyCapsule" in _owners_of(f_asm.batches[0].input_ids)
    del index, store, batcher, asm, f_asm
    _churn()
    for k, v in held.items():
        assert np.array_equal(v, want[k]), k
    assert ids[0] == 7 and tokens.tolist() == docs[7].tolist()


def test_collection_candidates_stay_valid_after_close(tmp_path: Path) -> None:
    # The first stage's keys, scores and token copies outlive the collection that made them.
    sys.path.insert(0, str(Path(__file__).parent))
    import models
    from tailrank import CrossEncoder, Embedder
    from tailrank.collection import Collection

    class Factory:
        def mktemp(self, name: str) -> Path:
            p = tmp_path / name
            p.mkdir()
            return p

    emb = Embedder(models.exported_st(Factory(), pooling="mean", normalize=True)[1], threads=1)
    ce = CrossEncoder(models.exported(Factory(), "bert")[1], threads=1, max_batch_size=8)
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add([models.sample_text(__import__("random").Random(i), 12) for i in range(30)])
    assert col.checkpoint()  # every chunk in the graph: the fused call assembles during the walk
    plan = col.plan_search("cell gene", k=5, candidates=12)
    cands = col.first_stage(plan, emb.encode(["cell gene"])[0], ce.tokenize(["cell gene"])[0])
    fused = col.first_stage(plan, emb.encode(["cell gene"])[0], ce.tokenize(["cell gene"])[0], assemble=True)
    arrays = [cands.keys, cands.first, *cands.docs, fused.keys, fused.first,
              *(b.input_ids for b in fused.assembly.batches)]  # fmt: skip
    want = [a.copy() for a in arrays]
    col.close()
    del col, fused
    _churn()
    assert all(np.array_equal(a, w) for a, w in zip(arrays, want))
