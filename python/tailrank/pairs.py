"""Cross-encoder pair assembly: the tokenizer's pair template, Hugging Face-exact truncation,
length-sorted batches under a token budget, written into reusable buffers owned by the core."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from . import _core
from ._validate import as_float_matrix, as_ids, as_token_ids, positive_int
from .docstore import DocStore
from .index import VectorIndex, _allow_list

Truncation = Literal["longest_first", "only_second"]
TruncationSide = Literal["right", "left"]

__all__ = ["PairTemplate", "PairBatcher", "Batch", "Assembly", "retrieve_and_assemble", "Truncation",
           "TruncationSide"]

_SPECIAL, _SEQ_A, _SEQ_B = 0, 1, 2
_PAD_NAMES = ("[PAD]", "<pad>", "<PAD>", "[pad]")


@dataclass(frozen=True)
class PairTemplate:
    """How a (query, document) pair becomes one sequence.

    ``pieces`` are ``(kind, token_id, type_id)`` with kind 0 = special token, 1 = query (sequence
    A), 2 = document (sequence B).
    """

    pieces: tuple[tuple[int, int, int], ...]
    pad_id: int = 0

    @property
    def n_special(self) -> int:
        return sum(1 for kind, _, _ in self.pieces if kind == _SPECIAL)

    @classmethod
    def bert(cls, cls_id: int, sep_id: int, pad_id: int = 0) -> PairTemplate:
        """``[CLS] q [SEP] d [SEP]`` with token types 0 then 1."""
        return cls(
            ((_SPECIAL, cls_id, 0), (_SEQ_A, -1, 0), (_SPECIAL, sep_id, 0), (_SEQ_B, -1, 1), (_SPECIAL, sep_id, 1)),
            pad_id,
        )

    @classmethod
    def roberta(cls, bos_id: int, eos_id: int, pad_id: int = 1) -> PairTemplate:
        """``<s> q </s></s> d </s>`` (RoBERTa/XLM-R; token types unused)."""
        return cls(
            (
                (_SPECIAL, bos_id, 0),
                (_SEQ_A, -1, 0),
                (_SPECIAL, eos_id, 0),
                (_SPECIAL, eos_id, 0),
                (_SEQ_B, -1, 0),
                (_SPECIAL, eos_id, 0),
            ),
            pad_id,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> PairTemplate:
        """Reads the pair template and pad id from a ``tokenizers.Tokenizer``, a tokenizer.json
        path, or a model directory holding tokenizer.json."""
        spec = _tokenizer_json(tokenizer)
        pad_id = _pad_id(spec)
        proc = spec.get("post_processor")
        found = _find_processor(proc)
        if found is None:
            return cls(((_SEQ_A, -1, 0), (_SEQ_B, -1, 1)), pad_id)
        kind = found["type"]
        if kind == "BertProcessing":
            return cls.bert(int(found["cls"][1]), int(found["sep"][1]), pad_id)
        if kind == "RobertaProcessing":
            return cls.roberta(int(found["cls"][1]), int(found["sep"][1]), pad_id)
        specials = found.get("special_tokens", {})
        pieces: list[tuple[int, int, int]] = []
        for item in found["pair"]:
            if "Sequence" in item:
                seq = item["Sequence"]
                pieces.append((_SEQ_A if seq["id"] == "A" else _SEQ_B, -1, int(seq["type_id"])))
            else:
                tok = item["SpecialToken"]
                if tok["id"] not in specials:
                    raise ValueError(f"special token {tok['id']!r} of the pair template has no ids")
                for tid in specials[tok["id"]]["ids"]:
                    pieces.append((_SPECIAL, int(tid), int(tok["type_id"])))
        return cls(tuple(pieces), pad_id)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    to_str = getattr(tokenizer, "to_str", None)
    if to_str is None:
        raise TypeError("tokenizer must be a tokenizers.Tokenizer, a tokenizer.json path or a model directory")
    return dict(json.loads(to_str()))


def _find_processor(proc: Any) -> dict[str, Any] | None:
    if not proc:
        return None
    if proc.get("type") == "Sequence":
        for p in proc.get("processors", []):
            found = _find_processor(p)
            if found is not None:
                return found
        return None
    if proc.get("type") in ("TemplateProcessing", "BertProcessing", "RobertaProcessing"):
        return dict(proc)
    return None


def _pad_id(spec: dict[str, Any]) -> int:
    padding = spec.get("padding")
    if padding and "pad_id" in padding:
        return int(padding["pad_id"])
    vocab_tokens = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    for name in _PAD_NAMES:
        if name in vocab_tokens:
            return vocab_tokens[name]
    vocab = (spec.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for name in _PAD_NAMES:
            if name in vocab:
                return int(vocab[name])
    return 0


@dataclass(frozen=True)
class Batch:
    """One padded batch. The arrays are views into the batcher's reference-counted buffers: they
    stay valid and unchanged while held; the batcher reuses a buffer only once they are dropped."""

    rows: npt.NDArray[np.int64]  # candidate index of each row
    input_ids: npt.NDArray[Any]
    attention_mask: npt.NDArray[Any]
    token_type_ids: npt.NDArray[Any]

    def __repr__(self) -> str:
        return f"Batch(rows={self.input_ids.shape[0]}, seq_len={self.input_ids.shape[1]})"


@dataclass(frozen=True)
class Assembly:
    """Batches for one query, with per-candidate lengths and truncation flags (input order)."""

    batches: tuple[Batch, ...]
    order: npt.NDArray[np.int64]  # order[r] = candidate of row r, rows numbered across batches
    lengths: npt.NDArray[np.int64]
    truncated: npt.NDArray[np.bool_]

    @property
    def padded_tokens(self) -> int:
        return int(sum(b.input_ids.size for b in self.batches))

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    def __repr__(self) -> str:
        return (
            f"Assembly(candidates={len(self.lengths)}, batches={len(self.batches)}, "
            f"real_tokens={self.real_tokens}, padded_tokens={self.padded_tokens})"
        )


class PairBatcher:
    """Assembles (query, document) pairs into minimally padded, length-sorted batches.

    Not for concurrent use: one batcher per thread (a second concurrent call raises
    ConcurrentUseError). Buffers are reused across calls: no allocation once warm.

    Args:
        template: The pair template (``PairTemplate.from_tokenizer(...)``).
        max_length: Longest assembled pair, special tokens included.
        truncation: ``"longest_first"`` or ``"only_second"``, exactly as Hugging Face tokenizers.
        batch_tokens: Budget per batch: rows x padded length <= batch_tokens (>= max_length).
        max_batch_size: Row cap per batch.
        dtype: ``np.int64`` (default) or ``np.int32`` tensors.
        truncation_side: Which tokens of a cut query or document stay: ``"right"`` keeps the
            starts (the default, as Hugging Face), ``"left"`` the ends (its
            ``truncation_side="left"``, TEI's ``truncation_direction: left``); as many either way.
    """

    def __init__(
        self,
        template: PairTemplate,
        *,
        max_length: int = 512,
        truncation: Truncation = "longest_first",
        batch_tokens: int = 16384,
        max_batch_size: int = 256,
        dtype: Any = np.int64,
        truncation_side: TruncationSide = "right",
    ) -> None:
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.int64), np.dtype(np.int32)):
            raise ValueError(f"dtype must be int64 or int32, got {dt}")
        self.template = template
        self._compiled = _core.PairAssembler(
            list(template.pieces),
            int(template.pad_id),
            positive_int(max_length, "max_length"),
            str(truncation),
            positive_int(batch_tokens, "batch_tokens"),
            positive_int(max_batch_size, "max_batch_size"),
            dt == np.dtype(np.int32),
            str(truncation_side),
        )

    @property
    def max_length(self) -> int:
        return self._compiled.max_length

    @property
    def batch_tokens(self) -> int:
        return self._compiled.batch_tokens

    @property
    def truncation_side(self) -> TruncationSide:
        return "left" if self._compiled.truncation_side == "left" else "right"

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the reusable tensor buffers."""
        return self._compiled.buffer_bytes

    def use_pinned_memory(self, library: str = "") -> None:
        """Moves the tensor buffers to pinned host memory from the CUDA runtime (loaded at run
        time, never linked), so host-to-device copies run at full speed. Raises RuntimeError when
        no CUDA runtime can be loaded; the buffers then stay as they were."""
        self._compiled.use_pinned_memory(str(library))

    def truncate_lengths(self, query_len: int, doc_len: int) -> tuple[int, int]:
        """Tokens kept of a (query, document) pair under this batcher's truncation."""
        return self._compiled.truncate_lengths(query_len, doc_len)

    def assemble(self, query_ids: npt.ArrayLike, documents: Any) -> Assembly:
        """Assembles one query (token ids, no special tokens) against documents' token ids."""
        q = as_token_ids(query_ids, "query_ids")
        return self._result(self._compiled.assemble(q, list(documents)))

    def assemble_from_store(self, query_ids: npt.ArrayLike, store: DocStore, ids: npt.ArrayLike) -> Assembly:
        """Assembles one query against documents held in a DocStore."""
        q = as_token_ids(query_ids, "query_ids")
        return self._result(self._compiled.assemble_from_store(q, store._compiled, as_ids(ids)))

    def assemble_multi(self, queries: Any, query_index: npt.ArrayLike, documents: Any, *,
                       keep_ends: npt.ArrayLike | None = None) -> Assembly:
        """Assembles pairs whose queries differ, in one set of batches: document i is paired with
        ``queries[query_index[i]]`` (token ids, no special tokens). Truncation, longest-first order,
        budget and buffers are as in :meth:`assemble`; candidates are the documents.

        Args:
            keep_ends: Per document, whether its pair, when cut, keeps the ends of its query and
                document (left truncation) rather than the starts; None: ``truncation_side`` for
                every pair. Pairs of both sides share the batches.

        Raises:
            ValueError: ``query_index`` (or ``keep_ends``) is not one entry per document, or an
                index is outside ``[0, len(queries))``.
        """
        qs = [as_token_ids(q, f"queries[{i}]") for i, q in enumerate(queries)]
        qi = np.asarray(query_index)
        if qi.ndim != 1 or (qi.size and qi.dtype.kind not in "iu"):
            raise ValueError(f"query_index must be a 1-D sequence of integers, got {qi.ndim}-D dtype {qi.dtype}")
        if qi.dtype.kind == "u" and qi.size and int(qi.max()) >= len(qs):
            raise ValueError(f"query_index holds {int(qi.max())}; it must be in [0, {len(qs)})")
        docs = list(documents)
        ends = None
        if keep_ends is not None:
            ke = np.asarray(keep_ends)
            if ke.ndim != 1 or (ke.size and ke.dtype != np.bool_):
                raise ValueError(f"keep_ends must be a 1-D sequence of bools, got {ke.ndim}-D dtype {ke.dtype}")
            ends = np.ascontiguousarray(ke, dtype=np.uint8)
        return self._result(self._compiled.assemble_multi(qs, np.ascontiguousarray(qi, dtype=np.int64), docs, ends))

    def _result(self, raw: tuple[Any, Any, Any, Any]) -> Assembly:
        specs, order, lengths, truncated = raw
        ids_buf = self._compiled.input_ids()
        mask_buf = self._compiled.attention_mask()
        types_buf = self._compiled.token_type_ids()
        batches = []
        for row_start, rows, seq_len, offset in specs:
            end = offset + rows * seq_len
            batches.append(
                Batch(
                    rows=order[row_start : row_start + rows],
                    input_ids=ids_buf[offset:end].reshape(rows, seq_len),
                    attention_mask=mask_buf[offset:end].reshape(rows, seq_len),
                    token_type_ids=types_buf[offset:end].reshape(rows, seq_len),
                )
            )
        return Assembly(tuple(batches), order, lengths, truncated)

    def __repr__(self) -> str:
        side = "" if self.truncation_side == "right" else ", truncation_side='left'"
        return f"PairBatcher(max_length={self.max_length}, batch_tokens={self.batch_tokens}{side})"


def retrieve_and_assemble(
    index: VectorIndex,
    store: DocStore,
    batcher: PairBatcher,
    query_vector: npt.ArrayLike,
    query_ids: npt.ArrayLike,
    *,
    k: int,
    ef: int | None = None,
    allow: Any = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], Assembly]:
    """The fused first stage, in one native call with the GIL released: HNSW top-k (with
    ``allow``), gather of the hits' pre-tokenized documents, and pair assembly.

    Returns:
        ``(ids, scores, assembly)``: the hits best first (without -1 padding) and their batches;
        candidate i of the assembly is ``ids[i]``.
    """
    vec, single = as_float_matrix(query_vector, index.dim, "query_vector")
    if not single:
        raise ValueError(f"query_vector must be one vector of shape [{index.dim}], got shape {list(vec.shape)}")
    q = as_token_ids(query_ids, "query_ids")
    ids, scores, hits, raw = _core.retrieve_and_assemble(
        index._compiled,
        store._compiled,
        batcher._compiled,
        vec[0],
        q,
        positive_int(k, "k"),
        0 if ef is None else positive_int(ef, "ef"),
        _allow_list(allow),
    )
    return ids[:hits], scores[:hits], batcher._result(raw)
