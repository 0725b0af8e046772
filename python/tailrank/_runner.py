"""Batched ONNX Runtime inference over the core's batch assembly, shared by CrossEncoder and
Embedder: the sequence and batch limits, and one thread's runner (PairBatchers per row cap with
pinned staging on CUDA, one IOBinding, a reusable CPU output buffer)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ._ort import log
from ._validate import positive_int
from .errors import ModelError
from .pairs import Assembly, Batch, PairBatcher, PairTemplate

__all__ = ["BatchRunner", "RunnerModel", "probe", "resolve_max_length", "resolve_batch_limits", "input_order_chunks"]

# (batch_tokens, max_batch_size). On the CPU small batches cost nothing in matmul efficiency
# (a MiniLM-L6 at 384 tokens ran as fast or faster at 1-2k tokens per batch than at 8-16k) and
# pad less; the CUDA numbers are untuned guesses.
_DEFAULTS = {"cpu": (2048, 64), "openvino": (2048, 64), "cuda": (65536, 256)}


def resolve_max_length(max_length: int | None, default: int, limit: int | None, n_special: int) -> int:
    """``max_length`` (``default`` when None), checked against the model's ``limit`` positions
    (None: unknown); it must leave room for text after the template's ``n_special`` tokens."""
    if max_length is None:
        n = default
    else:
        n = positive_int(max_length, "max_length")
        if limit is not None and n > limit:
            raise ValueError(f"max_length {n} exceeds the model's {limit} positions")
    if n <= n_special:
        raise ModelError(f"max_length {n} leaves no room for text after the special tokens")
    return n


def resolve_batch_limits(
    device: str, max_length: int, batch_tokens: int | None, max_batch_size: int | None
) -> tuple[int, int]:
    """``(batch_tokens, max_batch_size)``, the device's defaults where None (the token budget at
    least ``max_length``); an explicit budget below ``max_length`` raises ValueError."""
    dflt_tokens, dflt_rows = _DEFAULTS[device]
    rows = dflt_rows if max_batch_size is None else positive_int(max_batch_size, "max_batch_size")
    tokens = max(dflt_tokens, max_length) if batch_tokens is None else positive_int(batch_tokens, "batch_tokens")
    if tokens < max_length:
        raise ValueError(f"batch_tokens ({tokens}) must be >= max_length ({max_length})")
    return tokens, rows


def input_order_chunks(lengths: Sequence[int], batch_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` runs of candidates, each one padded batch within the token
    budget and row cap: scoring them in turn scores candidates in input order (for deadlines)."""
    out = []
    n, start = len(lengths), 0
    while start < n:
        end, longest = start, 0
        while end < n and end - start < max_rows:
            longest2 = max(longest, int(lengths[end]))
            if longest2 * (end - start + 1) > batch_tokens and end > start:
                break
            longest, end = longest2, end + 1
        out.append((start, end))
        start = end
    return out


class RunnerModel(Protocol):
    """What a runner reads from its model, passed to each call (the runner keeps no reference)."""

    device: str  # "cpu", "openvino" (host memory too) or "cuda"
    max_length: int
    batch_tokens: int
    max_batch_size: int
    input_names: tuple[str, ...]  # the graph's text inputs
    _template: PairTemplate
    _in_dtype: np.dtype[Any]
    _session: Any  # the onnxruntime InferenceSession
    _out_name: str
    _out_dtype: np.dtype[Any]


M = TypeVar("M", bound=RunnerModel)
R = TypeVar("R", bound="BatchRunner[Any]")


class BatchRunner(Generic[M]):
    """One thread's batchers (one per row cap), IOBinding and output buffer: nothing shared.

    It holds no reference to its model (no cycle), so the model is freed promptly and its
    runners' bindings go before its session: the model keeps the ``threading.local`` holding them
    as its first attribute (attributes are released in order). Subclasses say how large the CPU
    output buffer must be (:meth:`out_size`) and what to do with each batch's output (:meth:`run`).
    """

    _MAX_BATCHERS = 4  # distinct per-call batch sizes kept; more are rebuilt on demand

    def __init__(self, session: Any, out_dtype: np.dtype[Any]) -> None:
        self.batchers: dict[int, PairBatcher] = {}
        self.binding = session.io_binding()
        self.out = np.empty(0, dtype=out_dtype)

    @classmethod
    def of_thread(cls: type[R], local: threading.local, session: Any, out_dtype: np.dtype[Any]) -> R:
        """This thread's runner in ``local``, made on first use."""
        r: R | None = getattr(local, "runner", None)
        if r is None:
            r = cls(session, out_dtype)
            local.runner = r
        return r

    def out_size(self, o: M, max_batch_size: int) -> int:
        """Elements of the CPU output buffer that any batch of ``max_batch_size`` rows needs."""
        raise NotImplementedError

    def run(self, o: M, assembly: Assembly, out: npt.NDArray[np.float32]) -> None:
        """Runs every batch of ``assembly`` (from :meth:`batcher`) into ``out`` (one row per candidate)."""
        raise NotImplementedError

    def batcher(self, o: M, max_batch_size: int) -> PairBatcher:
        """This thread's PairBatcher for ``o`` and this row cap, with the output buffer sized for it."""
        b = self.batchers.get(max_batch_size)
        if b is None:
            if len(self.batchers) >= self._MAX_BATCHERS:
                self.batchers.clear()
            b = PairBatcher(
                o._template,
                max_length=o.max_length,
                truncation="longest_first",  # with an empty sequence A (Embedder): the text alone is cut
                batch_tokens=o.batch_tokens,
                max_batch_size=max_batch_size,
                dtype=o._in_dtype,
            )
            if o.device == "cuda":  # stage inputs in pinned host memory (checked on an H100: gpu_check.py)
                try:
                    b.use_pinned_memory()
                except RuntimeError as e:
                    log.warning("tailrank: pinned host memory unavailable (%s); staging in pageable memory", e)
            self.batchers[max_batch_size] = b
        need = self.out_size(o, max_batch_size)
        if self.out.size < need:
            self.out = np.empty(need, dtype=o._out_dtype)
        return b

    def run_batch(self, o: M, batch: Batch, out_shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """Runs one batch through ``o``'s session; returns its output of ``out_shape`` (on the CPU a
        view of the output buffer, valid until the next batch)."""
        rows, seq = batch.input_ids.shape
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in o.input_names:
            feeds["token_type_ids"] = batch.token_type_ids
        for name, arr in feeds.items():
            # Views into the batcher's buffers: contiguous, alive until its next assembly.
            self.binding.bind_input(name, "cpu", 0, o._in_dtype, (rows, seq), arr.ctypes.data)
        if o.device == "cuda":  # ORT copies the inputs to the device and the output back
            self.binding.bind_output(o._out_name, "cuda")
        else:
            self.binding.bind_output(o._out_name, "cpu", 0, o._out_dtype, out_shape, self.out.ctypes.data)
        try:
            o._session.run_with_iobinding(self.binding)
        except Exception as e:  # ORT's own exception types
            raise ModelError(f"ONNX Runtime failed on a batch of shape ({rows}, {seq}): {e}") from e
        if o.device == "cuda":
            return np.asarray(self.binding.copy_outputs_to_cpu()[0]).reshape(out_shape)
        return self.out[: math.prod(out_shape)].reshape(out_shape)

    def warm_up(self, o: M, query_len: int, width: int) -> None:
        """Runs the largest batch and a few smaller shape buckets, so that the first request
        finds ONNX Runtime's arena grown and kernels chosen. Each row is ``query_len`` tokens of
        query (0 for single texts) and a candidate; ``width`` is :meth:`run`'s output row size."""
        token = o._template.pad_id
        body = o.max_length - o._template.n_special
        batcher = self.batcher(o, o.max_batch_size)
        query = np.full(query_len, token, np.int32)
        for length in sorted({body, min(body, 128), min(body, 32)}, reverse=True):
            rows = min(o.max_batch_size, max(1, o.batch_tokens // o.max_length))
            candidates = [np.full(length - query_len, token, dtype=np.int32)] * rows
            self.run(o, batcher.assemble(query, candidates), np.empty((rows, width), np.float32))


def probe(o: RunnerModel, ids: list[int], what: str) -> npt.NDArray[Any]:
    """One plain inference (no binding) of one row of token ``ids``, all attended, token types 0:
    ``o``'s output. A failure raises ModelError naming the ``what`` probe."""
    feed = {}
    for name in o.input_names:
        arr = np.asarray([ids], dtype=o._in_dtype)
        feed[name] = arr if name == "input_ids" else (np.ones_like(arr) if name == "attention_mask" else arr * 0)
    try:
        (got,) = o._session.run([o._out_name], feed)
    except Exception as e:  # ORT's own exception types
        raise ModelError(f"the model fails on a {what} probe: {e}") from e
    out: npt.NDArray[Any] = got
    return out
