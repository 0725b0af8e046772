"""tailrank.DocStore: storage width, add/get/replace/delete, validation and persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailrank import DocStore, VectorIndex
from tailrank.errors import CorruptFileError, UnknownIdError

BERT_VOCAB = 30522  # bert-base-uncased, MiniLM: fits uint16
XLMR_VOCAB = 250002  # xlm-roberta: needs int32


def random_docs(rng: np.random.Generator, n: int, vocab: int, max_len: int = 64) -> list[np.ndarray]:
    return [rng.integers(0, vocab, size=int(rng.integers(0, max_len + 1))) for _ in range(n)]


def assert_holds(store: DocStore, docs: dict[int, list[int] | np.ndarray]) -> None:
    """The store holds exactly these documents."""
    assert len(store) == len(docs)
    np.testing.assert_array_equal(store.ids(), sorted(docs))
    for doc_id, tokens in docs.items():
        got = store.get(doc_id)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.asarray(tokens, dtype=np.int64))


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(BERT_VOCAB, np.uint16), (XLMR_VOCAB, np.int32), (65536, np.uint16), (65537, np.int32), (1, np.uint16)],
)
def test_storage_width_follows_the_vocabulary(vocab: int, dtype) -> None:
    store = DocStore(vocab)
    assert store.dtype == np.dtype(dtype)
    assert store.vocab_size == vocab
    top = [vocab - 1, 0, vocab - 1]  # the largest token id must survive the narrow storage
    store.add([1], [top])
    np.testing.assert_array_equal(store.get(1), top)


@pytest.mark.parametrize("vocab", [BERT_VOCAB, XLMR_VOCAB])
def test_add_lists_and_flat_offsets(vocab: int) -> None:
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 50, vocab)
    store = DocStore(vocab)
    store.add(np.arange(25), [d.tolist() for d in docs[:25]])  # plain lists
    flat = np.concatenate(docs[25:]).astype(np.int32)
    offsets = np.r_[0, np.cumsum([len(d) for d in docs[25:]])]
    store.add(np.arange(25, 50), (flat, offsets))  # a (flat, offsets) pair
    assert_holds(store, dict(enumerate(docs)))
    assert 0 in store and np.int64(49) in store and 50 not in store


def test_numpy_arrays_and_empty_documents() -> None:
    store = DocStore(BERT_VOCAB)
    store.add([7, 8, 9], [np.array([1, 2], np.uint16), [], np.array([3], np.int64)])
    assert_holds(store, {7: [1, 2], 8: [], 9: [3]})
    store.add([], [])
    store.add(np.zeros(0, np.int64), (np.zeros(0, np.int64), np.zeros(1, np.int64)))
    assert len(store) == 3


def test_replace_and_delete() -> None:
    store = DocStore(XLMR_VOCAB)
    store.add([1, 2, 3], [[10, 11], [20], [30, 31, 32]])
    store.add([2], [[200_000, 21, 22]])
    assert_holds(store, {1: [10, 11], 2: [200_000, 21, 22], 3: [30, 31, 32]})
    store.add([4, 4], [[1], [2]])  # a repeated id in one call: the last wins
    assert_holds(store, {1: [10, 11], 2: [200_000, 21, 22], 3: [30, 31, 32], 4: [2]})

    store.delete([1, 4])
    store.delete(np.array([3, 3]))  # repeated ids are deleted once
    assert_holds(store, {2: [200_000, 21, 22]})
    assert 1 not in store and 3 not in store
    store.add([1], [[5]])  # a deleted id can come back
    assert_holds(store, {1: [5], 2: [200_000, 21, 22]})


def test_unknown_ids_raise_and_change_nothing() -> None:
    store = DocStore(BERT_VOCAB)
    store.add([1, 2], [[1], [2]])
    with pytest.raises(UnknownIdError, match="99"):
        store.delete([1, 99])
    assert_holds(store, {1: [1], 2: [2]})
    with pytest.raises(KeyError):
        store.get(3)
    with pytest.raises(UnknownIdError, match="3"):
        store.get(3)


@pytest.mark.parametrize("vocab", [BERT_VOCAB, XLMR_VOCAB])
def test_out_of_vocabulary_tokens_raise_and_change_nothing(vocab: int) -> None:
    store = DocStore(vocab)
    store.add([1, 2], [[1, 2], [3]])
    for bad in (vocab, vocab + 1, -1, 2**40):
        with pytest.raises(ValueError, match="vocabulary"):
            store.add([2, 3], [[4], [5, bad]])  # a replace and an add, refused together
        with pytest.raises(ValueError, match="vocabulary"):
            store.add([3], (np.array([bad], np.int64), np.array([0, 1])))
    assert_holds(store, {1: [1, 2], 2: [3]})


@pytest.mark.parametrize(
    ("ids", "docs", "message"),
    [
        ([1, 2], [[1]], "2 ids but 1 documents"),
        ([1], [[1], [2]], "1 ids but 2 documents"),
        ([-1], [[1]], ">= 0"),
        ([1.0], [[1]], "integers"),
        ([1], [[1.5, 2.0]], "integer token ids"),
        ([1], [[[1, 2]]], "1-D"),
        ([1], (np.array([1, 2]), np.array([1, 2])), "offsets\\[0\\] must be 0"),
        ([1, 2], (np.array([1, 2]), np.array([0, 2, 1])), "non-decreasing"),
        ([1], (np.array([1, 2]), np.array([0, 1])), "number of tokens"),
        ([1], (np.array([1.0, 2.0]), np.array([0, 2])), "integer array"),
        ([1], (np.array([[1, 2]]), np.array([0, 2])), "1-D"),
    ],
)
def test_bad_inputs_raise_value_error(ids, docs, message: str) -> None:
    store = DocStore(BERT_VOCAB)
    with pytest.raises(ValueError, match=message):
        store.add(ids, docs)
    assert len(store) == 0


def test_documents_must_be_a_sequence() -> None:
    with pytest.raises(TypeError):
        DocStore(10).add([1], 5)
    with pytest.raises(ValueError):
        DocStore(0)


def test_contains_and_repr() -> None:
    store = DocStore(BERT_VOCAB)
    store.add([3], [[1, 2]])
    assert 3 in store and np.uint64(3) in store
    for other in (4, -3, 2**64, True, "3", 3.0, None):
        assert other not in store
    assert repr(store) == "DocStore(size=1, vocab_size=30522, dtype=uint16)"


def test_many_replacements_keep_contents_and_bounded_memory() -> None:
    rng = np.random.default_rng(2)
    store = DocStore(BERT_VOCAB)
    docs = {i: rng.integers(0, BERT_VOCAB, size=100_000) for i in range(3)}
    store.add(list(docs), list(docs.values()))
    for round_ in range(12):  # 3.6M tokens written, 300k live: the arena must compact
        i = round_ % 3
        docs[i] = rng.integers(0, BERT_VOCAB, size=100_000)
        store.add([i], [docs[i]])
    assert_holds(store, docs)
    assert store._compiled.arena_tokens <= 4 * 300_000


@pytest.mark.parametrize("vocab", [BERT_VOCAB, XLMR_VOCAB])
def test_save_load_round_trip(vocab: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    docs = dict(enumerate(random_docs(rng, 300, vocab)))
    store = DocStore(vocab)
    store.add(list(docs), list(docs.values()))
    for i in range(0, 300, 7):  # leave replaced and deleted garbage in the arena
        docs[i] = rng.integers(0, vocab, size=5)
        store.add([i], [docs[i]])
    store.delete(list(range(1, 300, 5)))
    for i in range(1, 300, 5):
        del docs[i]

    path = tmp_path / "docs.trd"
    store.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.trd"]
    loaded = DocStore.load(str(path))
    assert (loaded.vocab_size, loaded.dtype) == (vocab, store.dtype)
    assert_holds(loaded, docs)
    loaded.add([1000], [[vocab - 1]])  # still writable
    assert loaded.get(1000).tolist() == [vocab - 1]

    DocStore(vocab).save(path)  # an empty store round-trips and overwrites
    assert len(DocStore.load(path)) == 0


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vocab=st.sampled_from([2, 300, 65536, 65537, XLMR_VOCAB]),
    data=st.data(),
)
def test_round_trip_property(vocab: int, data: st.DataObject, tmp_path: Path) -> None:
    token = st.integers(0, vocab - 1)
    docs = data.draw(st.dictionaries(st.integers(0, 2**63 - 1), st.lists(token, max_size=20), max_size=20))
    store = DocStore(vocab)
    store.add(list(docs), list(docs.values()))
    assert_holds(store, docs)
    path = tmp_path / "prop.trd"
    store.save(path)
    assert_holds(DocStore.load(path), docs)


@pytest.fixture(scope="module")
def damaged_docstore_files(tmp_path_factory, damaged_copies) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("damaged-docstore")
    store = DocStore(XLMR_VOCAB)
    store.add(np.arange(40), random_docs(np.random.default_rng(4), 40, XLMR_VOCAB))
    good = root / "good.trd"
    store.save(good)
    index = VectorIndex(4)
    index.add(np.eye(4), np.arange(4))
    index.save(root / "index.trx")
    return good, damaged_copies(good, root / "index.trx", root)


def test_damaged_files_raise_corrupt_file_error(damaged_docstore_files, assert_all_corrupt) -> None:
    good, damaged = damaged_docstore_files
    assert_all_corrupt(DocStore.load, damaged)
    assert len(DocStore.load(good)) == 40


def test_any_flipped_byte_is_caught(damaged_docstore_files, tmp_path: Path) -> None:
    good, _ = damaged_docstore_files
    data = good.read_bytes()
    rng = np.random.default_rng(5)
    path = tmp_path / "flipped.trd"
    for pos in np.r_[np.arange(80), rng.choice(np.arange(80, len(data)), size=40, replace=False)]:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptFileError):
            DocStore.load(path)
