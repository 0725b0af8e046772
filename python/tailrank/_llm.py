"""Scoring for decoder-only (LLM) rerankers: prompt token ids from a rerank template, truncation
as the model cards do it, and the prefix-reuse path (the tokens before the document run once per
request; every document continues from their KV cache)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import CorruptFileError, ModelError
from .pairs import Assembly, Batch, PairBatcher, PairTemplate
from .rerank_template import RerankTemplate

__all__ = ["Prompt", "LlmPrompts", "LlmScorer", "PromptGroup", "PromptPairs", "prompt_pairs", "PromptAssembly", "cut_documents", "prompt_key",
           "split_prompt_key", "PREFIX_GRAPH", "CONTINUE_GRAPH"]

PREFIX_GRAPH = "prefix.onnx"
CONTINUE_GRAPH = "continue.onnx"
_SPECIAL, _SEQ_A, _SEQ_B = 0, 1, 2
_EMPTY = np.zeros(0, dtype=np.int32)
_MAX_KEPT = 8  # per-request token ids (by instruction) and batchers (by template) kept per thread

# Document starts that a byte-level or SentencePiece tokenizer may merge with what precedes them.
_BOUNDARY_PROBES = ("word", "Word", " space", "  two", "\nline", "\tab", "(paren", ":colon", "'s", "42", "e\u0301",
                    "\u0301", "日本", "🙂", "", "-dash", ".")

Encode = Callable[[Sequence[str]], list[npt.NDArray[np.int32]]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class Prompt:
    """One request's token ids around the document slot, already cut to max_length."""

    prefix: npt.NDArray[np.int32]
    head: npt.NDArray[np.int32]  # query (and middle): after the prefix, before the document
    suffix: npt.NDArray[np.int32]
    room: int  # document tokens that fit
    head_cut: bool = False  # the query alone overflowed max_length

    @property
    def before(self) -> npt.NDArray[np.int32]:
        """Every token before the document slot: what the prefix graph runs once."""
        return np.concatenate([self.prefix, self.head])


class LlmPrompts:
    """Token ids of a template's parts for one tokenizer and max_length, as the model cards build
    them: each part tokenized alone (the head as one string when the template is ``joined``)."""

    def __init__(self, template: RerankTemplate, encode: Encode, max_length: int) -> None:
        self.template = template
        self.max_length = max_length
        self._encode = encode
        self._fixed: OrderedDict[str | None, tuple[npt.NDArray[np.int32], ...]] = OrderedDict()
        self._lock = threading.Lock()

    def _ids(self, text: str) -> npt.NDArray[np.int32]:
        return self._encode([text])[0] if text else _EMPTY

    def _parts(self, instruction: str | None) -> tuple[npt.NDArray[np.int32], ...]:
        """(prefix, middle, suffix) ids for an instruction (the texts without the query)."""
        with self._lock:
            got = self._fixed.get(instruction)
        if got is None:
            pre, _, mid, suf = self.template.texts("", instruction)
            got = (self._ids(pre), self._ids(mid), self._ids(suf))
            with self._lock:
                self._fixed[instruction] = got
                while len(self._fixed) > _MAX_KEPT:
                    self._fixed.popitem(last=False)
        return got

    def prompt(self, query: str, instruction: str | None) -> Prompt:
        """The request's prefix, head and suffix; the head is cut when it alone fills max_length
        (the document then gets no room, as a model card's right truncation of the body does)."""
        prefix, middle, suffix = self._parts(instruction)
        t = self.template
        _, q_text, mid_text, _ = t.texts(query, instruction)
        budget = self.max_length - prefix.size - suffix.size
        if budget <= 0:
            raise ModelError(
                f"max_length {self.max_length} leaves no room for text after the template's "
                f"{prefix.size + suffix.size} prompt tokens"
            )
        if t.joined:
            head = self._ids(q_text + mid_text)
        else:
            q = self._ids(q_text)
            if t.query_share is not None:  # bge: the query segment is cut to a share of the length
                q = q[: int((self.max_length - suffix.size) * t.query_share)]
            head = np.concatenate([q, middle])
        cut = head.size > budget
        head = head[:budget]
        return Prompt(prefix, head, suffix, budget - head.size, cut)

    def document(self, text: str) -> str:
        return self.template.document_text(text)

    def boundary_mismatches(self) -> list[str]:
        """For a ``joined`` template, the probe documents whose prompt ids differ from the
        one-string body's (head and document segment tokenized apart must give the body's ids:
        the slot must start at a pre-tokenizer boundary). Empty when the split is exact."""
        if not self.template.joined:
            return []
        _, q, mid, _ = self.template.texts("q", None)
        head = self._ids(q + mid).tolist()
        bad = []
        for doc in _BOUNDARY_PROBES:
            seg = self.template.document_text(doc)
            if head + self._ids(seg).tolist() != self._ids(q + mid + seg).tolist():
                bad.append(doc)
        return bad


class LlmScorer:
    """The prefix-reuse path of one LLM-reranker model directory: the prefix graph (tokens before
    the document -> KV cache) and the continuation graph (document + suffix tokens over that
    cache -> one logit), with per-thread batchers of the document+suffix rows."""

    def __init__(self, onnx_dir: Path, load: Callable[[Path], Any], n_layers: int | None) -> None:
        self.prefix_session = load(onnx_dir / PREFIX_GRAPH)
        self.continue_session = load(onnx_dir / CONTINUE_GRAPH)
        past = [i.name for i in self.continue_session.get_inputs() if i.name.startswith("past.")]
        present = [o.name for o in self.prefix_session.get_outputs()]
        if len(past) != len(present) or not past or len(past) % 2:
            raise CorruptFileError(f"{onnx_dir}: the prefix graph returns {len(present)} cache tensors, "
                                   f"the continuation graph takes {len(past)}")
        if n_layers is not None and len(past) != 2 * n_layers:
            raise CorruptFileError(f"{onnx_dir}: the graphs carry {len(past) // 2} layers' cache; config.json says {n_layers}")
        self.past_names = past
        self._local = threading.local()

    def batcher(self, suffix: npt.NDArray[np.int32], max_length: int, batch_tokens: int,
                max_batch_size: int) -> PairBatcher:
        """This thread's batcher for rows of ``document + suffix`` (right padded)."""
        key = (suffix.tobytes(), max_length, batch_tokens, max_batch_size)
        kept: OrderedDict[Any, PairBatcher] | None = getattr(self._local, "batchers", None)
        if kept is None:
            kept = self._local.batchers = OrderedDict()
        b = kept.get(key)
        if b is None:
            pieces = ((_SEQ_A, -1, 0), (_SEQ_B, -1, 0), *((_SPECIAL, int(t), 0) for t in suffix))
            b = PairBatcher(PairTemplate(pieces, 0), max_length=max_length, batch_tokens=batch_tokens,
                            max_batch_size=max_batch_size, dtype=np.int64)
            kept[key] = b
            while len(kept) > _MAX_KEPT:
                kept.popitem(last=False)
        return b

    def prefix(self, before: npt.NDArray[np.integer[Any]]) -> dict[str, Any]:
        """The KV cache of the tokens before the document slot (one run), as continuation feeds."""
        ids = np.asarray(before, dtype=np.int64)[None, :]
        try:
            presents = self.prefix_session.run(None, {"input_ids": ids})
        except Exception as e:  # ORT's own exception types
            raise ModelError(f"ONNX Runtime failed on the prompt prefix ({ids.shape[1]} tokens): {e}") from e
        return dict(zip(self.past_names, presents))

    def assemble(self, before_size: int, suffix: npt.NDArray[np.int32], room: int,
                 docs: Sequence[npt.NDArray[np.int32]], *, batch_tokens: int, max_batch_size: int) -> Assembly:
        """Batches of ``document + suffix`` rows (documents already cut to ``room``)."""
        rest = room + suffix.size
        # One spare position: the core wants room for text beyond the suffix even when the room is 0.
        batcher = self.batcher(suffix, rest + 1, max(batch_tokens, rest + 1), max_batch_size)
        return batcher.assemble(_EMPTY, list(docs))

    def run_assembly(self, feeds: dict[str, Any], assembly: Assembly, out: npt.NDArray[np.float32], *,
                     deadline: float | None = None, scored: npt.NDArray[np.bool_] | None = None,
                     clock: Clock = time.monotonic) -> int:
        """Logits of an assembly's rows into ``out`` over the prefix cache in ``feeds``; no batch
        starts at or after ``deadline`` (``scored`` marks the rows done). Returns padded tokens run."""
        feeds = dict(feeds)
        computed = 0
        for batch in assembly.batches:
            if deadline is not None and clock() >= deadline:
                break
            feeds["input_ids"] = batch.input_ids
            feeds["attention_mask"] = batch.attention_mask
            try:
                (got,) = self.continue_session.run(["logits"], feeds)
            except Exception as e:
                raise ModelError(f"ONNX Runtime failed on a batch of shape {batch.input_ids.shape}: {e}") from e
            out[batch.rows] = got
            if scored is not None:
                scored[batch.rows] = True
            computed += batch.input_ids.size
        return computed

    def run(self, prompt: Prompt, docs: Sequence[npt.NDArray[np.int32]], out: npt.NDArray[np.float32], *,
            batch_tokens: int, max_batch_size: int) -> int:
        """Logits [len(docs), 1] into ``out``: the prefix once, then each batch of documents
        (already cut to ``prompt.room``) with the suffix, over the prefix's cache. Returns the
        tokens run through the model: the prefix once plus the padded document+suffix rows."""
        feeds = self.prefix(prompt.before)
        assembly = self.assemble(prompt.before.size, prompt.suffix, prompt.room, docs, batch_tokens=batch_tokens,
                                 max_batch_size=max_batch_size)
        return prompt.before.size + self.run_assembly(feeds, assembly, out)


def cut_documents(prompt: Prompt, docs: Sequence[npt.NDArray[np.int32]]
                  ) -> tuple[list[npt.NDArray[np.int32]], npt.NDArray[np.bool_]]:
    """Documents cut to the room the prompt leaves, and whether each was cut (head cuts count)."""
    room = prompt.room
    kept = [d[:room] if d.size > room else d for d in docs]
    flags = np.fromiter((prompt.head_cut or d.size > room for d in docs), dtype=bool, count=len(docs))
    return kept, flags


# The schedulers (the server's rounds, the score cache's keys) carry one int32 array per query. For
# an LLM request it is the prompt around the document slot, ``before + [-1] + suffix`` (ids are
# >= 0, so the split is unambiguous): everything besides the document that decides the logit.
_KEY_SEP = np.array([-1], dtype=np.int32)


def prompt_key(prompt: Prompt) -> npt.NDArray[np.int32]:
    """The prompt's ids around the document slot as one array (see ``split_prompt_key``)."""
    return np.concatenate([prompt.before.astype(np.int32), _KEY_SEP, prompt.suffix.astype(np.int32)])


def split_prompt_key(key: npt.NDArray[np.int32]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """``(before, suffix)`` of a :func:`prompt_key` array."""
    k = np.asarray(key, dtype=np.int32)
    sep = np.flatnonzero(k < 0)
    if sep.size != 1:
        raise ValueError("not a prompt key: it must hold exactly one -1 separator")
    return k[: sep[0]], k[sep[0] + 1 :]


@dataclass(frozen=True)
class PromptPairs:
    """One LLM request's pairs as a scheduler carries them: the :func:`prompt_key`, the documents
    cut to the prompt's room, each pair's tokens after the prefix (document + suffix), the
    prefix tokens run once, and which pairs were cut."""

    key: npt.NDArray[np.int32]
    docs: list[npt.NDArray[np.int32]]
    lengths: npt.NDArray[np.int64]
    prompt_tokens: int
    truncated: npt.NDArray[np.bool_]


def prompt_pairs(prompt: Prompt, docs: Sequence[npt.NDArray[np.int32]]) -> PromptPairs:
    kept, flags = cut_documents(prompt, docs)
    lengths = np.fromiter((d.size + prompt.suffix.size for d in kept), dtype=np.int64, count=len(kept))
    return PromptPairs(prompt_key(prompt), kept, lengths, int(prompt.before.size), flags)


@dataclass
class PromptGroup:
    """The documents of one prompt inside a :class:`PromptAssembly`: ``rows`` are their positions
    in the assembly's candidate order; ``before`` is None on the full-prompt path (its assembly
    holds whole prompts)."""

    before: npt.NDArray[np.int32] | None
    assembly: Assembly
    rows: npt.NDArray[np.int64]


@dataclass
class PromptAssembly:
    """Pairs of several LLM prompts (a server round, one request's chunk), grouped by prompt:
    each group's prefix runs once, then its document batches over that cache."""

    groups: list[PromptGroup]
    truncated: npt.NDArray[np.bool_]

    @property
    def batches(self) -> list[Batch]:
        return [b for g in self.groups for b in g.assembly.batches]

    @property
    def real_tokens(self) -> int:
        """Tokens computed when every batch runs: each prefix once plus the real document rows."""
        return int(sum((0 if g.before is None else g.before.size) + g.assembly.real_tokens for g in self.groups))

    @property
    def padded_tokens(self) -> int:
        return int(sum((0 if g.before is None else g.before.size) + g.assembly.padded_tokens for g in self.groups))
