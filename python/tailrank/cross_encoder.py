"""CrossEncoder: (query, document) scoring with ONNX Runtime over the core's pair assembly."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from . import _ort
from ._ort import (
    ORT_FLOAT,
    RUNTIME_FILE,
    Priority,
    check_priority,
    default_max_length,
    file_fingerprint,
    find_onnx,
    load_session,
    position_limit,
    read_json,
    read_runtime,
    text_inputs,
)
from ._runner import BatchRunner, input_order_chunks, probe, resolve_batch_limits, resolve_max_length
from ._score_cache import CacheLookup, CacheStats, ScoreCache, pair_keys
from ._validate import as_token_ids, check_text, positive_int
from .docstore import DocStore
from ._llm import (
    LlmPrompts,
    LlmScorer,
    Prompt,
    PromptAssembly,
    PromptGroup,
    PromptPairs,
    cut_documents,
    prompt_key,
    prompt_pairs,
    split_prompt_key,
)
from .errors import CorruptFileError, ModelError
from .pairs import Assembly, PairBatcher, PairTemplate
from .rerank_template import TEMPLATE_FILE, RerankTemplate, load_template

__all__ = ["CrossEncoder"]

Activation = Literal["default", "none"]

# Documents per assembly: bounds the batcher's buffers whatever the size of one predict call.
_DOCS_PER_ASSEMBLY = 2048
_EMPTY_IDS = np.zeros(0, dtype=np.int32)
# The clock deadlines are read on (``time.monotonic``); tests put a counting clock here.
_clock = time.monotonic


class _TokenCache:
    """A thread-safe LRU map of document text -> token ids, bounded by the tokens it holds."""

    def __init__(self, max_tokens: int) -> None:
        self._max = max_tokens
        self._tokens = 0
        self._items: OrderedDict[str, npt.NDArray[np.int32]] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, texts: Sequence[str]) -> list[npt.NDArray[np.int32] | None]:
        out: list[npt.NDArray[np.int32] | None] = []
        with self._lock:
            for t in texts:
                ids = self._items.get(t)
                if ids is not None:
                    self._items.move_to_end(t)
                out.append(ids)
        return out

    def put_many(self, texts: Sequence[str], ids: Sequence[npt.NDArray[np.int32]]) -> None:
        with self._lock:
            for t, a in zip(texts, ids):
                if a.size > self._max:
                    continue
                old = self._items.pop(t, None)
                if old is not None:
                    self._tokens -= old.size
                self._items[t] = a
                self._tokens += a.size
            while self._tokens > self._max:
                _, dropped = self._items.popitem(last=False)
                self._tokens -= dropped.size

    def __len__(self) -> int:
        return len(self._items)

    @property
    def tokens(self) -> int:
        return self._tokens


class _Worker(BatchRunner["CrossEncoder"]):
    """One thread's runner for a CrossEncoder (see BatchRunner), with its logits buffer."""

    def out_size(self, o: CrossEncoder, max_batch_size: int) -> int:
        return min(max_batch_size, o.batch_tokens) * o.n_labels

    def run(
        self,
        o: CrossEncoder,
        assembly: Assembly,
        logits: npt.NDArray[np.float32],
        deadline: float | None = None,
        scored: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Scores the batches of ``assembly`` in order into ``logits`` [candidates, n_labels]
        (input order). With ``deadline`` (a ``time.monotonic()`` value) it stops before the first
        batch that would start at or after it; ``scored`` then marks the rows done."""
        for batch in assembly.batches:
            if deadline is not None and _clock() >= deadline:
                return
            logits[batch.rows] = self.run_batch(o, batch, (batch.input_ids.shape[0], o.n_labels))
            if scored is not None:
                scored[batch.rows] = True


class CrossEncoder:
    """A cross-encoder reranker on ONNX Runtime: an encoder classifier, or a decoder-only (LLM)
    reranker when the model directory holds ``rerank_template.json`` (``tailrank export
    --rerank-template``). :attr:`kind` says which.

    Pairs are tokenized once (the query once per call, documents through an LRU token cache),
    assembled by the native core into length-sorted, minimally padded batches, and scored through
    IOBinding over the core's reusable buffers. Thread-safe: each thread gets its own batcher and
    binding; the ONNX Runtime session is shared.

    Args:
        model_dir: A model directory: config.json, tokenizer.json (and its other tokenizer files)
            and the ONNX graph at ``onnx/model.onnx`` or ``model.onnx`` (see ``tailrank export``).
        device: ``"auto"`` (what the model directory's ``tailrank.json`` asks for, else CUDA when
            onnxruntime-gpu sees a GPU, else the CPU), ``"cpu"``, ``"cuda"`` or ``"openvino"``
            (the OpenVINO execution provider of the ``onnxruntime-openvino`` wheel, on the CPU:
            fp32, or bf16 for a directory made by ``tailrank optimize --bf16``). A device that is
            not available falls back to the CPU provider in fp32 with a warning.
        max_length: Longest pair in tokens, special tokens included. Default: the tokenizer's
            ``model_max_length`` capped by the model's position embeddings.
        batch_tokens: Budget per batch, rows x padded length (default on the CPU: 2048, or
            max_length if larger).
        max_batch_size: Row cap per batch (default 64 on the CPU).
        activation: ``"default"``: as sentence-transformers, the sigmoid of the logit for
            one-logit models and the softmax probability of label 1 for two-logit models.
            ``"none"``: raw logits; for two-logit models :meth:`predict` then returns both logits
            ([N, 2], as sentence-transformers) and :meth:`rank` orders by logit 1 - logit 0 (the
            log-odds of label 1, which orders as the default score does).
        threads: ONNX Runtime intra-op threads. Default: the CPUs this process may use (affinity
            mask and cgroup quota).
        cache_tokens: Capacity of the document token cache, in tokens.
        spin: Let idle ONNX Runtime threads busy-wait for work (lowest latency for a dedicated
            process); False for servers, where spinning threads starve the event loop.
        nice: Run ONNX Runtime's intra-op threads this many nice steps below the thread that
            builds the model, or ``"idle"`` for Linux's SCHED_IDLE class, below every nice value
            (Linux; 0 leaves them alone). ``tailrank serve`` uses ``"idle"`` so that its event
            loop, sharing the CPUs, answers (and refuses) requests at once while a batch is scored.
            The thread that calls :meth:`predict` runs its own share at its own priority.
        cache_bytes: Memory for a score cache (default 0: none). Pairs scored before (the same
            query and document token ids, this model and settings) return the stored logit,
            bit-identical to scoring them again, without compute; least recently used pairs are
            evicted beyond the size. See :meth:`cache_stats`.
        score_cache: A :class:`ScoreCache` to share with other models or a server (its keys hold
            each model's :attr:`score_fingerprint`, so models never read each other's scores).
            Give this or ``cache_bytes``, not both.
        prefix_reuse: LLM rerankers: run the prompt tokens before the document (system text,
            instruction, query) once per request and continue every document from their KV
            cache (default). False runs every full prompt (the same scores within 1e-4).

    An LLM reranker builds each prompt from its template (prefix, query, document, suffix; see
    :mod:`tailrank.rerank_template`), truncates the document as its model card does, and scores
    sigmoid(logit(yes) - logit(no)) at the last token (or the raw yes logit where the template
    says so). ``instruction=`` on :meth:`predict`, :meth:`rank` and :meth:`rank_ids` replaces the
    template's default instruction.

    Raises:
        ModelError: Missing or invalid files, a graph that is not a cross-encoder (logits not
            [N, 1] or [N, 2]), or a tokenizer whose vocabulary does not fit the model.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        max_length: int | None = None,
        batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        activation: Activation = "default",
        threads: int | None = None,
        cache_tokens: int = 1 << 22,
        spin: bool = True,
        nice: Priority = 0,
        cache_bytes: int = 0,
        score_cache: ScoreCache | None = None,
        prefix_reuse: bool = True,
    ) -> None:
        cache_bytes = positive_int(cache_bytes, "cache_bytes", minimum=0)
        if score_cache is not None and not isinstance(score_cache, ScoreCache):
            raise TypeError(f"score_cache must be a tailrank.ScoreCache, got {type(score_cache).__name__}")
        if score_cache is not None and cache_bytes:
            raise ValueError("give cache_bytes or score_cache, not both")
        if activation not in ("default", "none"):
            raise ValueError(f'activation must be "default" or "none", got {activation!r}')
        if threads is not None:
            positive_int(threads, "threads")
        # First attribute on purpose: attributes are released in order, so the per-thread
        # IOBindings go before the session they point into.
        self._local = threading.local()
        #: The score cache (None: off).
        self.score_cache: ScoreCache | None = None
        self.model_dir = Path(model_dir)
        self.activation: Activation = activation
        onnx_path = find_onnx(self.model_dir)
        config = read_json(self.model_dir / "config.json", "config.json")
        tok_path = self.model_dir / "tokenizer.json"
        tok_config = read_json(self.model_dir / "tokenizer_config.json", "tokenizer_config.json") if (
            self.model_dir / "tokenizer_config.json"
        ).is_file() else {}
        self._tokenizer = _load_tokenizer(tok_path)
        self.rerank_template: RerankTemplate | None = None
        #: ``"encoder"`` (a sequence classifier) or ``"llm"`` (a decoder-only reranker).
        self.kind: Literal["encoder", "llm"] = "encoder"
        self._llm: LlmScorer | None = None
        if (self.model_dir / TEMPLATE_FILE).is_file():
            self.kind = "llm"
            self.rerank_template = _read_rerank_template(self.model_dir / TEMPLATE_FILE, config)
            default = min(default_max_length(config, tok_config), self.rerank_template.max_length or 1 << 20)
            limit = position_limit(config)
            self.max_length = resolve_max_length(max_length, default, limit, 0)
            self._prompts = LlmPrompts(self.rerank_template, self._encode, self.max_length)
            bad = self._prompts.boundary_mismatches()
            if bad:
                # Prompts (and DocStore ids) would differ from the model card's one-string body.
                raise ModelError(
                    f"{TEMPLATE_FILE}: with this tokenizer the document segment does not start at a token "
                    f"boundary of the joined query/document body (e.g. documents starting {bad[0]!r}); move the "
                    "text before the slot so that it ends at a boundary (the built-in qwen3 ends it at ':' and "
                    "starts the document segment with its space)"
                )
            p = self._prompts.prompt("", None)
            # The full-prompt graph's template for the default instruction (probe, warm-up).
            self._template = _llm_pair_template(p.prefix, p.suffix, self._tokenizer)
        else:
            try:
                self._template = PairTemplate.from_tokenizer(tok_path)
            except (ValueError, KeyError, TypeError) as e:
                raise ModelError(f"cannot read the pair template from {tok_path}: {e}") from e
        self.vocab_size = _check_vocab(config, self._tokenizer, self._template, tok_path)
        if self.rerank_template is not None:
            ids = [i for i in (self.rerank_template.yes_id, self.rerank_template.no_id) if i is not None]
            if max(ids) >= self.vocab_size:
                raise CorruptFileError(f"{TEMPLATE_FILE}: answer token id {max(ids)} is outside the vocabulary")

        if self.kind == "encoder":
            self.max_length = resolve_max_length(
                max_length, default_max_length(config, tok_config), position_limit(config), self._template.n_special
            )

        runtime = read_runtime(self.model_dir)
        fallback = _ort.isa_fallback(self.model_dir, runtime, _ort.cpu_flags())
        if fallback is not None:  # tuned for an ISA this CPU lacks: the directory's portable graph
            onnx_path = self.model_dir / fallback["onnx"]
            runtime = {"device": fallback["device"], "precision": fallback["precision"]}
        #: The ONNX graph this model scores with (a tuned directory's fallback on CPUs without its ISA).
        self.onnx_path = onnx_path
        if device == "auto" and runtime.get("device", "auto") != "auto":
            device = runtime["device"]
        precision = runtime.get("precision", "fp32")
        self._session, self.device = load_session(
            onnx_path, device=device, threads=threads, spin=spin, nice=check_priority(nice), precision=precision
        )
        if self.kind == "llm" and prefix_reuse:
            prefix_graph = onnx_path.parent / "prefix.onnx"
            if not prefix_graph.is_file() or not (onnx_path.parent / "continue.onnx").is_file():
                raise ModelError(f"{onnx_path.parent} has no prefix.onnx/continue.onnx; re-export it, or pass prefix_reuse=False")
            n_layers = config.get("num_hidden_layers")
            self._llm = LlmScorer(
                onnx_path.parent,
                lambda path: load_session(path, device=self.device, threads=threads, spin=spin,
                                          nice=check_priority(nice), precision=precision)[0],
                n_layers if isinstance(n_layers, int) else None,
            )
        #: The OpenVINO provider's inference precision ("fp32" or "bf16"); None on other
        #: devices, where the graph's own types rule.
        self.inference_precision: str | None = precision if self.device == "openvino" else None
        self._read_signature(onnx_path)
        # The run-time settings change the scores (bf16 matmuls), so they are part of the identity.
        runtime_file = self.model_dir / RUNTIME_FILE
        self.fingerprint = file_fingerprint(onnx_path, tok_path, *([runtime_file] if runtime_file.is_file() else []))
        self.batch_tokens, self.max_batch_size = resolve_batch_limits(
            self.device, self.max_length, batch_tokens, max_batch_size
        )
        self._doc_cap = self.max_length - self._template.n_special + 1 if self.kind == "encoder" else self.max_length + 1
        self._cache = _TokenCache(positive_int(cache_tokens, "cache_tokens", minimum=0))
        self._probe()
        if self.kind == "llm" and self.n_labels != 1:
            raise ModelError(f"an LLM reranker's graph returns one logit per prompt, this one {self.n_labels}")
        if self.kind == "llm" and self.rerank_template is not None and self.rerank_template.score == "logit" \
                and activation == "default":
            self.activation = "none"  # the template's score is the raw answer logit
        self._worker().warm_up(self, 1, self.n_labels)  # a one-token query with each document
        if self.kind == "llm":
            self._logits_llm(" ", ["warm up"], self.max_batch_size, None)
        #: Identity of everything that decides a logit: weights, tokenizer, run-time settings,
        #: device, provider and precision, max_length and truncation. Score-cache keys hold it.
        self.score_fingerprint = _score_fingerprint(self, onnx_path)
        if score_cache is not None and score_cache.n_labels != self.n_labels:
            raise ValueError(f"score_cache holds {score_cache.n_labels} logits per pair; this model has {self.n_labels}")
        self.score_cache = score_cache
        if cache_bytes:
            self.score_cache = ScoreCache(cache_bytes, self.n_labels)

    # --- loading -----------------------------------------------------------------------------

    def _read_signature(self, onnx_path: Path) -> None:
        self.input_names, in_dtype = text_inputs(self._session, onnx_path, "cross-encoder")
        self._in_dtype = np.dtype(in_dtype)

        outputs = self._session.get_outputs()
        out = next((o for o in outputs if o.name == "logits"), outputs[0])
        if out.type not in ORT_FLOAT:
            raise ModelError(f"{onnx_path} output {out.name!r} is {out.type}; expected float logits")
        shape = list(out.shape)
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] not in (1, 2)):
            raise ModelError(
                f"{onnx_path} output {out.name!r} has shape {shape}; a cross-encoder returns logits [N, 1] or [N, 2]"
            )
        self._out_name = out.name
        self._out_dtype = np.dtype(ORT_FLOAT[out.type])
        self.n_labels = shape[1] if isinstance(shape[1], int) else 0  # 0: known after the probe

    def _probe(self) -> None:
        """One plain inference: checks the logits really are [N, 1] or [N, 2]."""
        ids = [int(t) for k, t, _ in self._template.pieces if k == 0] or [self._template.pad_id]
        got = probe(self, ids, "one-pair")
        if got.ndim != 2 or got.shape[0] != 1 or got.shape[1] not in (1, 2):
            raise ModelError(
                f"the model returned {self._out_name!r} of shape {list(got.shape)} for one pair; "
                "a cross-encoder returns logits [N, 1] or [N, 2]"
            )
        if self.n_labels and got.shape[1] != self.n_labels:
            raise ModelError(f"the model declares {self.n_labels} logits but returned {got.shape[1]}")
        self.n_labels = int(got.shape[1])

    def _worker(self) -> _Worker:
        return _Worker.of_thread(self._local, self._session, self._out_dtype)

    # --- tokenization ------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str]) -> list[npt.NDArray[np.int32]]:
        try:
            encs = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            for i, t in enumerate(texts):  # name the text the tokenizer refused
                check_text(t, f"text {i}")
            raise
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def _encode_docs(self, docs: Sequence[str]) -> list[npt.NDArray[np.int32]]:
        """Documents' ids: the text, or for an LLM reranker the template's document segment."""
        if self.rerank_template is None:
            return self._encode(docs)
        fmt = self.rerank_template.document_text
        for i, d in enumerate(docs):
            check_text(d, f"document {i}")
        return self._encode([fmt(d) for d in docs])

    def _doc_tokens(self, docs: Sequence[str], query_len: int) -> list[npt.NDArray[np.int32]]:
        """Token ids of ``docs``; cached ids are cut at max_length - specials + 1 tokens, which
        gives the same truncation as the full text whenever the query alone fits max_length."""
        if query_len >= self._doc_cap:
            return self._encode_docs(docs)  # rare: a query this long makes long documents' true length matter
        found = self._cache.get_many(docs)
        missing = list(dict.fromkeys(d for d, f in zip(docs, found) if f is None))
        if missing:
            fresh = [a[: self._doc_cap].copy() if a.size > self._doc_cap else a for a in self._encode_docs(missing)]
            self._cache.put_many(missing, fresh)
            by_text = dict(zip(missing, fresh))
            found = [f if f is not None else by_text[d] for d, f in zip(docs, found)]
        return found  # type: ignore[return-value]

    # --- scoring -----------------------------------------------------------------------------

    def _check_instruction(self, instruction: str | None) -> None:
        if instruction is None:
            return
        if self.kind != "llm":
            raise ValueError("instruction= is for LLM rerankers; this model is a sequence classifier")
        check_text(instruction, "instruction")

    def _deadline(self, deadline_ms: float | None) -> float | None:
        """The call's deadline on the deadline clock (None: none)."""
        if deadline_ms is None:
            return None
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0:
            raise ValueError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        if self.kind != "llm":
            raise ValueError("deadline_ms on CrossEncoder calls is for LLM rerankers; for a sequence classifier "
                             "use Collection.search(deadline_ms=) or score_assembly(deadline=)")
        return _clock() + float(deadline_ms) / 1000.0

    def _logits_llm(
        self, query: str, docs: Sequence[str], max_rows: int, instruction: str | None, deadline: float | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        check_text(query, "query")
        return self._llm_tokens(query, instruction, self._doc_tokens(docs, 0), max_rows, deadline)

    def _llm_tokens(
        self, query: str, instruction: str | None, docs: Sequence[npt.NDArray[np.int32]], max_rows: int,
        deadline: float | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Logits, truncation flags and the scored mask of one LLM request: the prompt's ids
        once, then the documents (ids of their segments): score-cache hits first, the misses
        through the prefix-reuse or the full-prompt path (in input order until ``deadline``)."""
        prompt = self._prompts.prompt(query, instruction)
        n = len(docs)
        logits = np.full((n, 1), np.nan, dtype=np.float32)
        truncated = np.zeros(n, dtype=bool)
        scored = np.zeros(n, dtype=bool)
        cache = self.score_cache
        key = prompt_key(prompt) if cache is not None else None
        computed = 0
        for start in range(0, n, _DOCS_PER_ASSEMBLY):
            kept, flags = cut_documents(prompt, docs[start : start + _DOCS_PER_ASSEMBLY])
            sl = slice(start, start + len(kept))
            truncated[sl] = flags
            if cache is None:
                got, done, c = self._score_prompt(prompt, kept, max_rows, deadline)
                logits[sl], scored[sl] = got, done
            else:
                # Keys: the exact ids around the slot (instruction, template, query) and the cut document.
                found = cache.lookup(pair_keys(self.score_fingerprint, [key], None, kept))  # type: ignore[list-item]
                out, done_all = found.logits.copy(), np.ones(len(kept), dtype=bool)
                c = 0
                if not found.all_hit:
                    miss = found.miss
                    got, done, c = self._score_prompt(prompt, [kept[i] for i in miss.tolist()], max_rows, deadline)
                    cache.store_misses(found, got, done)
                    out[miss], done_all[miss] = got, done
                logits[sl], scored[sl] = out, done_all
            computed += c
        self._local.tokens_computed = computed
        return logits, truncated, scored

    def _score_prompt(
        self, prompt: Prompt, docs: Sequence[npt.NDArray[np.int32]], rows: int, deadline: float | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], int]:
        """Logits [n, 1] (NaN where not scored), the scored mask and the tokens computed of
        documents cut to the prompt's room. With a deadline they go in input order, one batch
        at a time, and no batch starts at or after it (the encoder kind's rule)."""
        n = len(docs)
        logits = np.full((n, 1), np.nan, dtype=np.float32)
        scored = np.zeros(n, dtype=bool)
        reuse = self._llm is not None and prompt.suffix.size > 0 and prompt.before.size > 0
        if n == 0:
            return logits, scored, 0
        if deadline is None:
            spans = [(0, n)]
        else:
            extra = prompt.suffix.size + (0 if reuse else prompt.before.size)
            spans = input_order_chunks([d.size + extra for d in docs], self.batch_tokens, rows)
        feeds: dict[str, Any] | None = None
        computed = 0
        for a, b in spans:
            if deadline is not None and _clock() >= deadline:
                break
            if reuse:
                assert self._llm is not None
                if feeds is None:
                    feeds = self._llm.prefix(prompt.before)
                    computed += prompt.before.size
                asm = self._llm.assemble(prompt.before.size, prompt.suffix, prompt.room, docs[a:b],
                                         batch_tokens=self.batch_tokens, max_batch_size=rows)
                computed += self._llm.run_assembly(feeds, asm, logits[a:b], deadline=deadline, scored=scored[a:b],
                                                   clock=_clock)
            else:
                worker = self._worker()
                worker.batcher(self, rows)  # sizes the worker's output buffer for these rows
                asm = self._full_batcher(prompt.prefix, prompt.suffix, rows).assemble(prompt.head, docs[a:b])
                part = scored[a:b]
                worker.run(self, asm, logits[a:b], deadline, part)
                computed += sum(bt.input_ids.size for bt in asm.batches if part[bt.rows].all())
        return logits, scored, computed

    def _full_batcher(self, prefix: npt.NDArray[np.int32], suffix: npt.NDArray[np.int32], rows: int) -> PairBatcher:
        """This thread's batcher of whole prompts for one prefix and suffix (they change with the
        instruction in some templates)."""
        kept: OrderedDict[Any, PairBatcher] | None = getattr(self._local, "llm_batchers", None)
        if kept is None:
            kept = self._local.llm_batchers = OrderedDict()
        key = (prefix.tobytes(), suffix.tobytes(), rows)
        b = kept.get(key)
        if b is None:
            b = PairBatcher(_llm_pair_template(prefix, suffix, self._tokenizer), max_length=self.max_length,
                            batch_tokens=self.batch_tokens, max_batch_size=rows, dtype=self._in_dtype)
            kept[key] = b
            while len(kept) > 8:
                kept.popitem(last=False)
        return b

    def score_prompts(
        self, query: str, documents: Sequence[npt.NDArray[np.int32]], *, instruction: str | None = None,
        deadline: float | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """LLM rerankers: logits [n, 1] (NaN where not scored), truncation flags and the scored
        mask of one query against documents' ids (from :meth:`tokenize_documents`, e.g. a
        DocStore's), with prefix reuse when on and through the score cache when it is on.
        ``deadline`` (a ``time.monotonic()`` value): documents go in input order, one batch at a
        time, and no batch starts at or after it."""
        if self.kind != "llm":
            raise ValueError("score_prompts is for LLM rerankers; use score_tokens")
        self._check_instruction(instruction)
        check_text(query, "query")
        return self._llm_tokens(query, instruction, list(documents), self.max_batch_size, deadline)

    def prompt_ids(self, query: str, document: str, *, instruction: str | None = None) -> npt.NDArray[np.int32]:
        """LLM rerankers: the token ids of one (query, document) prompt as scored (cut to
        max_length), e.g. to compare a template with a model card's own code."""
        if self.kind != "llm":
            raise ValueError("prompt_ids is for LLM rerankers; this model is a sequence classifier")
        self._check_instruction(instruction)
        check_text(query, "query")
        prompt = self._prompts.prompt(query, instruction)
        (doc,), _ = cut_documents(prompt, self._encode_docs([document]))
        return np.concatenate([prompt.prefix, prompt.head, doc, prompt.suffix]).astype(np.int32)

    @property
    def tokens_computed(self) -> int:
        """LLM rerankers: the tokens this thread's last request ran through the model (the
        prefix once and the padded document rows with prefix reuse; every padded prompt without)."""
        return int(getattr(self._local, "tokens_computed", 0))

    def _logits_for_query(
        self, query: str, docs: Sequence[str], max_rows: int, instruction: str | None = None,
        deadline: float | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        self._check_instruction(instruction)
        if self.kind == "llm":
            return self._logits_llm(query, docs, max_rows, instruction, deadline)
        worker = self._worker()
        batcher = worker.batcher(self, max_rows)
        (q_ids,) = self._encode([query])
        logits = np.empty((len(docs), self.n_labels), dtype=np.float32)
        truncated = np.zeros(len(docs), dtype=bool)
        for start in range(0, len(docs), _DOCS_PER_ASSEMBLY):
            chunk = docs[start : start + _DOCS_PER_ASSEMBLY]
            tokens = self._doc_tokens(chunk, q_ids.size)
            out = logits[start : start + len(chunk)]
            if self.score_cache is not None:
                truncated[start : start + len(chunk)] = self._score_cached(batcher, q_ids, tokens, out)
                continue
            assembly = batcher.assemble(q_ids, tokens)
            worker.run(self, assembly, out)
            truncated[start : start + len(chunk)] = assembly.truncated
        return logits, truncated, np.ones(len(docs), dtype=bool)

    def _score_cached(
        self, batcher: PairBatcher, q_ids: npt.NDArray[np.int32], docs: Sequence[npt.NDArray[np.int32]],
        out: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.bool_]:
        """Logits of (q_ids, docs) into ``out``: hits from the cache, the misses assembled and
        scored together, stored, and scattered back to their rows. Returns the truncation flags."""
        found = self.lookup_scores(q_ids, docs)
        assert found is not None and self.score_cache is not None
        out[:] = found.logits
        if not found.all_hit:
            miss = found.miss
            assembly = batcher.assemble(q_ids, [docs[i] for i in miss.tolist()])
            got = np.empty((miss.size, self.n_labels), dtype=np.float32)
            self._worker().run(self, assembly, got)
            out[miss] = got
            self.score_cache.store_misses(found, got)
        return self.truncation_flags(q_ids, docs)

    def _scores(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.activation == "none":
            return logits[:, 0].copy() if self.n_labels == 1 else logits
        x = logits[:, 0] if self.n_labels == 1 else logits[:, 1] - logits[:, 0]  # softmax p1 = sigmoid(l1 - l0)
        return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)  # overflow-free sigmoid

    def _rank_scores(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.activation == "none" and self.n_labels == 2:
            return (logits[:, 1] - logits[:, 0]).astype(np.float32)
        return self._scores(logits)

    def predict(
        self, pairs: Iterable[Sequence[str]], *, batch_size: int | None = None, instruction: str | None = None,
        deadline_ms: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """Scores (query, document) pairs.

        Args:
            pairs: ``(query, document)`` string pairs; queries may differ (pairs are grouped by
                query, each query tokenized once).
            batch_size: Row cap per batch for this call (default: ``max_batch_size``).
            instruction: LLM rerankers: the task instruction (default: the template's).
            deadline_ms: LLM rerankers: budget for the call from its start. Pairs are scored in
                input order, one batch at a time, and no batch starts after the deadline; the
                pairs left unscored are NaN.

        Returns:
            float32 scores in input order: [N], or [N, 2] for two-logit models with
            ``activation="none"``.
        """
        rows = self.max_batch_size if batch_size is None else positive_int(batch_size, "batch_size")
        self._check_instruction(instruction)
        deadline = self._deadline(deadline_ms)
        items = list(pairs)
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(items):
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
                raise TypeError(f"pair {i} must be a (query, document) pair of strings, got {pair!r:.80}")
            groups.setdefault(pair[0], []).append(i)
        logits = np.empty((len(items), self.n_labels), dtype=np.float32)
        for query, idx in groups.items():
            got, _, _ = self._logits_for_query(query, [items[i][1] for i in idx], rows, instruction, deadline)
            logits[idx] = got
        return self._scores(logits)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_k: int | None = None,
        return_documents: bool = False,
        instruction: str | None = None,
        deadline_ms: float | None = None,
    ) -> list[dict[str, Any]]:
        """Ranks documents for one query, best first (ties in input order). ``instruction``: for
        LLM rerankers, the task instruction (default: the template's). ``deadline_ms``: LLM
        rerankers: budget for the call; documents are scored in input order, one batch at a
        time, no batch starting after it; the unscored follow the scored in input order, with
        ``score`` None (degraded).

        Returns:
            Dicts with ``corpus_id`` (the document's index), ``score``, ``truncated`` (whether the
            pair was cut to max_length) and, with ``return_documents``, ``text``.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        docs = list(documents)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"document {i} must be a string, got {type(d).__name__}")
        self._check_instruction(instruction)
        deadline = self._deadline(deadline_ms)
        if not docs:
            return []
        logits, truncated, scored = self._logits_for_query(query, docs, self.max_batch_size, instruction, deadline)
        scores = self._rank_scores(logits)
        out = []
        for i in _top(scores, top_k, scored):
            row: dict[str, Any] = {"corpus_id": int(i), "score": float(scores[i]) if scored[i] else None,
                                   "truncated": bool(truncated[i])}
            if return_documents:
                row["text"] = docs[i]
            out.append(row)
        return out

    def rank_ids(
        self, query: str, store: DocStore, ids: npt.ArrayLike, *, top_k: int | None = None,
        instruction: str | None = None, deadline_ms: float | None = None,
    ) -> list[dict[str, Any]]:
        """Ranks pre-tokenized documents held in a DocStore (tokenized with this model's
        tokenizer, without special tokens: :meth:`tokenize_documents`), best first.
        ``instruction``, ``deadline_ms``: for LLM rerankers, as :meth:`rank`.

        Returns:
            Dicts with ``corpus_id`` (the store id), ``score`` and ``truncated``.

        Raises:
            UnknownIdError: An id is not in the store.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if store.vocab_size > self.vocab_size:
            raise ValueError(
                f"the DocStore's vocab_size {store.vocab_size} exceeds the model's {self.vocab_size}; "
                "tokenize documents with this model's tokenizer"
            )
        self._check_instruction(instruction)
        deadline = self._deadline(deadline_ms)
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if id_arr.size == 0:
            return []
        if self.kind == "llm":
            check_text(query, "query")
            tokens = [store.get(int(i)) for i in id_arr]
            logits, truncated, scored = self._llm_tokens(query, instruction, tokens, self.max_batch_size, deadline)
            scores = self._rank_scores(logits)
            return [
                {"corpus_id": int(id_arr[i]), "score": float(scores[i]) if scored[i] else None,
                 "truncated": bool(truncated[i])}
                for i in _top(scores, top_k, scored)
            ]
        worker = self._worker()
        batcher = worker.batcher(self, self.max_batch_size)
        (q_ids,) = self._encode([query])
        logits = np.empty((id_arr.size, self.n_labels), dtype=np.float32)
        truncated = np.zeros(id_arr.size, dtype=bool)
        for start in range(0, id_arr.size, _DOCS_PER_ASSEMBLY):
            chunk = id_arr[start : start + _DOCS_PER_ASSEMBLY]
            if self.score_cache is not None:  # the keys need the documents' token ids
                tokens = [store.get(int(i)) for i in chunk]
                out = logits[start : start + chunk.size]
                truncated[start : start + chunk.size] = self._score_cached(batcher, q_ids, tokens, out)
                continue
            assembly = batcher.assemble_from_store(q_ids, store, chunk)
            worker.run(self, assembly, logits[start : start + chunk.size])
            truncated[start : start + chunk.size] = assembly.truncated
        scores = self._rank_scores(logits)
        return [
            {"corpus_id": int(id_arr[i]), "score": float(scores[i]), "truncated": bool(truncated[i])}
            for i in _top(scores, top_k)
        ]

    # --- building blocks for schedulers (the server, Collection.search) ----------------------

    def batcher(self, max_batch_size: int | None = None) -> PairBatcher:
        """This thread's PairBatcher for this model (template, max_length, token budget, input
        dtype; pinned staging on CUDA). Its buffers are reused by its next assembly."""
        self._encoder_only("batcher")
        rows = self.max_batch_size if max_batch_size is None else positive_int(max_batch_size, "max_batch_size")
        return self._worker().batcher(self, rows)

    def score_assembly(
        self, assembly: Assembly | PromptAssembly, *, deadline: float | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Runs the batches of an assembly made by this thread's :meth:`batcher`, in order.

        Args:
            assembly: From ``self.batcher().assemble*`` on this thread, before its next assembly;
                for an LLM reranker, from :meth:`assemble_prompts` (each prompt's prefix once,
                then its document batches).
            deadline: A ``time.monotonic()`` value: no batch starts at or after it.

        Returns:
            ``(logits, scored)``: float32 [candidates, n_labels] in the assembly's candidate order
            (NaN where not scored) and the bool mask of the scored candidates.
        """
        if isinstance(assembly, PromptAssembly):
            return self._score_prompt_assembly(assembly, deadline)
        self._encoder_only("score_assembly")
        n = assembly.truncated.size
        logits = np.full((n, self.n_labels), np.nan, dtype=np.float32)
        scored = np.zeros(n, dtype=bool)
        self._worker().run(self, assembly, logits, deadline, scored)
        return logits, scored

    # --- the same for LLM rerankers: a request's prompt travels as its prompt_key --------------

    def prepare_prompts(self, query: str, documents: Sequence[npt.NDArray[np.int32]], *,
                        instruction: str | None = None) -> PromptPairs:
        """LLM rerankers: one request's pairs for a scheduler (documents' ids from
        :meth:`document_tokens` or a DocStore): its prompt key, the documents cut to the room
        the prompt leaves, the tokens each pair costs after the prefix, and the truncation flags."""
        if self.kind != "llm":
            raise ValueError("prepare_prompts is for LLM rerankers")
        self._check_instruction(instruction)
        check_text(query, "query")
        return prompt_pairs(self._prompts.prompt(query, instruction), list(documents))

    def assemble_prompts(self, queries: Sequence[npt.NDArray[np.int32]], query_index: npt.ArrayLike,
                         documents: Sequence[npt.NDArray[np.int32]], *,
                         keep_ends: npt.ArrayLike | None = None) -> PromptAssembly:
        """LLM rerankers: the ``assemble_multi`` of prompts: document i goes with the prompt key
        ``queries[query_index[i]]`` (from :meth:`prepare_prompts`). Pairs are grouped by prompt,
        identical keys in one group, so that each distinct prefix runs once when
        :meth:`score_assembly` runs the assembly (on any thread)."""
        if self.kind != "llm":
            raise ValueError("assemble_prompts is for LLM rerankers; use batcher().assemble_multi")
        if keep_ends is not None and np.asarray(keep_ends, dtype=bool).any():
            raise ValueError("LLM rerankers cut documents at their end only (no left truncation)")
        index = np.asarray(query_index, dtype=np.int64).reshape(-1)
        docs = list(documents)
        if index.size != len(docs) or (index.size and (index.min() < 0 or index.max() >= len(queries))):
            raise ValueError("query_index must give one query position per document")
        group_of: dict[bytes, int] = {}
        which = np.empty(len(queries), dtype=np.int64)
        for i, q in enumerate(queries):
            which[i] = group_of.setdefault(np.asarray(q, dtype=np.int32).tobytes(), len(group_of))
        by_doc = which[index] if index.size else index
        groups = []
        for key_bytes, g in group_of.items():
            rows = np.flatnonzero(by_doc == g).astype(np.int64)
            if rows.size == 0:
                continue
            before, suffix = split_prompt_key(np.frombuffer(key_bytes, dtype=np.int32))
            room = self.max_length - before.size - suffix.size
            if room < 0:
                raise ValueError(f"a prompt of {before.size + suffix.size} tokens exceeds max_length {self.max_length}")
            part = [docs[i][:room] for i in rows.tolist()]
            if self._llm is not None and before.size and suffix.size:
                asm = self._llm.assemble(before.size, suffix, room, part, batch_tokens=self.batch_tokens,
                                         max_batch_size=self.max_batch_size)
                groups.append(PromptGroup(before, asm, rows))
            else:  # whole prompts: the prefix as the template's fixed tokens
                asm = self._full_batcher(before, suffix, self.max_batch_size).assemble(_EMPTY_IDS, part)
                groups.append(PromptGroup(None, asm, rows))
        return PromptAssembly(groups, np.zeros(len(docs), dtype=bool))

    def _score_prompt_assembly(self, assembly: PromptAssembly, deadline: float | None
                               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        n = assembly.truncated.size
        logits = np.full((n, 1), np.nan, dtype=np.float32)
        scored = np.zeros(n, dtype=bool)
        for g in assembly.groups:
            if deadline is not None and _clock() >= deadline:
                break
            out = np.full((g.rows.size, 1), np.nan, dtype=np.float32)
            done = np.zeros(g.rows.size, dtype=bool)
            if g.before is None:
                worker = self._worker()
                worker.batcher(self, self.max_batch_size)  # sizes the worker's output buffer
                worker.run(self, g.assembly, out, deadline, done)
            else:
                assert self._llm is not None
                feeds = self._llm.prefix(g.before)  # once per prompt in the assembly
                self._llm.run_assembly(feeds, g.assembly, out, deadline=deadline, scored=done, clock=_clock)
            logits[g.rows] = out
            scored[g.rows] = done
        return logits, scored

    def scores_from_logits(self, logits: npt.ArrayLike, *, raw: bool = False) -> npt.NDArray[np.float32]:
        """One ranking score per row of ``logits`` [n, n_labels]: as :meth:`rank` returns them, or
        with ``raw`` the logit (one-logit models) or logit 1 - logit 0 (two-logit models)."""
        x = np.asarray(logits, dtype=np.float32).reshape(-1, self.n_labels)
        if raw:
            return (x[:, 0] if self.n_labels == 1 else x[:, 1] - x[:, 0]).astype(np.float32)
        return self._rank_scores(x)

    def score_tokens(
        self, query_ids: npt.ArrayLike, documents: Sequence[npt.NDArray[np.int32]]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Logits [n, n_labels] and truncation flags of one query's token ids against documents'
        (no special tokens), through the score cache when it is on: only the misses are
        assembled and scored."""
        self._encoder_only("score_tokens")
        q = as_token_ids(query_ids, "query_ids")
        docs = list(documents)
        logits = np.empty((len(docs), self.n_labels), dtype=np.float32)
        if self.score_cache is not None:
            return logits, self._score_cached(self._worker().batcher(self, self.max_batch_size), q, docs, logits)
        assembly = self.batcher().assemble(q, docs)
        self._worker().run(self, assembly, logits)
        return logits, assembly.truncated

    def lookup_scores(self, query_ids: npt.NDArray[np.int32], documents: Sequence[npt.NDArray[np.int32]]
                      ) -> CacheLookup | None:
        """The score cache's logits for (query, document) token ids and its misses; None when off."""
        if self.score_cache is None:
            return None
        return self.score_cache.lookup(pair_keys(self.score_fingerprint, [query_ids], None, documents))

    def store_scores(self, found: CacheLookup, logits: npt.ArrayLike, scored: npt.ArrayLike | None = None) -> None:
        """Stores the logits of ``found``'s misses (rows in miss order; only the ``scored`` ones)."""
        if self.score_cache is not None:
            self.score_cache.store_misses(found, logits, scored)

    def truncation_flags(self, query_ids: npt.NDArray[np.int32], documents: Sequence[npt.NDArray[np.int32]]
                         ) -> npt.NDArray[np.bool_]:
        """Whether each (query, document) pair exceeds max_length, as an assembly reports it."""
        # Longest-first truncation cuts a pair iff its tokens exceed the body: a function of the
        # lengths alone, so cache hits need no assembly to know it.
        lengths = np.fromiter((d.size for d in documents), dtype=np.int64, count=len(documents))
        return np.asarray(np.asarray(query_ids).size + lengths > self.max_length - self._template.n_special)

    def cache_stats(self) -> CacheStats | None:
        """Hits, misses, evictions, entries and bytes of the score cache (None when it is off)."""
        return None if self.score_cache is None else self.score_cache.stats()

    def tokenize(self, texts: Sequence[str]) -> list[npt.NDArray[np.int32]]:
        """Token ids of ``texts`` (no special tokens, untruncated)."""
        return self._encode(list(texts))

    def document_tokens(self, documents: Sequence[str], query_len: int = 0) -> list[npt.NDArray[np.int32]]:
        """Token ids of documents through the LRU token cache (no special tokens). A document
        longer than a pair can hold is cut to ``max_length - specials + 1`` tokens, which
        truncates its pair with a query of ``query_len`` tokens exactly as the full text would
        (so "too long" stays detectable). The arrays are shared with the cache: do not modify."""
        return self._doc_tokens(list(documents), positive_int(query_len, "query_len", minimum=0))

    def tokenize_documents(self, documents: Sequence[str]) -> list[npt.NDArray[np.int32]]:
        """Token ids of documents (no special tokens, untruncated), e.g. for ``DocStore.add``;
        for an LLM reranker, the ids of each document's template segment."""
        return self._encode_docs(list(documents))

    def _encoder_only(self, what: str) -> None:
        # The schedulers batch (query, document) token pairs of an encoder's template; an LLM
        # prompt needs its prefix/suffix per request, which they do not carry yet.
        if self.kind == "llm":
            raise ModelError(f"{what}: an LLM reranker's pairs are prompts, not (query, document) token "
                             "pairs; use predict, rank, rank_ids, score_prompts or prepare_prompts/assemble_prompts")

    def __repr__(self) -> str:
        return (
            f"CrossEncoder({str(self.model_dir)!r}, device={self.device!r}, max_length={self.max_length}, "
            f"n_labels={self.n_labels}, inputs={list(self.input_names)}, dtype={self._in_dtype})"
        )


def _score_fingerprint(o: CrossEncoder, onnx_path: Path) -> bytes:
    import onnxruntime as ort

    ident = {
        "files": o.fingerprint,  # sha256 of the graph, tokenizer.json and tailrank.json (at load)
        "graph": str(onnx_path.name),
        "onnxruntime": ort.__version__,
        "providers": list(o._session.get_providers()),
        "device": o.device,
        "precision": o.inference_precision,
        "max_length": o.max_length,
        "truncation": "longest_first",
        "template": [list(p) for p in o._template.pieces] + [o._template.pad_id],
        "rerank_template": None if o.rerank_template is None else o.rerank_template.to_json(),
        "prefix_reuse": o._llm is not None,  # the two LLM paths agree within 1e-4, not bit for bit
        "n_labels": o.n_labels,
        "dtypes": [str(o._in_dtype), str(o._out_dtype)],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).digest()


def _top(scores: npt.NDArray[np.float32], top_k: int | None,
         scored: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
    """Best first (ties in input order); with ``scored``, the unscored after them in input order."""
    if scored is not None and not scored.all():
        done = np.flatnonzero(scored)
        best = done[np.argsort(-scores[done].astype(np.float64), kind="stable")]
        order = np.concatenate([best, np.flatnonzero(~scored)]).astype(np.int64)
    else:
        order = np.argsort(-scores.astype(np.float64), kind="stable")
    if top_k is not None:
        order = order[: positive_int(top_k, "top_k")]
    return order


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ModelError(f"tokenizer.json is missing: {path} (a fast tokenizer file is required)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise ModelError(f"cannot load {path}: {e}") from e
    # Truncation and padding are the core's job; the tokenizer only splits text into ids.
    tok.no_truncation()
    tok.no_padding()
    return tok


def _check_vocab(config: dict[str, Any], tokenizer: Any, template: PairTemplate, tok_path: Path) -> int:
    model_vocab = config.get("vocab_size")
    if not isinstance(model_vocab, int) or model_vocab <= 0:
        raise ModelError("config.json has no valid vocab_size")
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if tok_vocab > model_vocab:
        raise ModelError(
            f"the tokenizer ({tok_path}) has {tok_vocab} tokens but the model embeds only {model_vocab}; "
            "the tokenizer does not belong to this model"
        )
    specials = [t for k, t, _ in template.pieces if k == 0] + [template.pad_id]
    if max(specials) >= model_vocab:
        raise ModelError(f"special token id {max(specials)} is outside the model's vocabulary of {model_vocab}")
    return model_vocab


def _read_rerank_template(path: Path, config: dict[str, Any]) -> RerankTemplate:
    """The model directory's template, written by export (so every field is checked as a file's)."""
    t = load_template(path, corrupt=True)
    if t.yes_id is None or (t.score == "sigmoid" and t.no_id is None):
        raise CorruptFileError(f"{path}: the answer token ids (yes_id/no_id) are missing; re-export the model")
    return t


def _llm_pair_template(prefix: npt.NDArray[np.int32], suffix: npt.NDArray[np.int32], tokenizer: Any) -> PairTemplate:
    """Whole prompts as a pair template: the prefix, the head (sequence A), the document (B), the suffix."""
    pieces = [(0, int(t), 0) for t in prefix] + [(1, -1, 0), (2, -1, 0)] + [(0, int(t), 0) for t in suffix]
    pad = tokenizer.token_to_id("<|endoftext|>")
    if pad is None:
        pad = tokenizer.token_to_id("<pad>")
    return PairTemplate(tuple(pieces), int(pad or 0))
