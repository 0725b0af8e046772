"""Validation: a request of either dialect -> one canonical job, with every limit checked.

Rerank bodies (Cohere/Jina or TEI) become a :class:`RerankSpec`; tokenizing it gives
:class:`Pairs` (token ids per pair, the lengths the core's assembly will keep). Search bodies
become a :class:`SearchSpec`. Every string goes through the package's one string validator
(:func:`tailrank._validate.check_text`); a limit passed is a :class:`~tailrank.errors.LimitError`
(413), anything else malformed a ValueError (422), through the one error table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._validate import check_text
from ..errors import LimitError
from .errors import ServeError
from .schemas import MAX_DEADLINE_MS, CohereRerankRequest, SearchRequest, TeiRerankRequest, document_text

__all__ = ["Limits", "RerankSpec", "SearchSpec", "Pairs", "deadline_s", "rerank_spec", "search_spec",
           "tokenize_pairs", "prompt_pairs", "check_instruction"]


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request over one is refused with 413 naming the limit.

    Attributes:
        max_documents: Documents per rerank request.
        max_document_chars: Characters per document.
        max_query_chars: Characters of the query.
        max_instruction_chars: Characters of an LLM reranker's ``instruction``.
        max_request_tokens: Tokens of all of a request's pairs after truncation.
        max_body_bytes: Request body size (checked on Content-Length and while reading).
        max_queue_pairs: Pairs admitted and not yet scored, server-wide (429 beyond).
        max_pending_searches: Searches in their first stage (index walk) at once (429 beyond).
        max_k: Hits a search may ask for.
        max_candidates: First-stage candidates a search may ask for.
        max_filter_nodes: Keys, operators and values in a search filter.
    """

    max_documents: int = 1000
    max_document_chars: int = 100_000
    max_query_chars: int = 10_000
    max_instruction_chars: int = 10_000
    max_request_tokens: int = 524_288
    max_body_bytes: int = 8 << 20
    max_queue_pairs: int = 20_000
    max_pending_searches: int = 64
    max_k: int = 1000
    max_candidates: int = 1000
    max_filter_nodes: int = 256

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


def deadline_s(header_ms: float | None, body_ms: float | None, default_ms: float) -> float:
    """The request's time budget in seconds (the header wins over the body)."""
    value = body_ms if header_ms is None else header_ms
    if value is None:
        return default_ms / 1000.0
    if not (0 < value <= MAX_DEADLINE_MS) or math.isnan(value):
        raise ServeError(422, f"the deadline must be in (0, {MAX_DEADLINE_MS:.0f}] ms, got {value}", "validation")
    return float(value) / 1000.0


@dataclass(frozen=True)
class RerankSpec:
    """One rerank request, whatever its dialect."""

    query: str
    texts: list[str]
    truncate: bool  # cut pairs longer than max_length (else 413)
    left: bool  # keep the ends of over-long pairs (TEI truncation_direction=left)
    max_tokens_per_doc: int | None
    instruction: str | None = None  # an LLM reranker's task instruction (None: the template's)

    @property
    def chars(self) -> int:
        return len(self.query) + sum(len(t) for t in self.texts)


def _check_texts(query: str, texts: list[str], field_name: str, limits: Limits) -> None:
    if len(texts) > limits.max_documents:
        raise LimitError(f"{len(texts)} documents; the limit is {limits.max_documents} per request (--max-documents)")
    check_text(query, "the query", max_chars=limits.max_query_chars, hint=" (--max-query-chars)")
    for i, t in enumerate(texts):
        check_text(t, f"{field_name}[{i}]", max_chars=limits.max_document_chars,
                   hint=" per document (--max-document-chars)")


def check_instruction(instruction: str | None, limits: Limits, *, llm: bool) -> None:
    """The one check of a request's ``instruction`` field (both rerank dialects and search)."""
    if instruction is None:
        return
    if not llm:
        raise ValueError("instruction is for LLM rerankers; the served model is a sequence classifier "
                         "(no instruction slot): leave the field out")
    check_text(instruction, "instruction", max_chars=limits.max_instruction_chars, hint=" (--max-instruction-chars)")


def rerank_spec(body: CohereRerankRequest | TeiRerankRequest, limits: Limits, *, auto_truncate: bool,
                llm: bool = False) -> RerankSpec:
    """The canonical job of a rerank body; raises LimitError / ValueError. ``llm``: the served
    model is an LLM reranker (the only kind with an instruction)."""
    check_instruction(body.instruction, limits, llm=llm)
    if isinstance(body, TeiRerankRequest):
        _check_texts(body.query, body.texts, "texts", limits)
        truncate = auto_truncate if body.truncate is None else body.truncate
        left = body.truncation_direction.lower() == "left"
        if left and llm:
            raise ValueError("truncation_direction left: an LLM reranker cuts documents at their end, as its "
                             "model card does")
        return RerankSpec(body.query, list(body.texts), truncate, left, None, body.instruction)
    texts = [document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
    _check_texts(body.query, texts, "documents", limits)
    return RerankSpec(body.query, texts, True, False, body.max_tokens_per_doc, body.instruction)


@dataclass
class Pairs:
    """A request's pairs as token ids: pair i is (queries[query_index[i]], docs[i]); ``lengths``
    are its tokens after the core's truncation, special tokens included; ``keep_ends`` (None: no
    pair) marks the cut pairs that keep their ends (left truncation, done by the core's assembly)."""

    queries: list[npt.NDArray[np.int32]]
    query_index: npt.NDArray[np.int64]
    docs: list[npt.NDArray[np.int32]]
    lengths: npt.NDArray[np.int64]
    keep_ends: npt.NDArray[np.bool_] | None = None
    # LLM rerankers: each query here is a prompt key, whose prefix tokens run once per round on
    # top of the pairs' own (document + suffix) tokens in ``lengths``.
    prompt_tokens: int = 0

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum()) + self.prompt_tokens


def tokenize_pairs(model: Any, rules: Any, spec: RerankSpec, limits: Limits) -> Pairs:
    """Tokenizes a request's pairs (on a worker thread). ``rules`` is a PairBatcher of the model:
    its template and truncation rule, thread-safe."""
    if getattr(model, "kind", "encoder") == "llm":
        return _tokenize_prompts(model, spec, limits)
    (q,) = model.tokenize([spec.query])
    # Left truncation keeps the ends, which the token cache (that keeps starts) cannot give.
    docs = model.tokenize(spec.texts) if spec.left else model.document_tokens(spec.texts, q.size)
    if spec.max_tokens_per_doc is not None:
        docs = [d[: spec.max_tokens_per_doc] for d in docs]
    n_special = int(rules.template.n_special)
    body = int(model.max_length) - n_special
    raw = q.size + np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
    over = raw > body
    if over.any() and not spec.truncate:
        i = int(np.argmax(over))
        raise LimitError(f"document {i} with the query is {int(raw[i]) + n_special} tokens; the model takes at "
                         f"most {model.max_length} (send truncate: true)")
    # Only cut pairs are marked: a pair that fits is the same whichever side truncation keeps.
    keep_ends = over if spec.left and over.any() else None
    pairs = Pairs([q], np.zeros(len(docs), dtype=np.int64), docs, np.minimum(raw, body) + n_special, keep_ends)
    return _within_request_tokens(pairs, limits)


def _within_request_tokens(pairs: Pairs, limits: Limits) -> Pairs:
    if pairs.tokens > limits.max_request_tokens:
        raise LimitError(f"the request is {pairs.tokens} tokens after truncation; the limit is "
                         f"{limits.max_request_tokens} (--max-request-tokens)")
    return pairs


def prompt_pairs(model: Any, query: str, docs: list[npt.NDArray[np.int32]], instruction: str | None) -> tuple[Pairs, Any]:
    """An LLM request's pairs: one prompt key as the query, documents cut to its room; and the
    model's truncation flags."""
    pp = model.prepare_prompts(query, docs, instruction=instruction)
    return Pairs([pp.key], np.zeros(len(pp.docs), dtype=np.int64), pp.docs, pp.lengths,
                 prompt_tokens=pp.prompt_tokens), pp.truncated


def _tokenize_prompts(model: Any, spec: RerankSpec, limits: Limits) -> Pairs:
    """The LLM kind of :func:`tokenize_pairs`: documents' segment ids through the token cache."""
    docs = model.document_tokens(spec.texts, 0)
    if spec.max_tokens_per_doc is not None:
        docs = [d[: spec.max_tokens_per_doc] for d in docs]
    pairs, cut = prompt_pairs(model, spec.query, docs, spec.instruction)
    if cut.any() and not spec.truncate:
        i = int(np.argmax(cut))
        raise LimitError(f"document {i} with the query does not fit the model's {model.max_length} tokens "
                         "(send truncate: true)")
    return _within_request_tokens(pairs, limits)


@dataclass(frozen=True)
class SearchSpec:
    """One search request; ``options`` are the body's other fields, passed to the collection's
    staged search by keyword (e.g. fusion settings)."""

    query: str
    k: int
    candidates: int
    filter: dict[str, Any] | None
    rerank: bool
    options: dict[str, Any] = field(default_factory=dict)
    instruction: str | None = None


_SEARCH_FIELDS = ("query", "k", "candidates", "filter", "rerank", "deadline_ms", "instruction")


def search_spec(body: SearchRequest, limits: Limits, *, llm: bool = False) -> SearchSpec:
    """The canonical job of a search body; raises LimitError / ValueError."""
    check_text(body.query, "the query", max_chars=limits.max_query_chars, hint=" (--max-query-chars)")
    check_instruction(body.instruction, limits, llm=llm)
    if body.instruction is not None and not body.rerank:
        raise ValueError("instruction is for searches reranked by an LLM reranker (rerank is false)")
    if body.k > limits.max_k:
        raise LimitError(f"k is {body.k}; the limit is {limits.max_k} (--max-k)")
    if body.candidates > limits.max_candidates:
        raise LimitError(f"candidates is {body.candidates}; the limit is {limits.max_candidates} (--max-candidates)")
    if body.filter is not None:
        n = _filter_nodes(body.filter, "filter", 0)
        if n > limits.max_filter_nodes:
            raise LimitError(f"the filter has {n} keys and values; the limit is {limits.max_filter_nodes} "
                             "(--max-filter-nodes)")
    options = {k: v for k, v in body.model_dump(exclude_unset=True).items() if k not in _SEARCH_FIELDS}
    return SearchSpec(body.query, body.k, body.candidates, body.filter, body.rerank, options, body.instruction)


def _filter_nodes(node: Any, where: str, depth: int) -> int:
    """Keys and values of a filter (JSON), each string checked; the collection parses the rest."""
    if depth > 32:
        raise ValueError(f"{where} nests deeper than 32 levels")
    if isinstance(node, str):
        check_text(node, f"{where} value")
        return 1
    if isinstance(node, dict):
        n = 0
        for key, value in node.items():
            check_text(key, f"{where} key")
            n += 1 + _filter_nodes(value, where, depth + 1)
        return n
    if isinstance(node, list):
        return sum(_filter_nodes(x, where, depth + 1) for x in node) + 1
    return 1
