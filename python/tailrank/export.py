"""``tailrank export``: a transformers sequence-classification checkpoint (a cross-encoder) or a
sentence-transformers checkpoint (a bi-encoder) -> an ONNX model directory.

torch and transformers are imported only inside :func:`export` (the ``export`` extra), so the rest of
tailrank never needs them.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._ort import default_max_length
from .embedder import is_st_checkpoint, read_st_layout
from .errors import ModelError

__all__ = ["export", "TOKENIZER_FILES", "copy_model_files", "atomic_output_dir"]

# Files a model directory carries besides the ONNX graph (those present are copied).
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "spm.model",
    "tokenizer.model",
)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts of different lengths for the parity check; shapes differ from the tracing sample on purpose
# so that a trace that froze a shape fails the check.
# The long pair (~300 tokens) outgrows a local-attention window (ModernBERT's is 128 tokens), so
# a trace that got sliding-window masking wrong fails the check too.
_CHECK_PAIRS = (
    ("what is the role of insulin?", "Insulin is a hormone that regulates glucose levels in the blood."),
    ("a", ""),
    ("protein binding", "The receptor binds the protein " * 6),
    ("receptor", "The receptor binds the protein and the cell responds " * 30),
)
# Longest check pair: long enough for the long pair above, short enough to export quickly.
_CHECK_LENGTH = 512
_TRACE_PAIRS = (("query", "a short document"), ("another query here", "document"))
_CHECK_TEXTS = (
    "Insulin is a hormone that regulates glucose levels in the blood.",
    "",
    "The receptor binds the protein " * 6,
)
_TRACE_TEXTS = ("a short text", "another text here")
TOLERANCE = 1e-4
# sentence-transformers files copied beside the transformer's (those present).
_ST_ROOT_FILES = ("config_sentence_transformers.json",)


def export(
    hf_model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    opset: int = 17,
    force: bool = False,
    tolerance: float = TOLERANCE,
    rerank_template: str | os.PathLike[str] | None = None,
) -> Path:
    """Exports a transformers sequence-classification checkpoint, or a sentence-transformers
    checkpoint, to ``out_dir/onnx/model.onnx``.

    A sentence-transformers checkpoint (a ``modules.json`` with a Pooling module: Transformer ->
    Pooling [-> Normalize]) becomes an :class:`~tailrank.Embedder` directory: its transformer's
    ``AutoModel`` graph returns ``last_hidden_state`` [batch, sequence, hidden], and the
    sentence-transformers files (modules.json, the Pooling config, sentence_bert_config.json, the
    Normalize module) are copied beside the tokenizer so that the pooling and normalization run as
    the checkpoint says. The parity check then compares the token embeddings of real tokens.

    For a cross-encoder the graph takes ``input_ids``, ``attention_mask`` and, where the model and
    its tokenizer use them, ``token_type_ids`` (int64, dynamic batch and sequence axes) and returns
    ``logits`` [batch, num_labels]. An input the model ignores (token types of a DeBERTa with
    ``type_vocab_size`` 0) is left out of the graph by the exporter; the graph's declared inputs are
    what every later step feeds. The tokenizer and config files are copied alongside. The export
    is checked against the PyTorch forward pass with ONNX Runtime and refused if any output value
    differs by more than ``tolerance``. ``out_dir`` appears complete or not at all (written to a
    temporary directory, then renamed).

    Args:
        hf_model_dir: A directory with config.json, the weights and the tokenizer files.
        out_dir: The model directory to create; it must not exist unless ``force``.
        opset: ONNX opset (>= 17).
        force: Replace an existing ``out_dir``.
        tolerance: Largest accepted |difference| between ONNX Runtime and PyTorch (logits, or
            token embeddings).
        rerank_template: For a causal-LM checkpoint (an LLM reranker): a built-in template name
            (``"qwen3"``, ``"mxbai-v2"``, ``"bge-gemma"``) or a template JSON file. Without it a
            causal LM is exported only if its directory holds ``rerank_template.json``. See
            :mod:`tailrank.rerank_template` for the layout and the three graphs written.

    Returns:
        The output directory.

    Raises:
        ModelError: The checkpoint is missing, not a sequence classifier nor a supported
            sentence-transformers model, the exported graph does not match PyTorch, or ``out_dir``
            exists without ``force``.
    """
    src = Path(hf_model_dir)
    if opset < 17:
        raise ModelError(f"opset must be >= 17, got {opset}")
    if is_st_checkpoint(src):
        return _export_st(src, Path(out_dir), opset=opset, force=force, tolerance=tolerance)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src} is not a Hugging Face model directory: config.json is missing")
    llm = _llm_template(src, rerank_template)
    if llm is not None:
        _check_extra()
        from ._export_llm import export_llm

        with atomic_output_dir(out_dir, force=force) as tmp:
            export_llm(src, tmp, llm, opset=opset, tolerance=tolerance)
            copy_model_files(src, tmp)
            if not (tmp / "tokenizer.json").is_file():
                raise ModelError(f"{src} has no tokenizer.json; an LLM reranker needs a fast tokenizer file")
        return Path(out_dir)
    wrapper, tokenizer, names = _load_wrapped(
        "AutoModelForSequenceClassification", src, "logits", "text cross-encoder",
        f"cannot load {src} as a transformers sequence-classification model",
    )
    max_length = default_max_length(wrapper.inner.config.to_dict(), {})
    sample = _encode(tokenizer, _TRACE_PAIRS, names, min(128, max_length))

    checks = [_encode(tokenizer, chunk, names, min(_CHECK_LENGTH, max_length)) for chunk in _check_chunks(_CHECK_PAIRS)]
    with atomic_output_dir(out_dir, force=force) as tmp:
        _write_graph(tmp, wrapper, names, "logits", sample, checks, opset, tolerance, per_token=False)
        _copy_tokenizer(tokenizer, src, src, tmp)
    return Path(out_dir)


def _llm_template(src: Path, spec: str | os.PathLike[str] | None) -> Any:
    """The rerank template to export ``src`` with, or None for a sequence classifier."""
    from ._export_llm import is_causal_lm
    from .rerank_template import TEMPLATE_FILE, load_template, resolve_template

    from ._ort import read_json

    causal = is_causal_lm(read_json(src / "config.json", "config.json"))
    if spec is not None:
        if not causal:
            raise ModelError(f"--rerank-template is for causal-LM checkpoints; {src} is not one (config.json architectures)")
        return resolve_template(spec)
    if not causal:
        return None
    if (src / TEMPLATE_FILE).is_file():
        return load_template(src / TEMPLATE_FILE, corrupt=False)
    raise ModelError(
        f"{src} is a causal language model: an LLM reranker needs its prompt layout; pass "
        "--rerank-template qwen3|mxbai-v2|bge-gemma|FILE (rerank_template= in Python)"
    )


def _load_wrapped(auto_class: str, path: Path, output: str, what: str, failure: str) -> tuple[Any, Any, tuple[str, ...]]:
    """Loads the checkpoint at ``path`` with ``transformers.<auto_class>`` and its tokenizer.

    Returns ``(wrapper, tokenizer, input_names)``: the wrapper (in eval mode, the model as its
    ``inner``) takes the inputs positionally and returns the model's ``output`` tensor. Load errors
    raise ModelError(``failure: error``); ``what`` names the kind of model in input errors.
    """
    _check_extra()
    import torch
    import transformers

    try:
        model = getattr(transformers, auto_class).from_pretrained(path, attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{failure}: {e}") from e
    model.eval()
    names = _input_names(model, tokenizer, what)

    class _Output(torch.nn.Module):  # positional inputs in, one plain tensor out
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return getattr(self.inner(**dict(zip(names, args))), output)

    return _Output(model).eval(), tokenizer, names  # the exporter restores the wrapper's mode: it must be eval


def _check_extra() -> None:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:  # the optional extra is not installed
        raise ModelError(f"tailrank export needs torch and transformers: pip install 'tailrank[export]' ({e})") from e
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call,unused-ignore]


def _trace(
    wrapper: Any, names: tuple[str, ...], sample: dict[str, np.ndarray], onnx_path: Path, output: str,
    output_axes: dict[int, str], opset: int,
) -> None:
    import torch

    onnx_path.parent.mkdir()
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = output_axes
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation and tracer warnings are expected here; the
        # numeric check after it is what decides whether the trace is right.
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapper,
                tuple(torch.from_numpy(sample[n]) for n in names),
                str(onnx_path),
                input_names=list(names),
                output_names=[output],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )


def _check_chunks(items: tuple[Any, ...]) -> list[list[Any]]:
    """One padded batch and each item alone: both shapes differ from the trace's."""
    return [list(items), *([x] for x in items)]


def _write_graph(
    tmp: Path, wrapper: Any, names: tuple[str, ...], output: str, sample: dict[str, np.ndarray],
    checks: list[dict[str, np.ndarray]], opset: int, tolerance: float, *, per_token: bool,
) -> None:
    """Traces ``wrapper`` on ``sample`` to ``tmp/onnx/model.onnx``, then checks the graph against
    PyTorch on ``checks``. ``output`` is [batch, ...], or with ``per_token`` [batch, sequence, ...]
    compared on real tokens only."""
    onnx_path = tmp / "onnx" / "model.onnx"
    axes = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    _trace(wrapper, names, sample, onnx_path, output, axes, opset)
    _check_parity(onnx_path, wrapper, names, output, checks, tolerance, masked=per_token)


def _copy_tokenizer(tokenizer: Any, files: Path, src: Path, dst: Path) -> None:
    """Copies the tokenizer and config files of ``files`` (the checkpoint ``src`` or its
    transformer's directory) into ``dst``, converting a slow tokenizer to tokenizer.json."""
    copy_model_files(files, dst)
    if (dst / "tokenizer.json").is_file():
        return
    # A checkpoint with only slow-tokenizer files: let transformers convert it.
    with tempfile.TemporaryDirectory() as conv:
        tokenizer.save_pretrained(conv)
        if not (Path(conv) / "tokenizer.json").is_file():
            raise ModelError(f"the tokenizer of {src} cannot be converted to tokenizer.json")
        shutil.copy2(Path(conv) / "tokenizer.json", dst / "tokenizer.json")


def _export_st(src: Path, out_dir: Path, *, opset: int, force: bool, tolerance: float) -> Path:
    """The sentence-transformers branch of :func:`export`."""
    layout = read_st_layout(src)
    tdir = src / layout.transformer_path
    if not (tdir / "config.json").is_file():
        raise ModelError(f"the Transformer module of {src} has no config.json ({tdir})")
    wrapper, tokenizer, names = _load_wrapped(
        "AutoModel", tdir, "last_hidden_state", "text encoder",
        f"cannot load the Transformer module of {src} with transformers.AutoModel",
    )
    max_length = min(128, layout.max_seq_length or default_max_length(wrapper.inner.config.to_dict(), {}))
    sample = _encode_texts(tokenizer, _TRACE_TEXTS, names, max_length)

    checks = [_encode_texts(tokenizer, chunk, names, max_length) for chunk in _check_chunks(_CHECK_TEXTS)]
    with atomic_output_dir(out_dir, force=force) as tmp:
        _write_graph(tmp, wrapper, names, "last_hidden_state", sample, checks, opset, tolerance, per_token=True)
        _copy_tokenizer(tokenizer, tdir, src, tmp)
        _copy_st_files(src, layout, tmp)
    return out_dir


def _copy_st_files(src: Path, layout: Any, dst: Path) -> None:
    """modules.json (the transformer now at the root), sentence_bert_config.json, the Pooling
    config and the Normalize module, in the sentence-transformers layout."""
    tdir = src / layout.transformer_path
    if (tdir / "sentence_bert_config.json").is_file():
        shutil.copy2(tdir / "sentence_bert_config.json", dst / "sentence_bert_config.json")
    for name in _ST_ROOT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if layout.transformer_path:  # the transformer's files now sit at the root
        modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))
        for m in modules:
            if m.get("path", "") == layout.transformer_path and str(m.get("type", "")).endswith("Transformer"):
                m["path"] = ""
        (dst / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    else:
        shutil.copy2(src / "modules.json", dst / "modules.json")
    (dst / layout.pooling_path).mkdir(parents=True)
    shutil.copy2(src / layout.pooling_path / "config.json", dst / layout.pooling_path / "config.json")
    if layout.normalize_path is not None:
        # The module's directory is its marker (sentence-transformers' Normalize has no weights).
        (dst / layout.normalize_path).mkdir(parents=True, exist_ok=True)
        if (src / layout.normalize_path / "config.json").is_file():
            shutil.copy2(src / layout.normalize_path / "config.json", dst / layout.normalize_path / "config.json")


def _input_names(model: Any, tokenizer: Any, what: str) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    for required in ("input_ids", "attention_mask"):
        if required not in params:
            raise ModelError(f"{type(model).__name__}.forward takes no {required}; not a {what}")
    # token_type_ids only where the model takes them and its tokenizer makes them (RoBERTa-family
    # forwards accept them but their tokenizers never produce them).
    wants_types = "token_type_ids" in params and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return tuple(n for n in _INPUTS if n != "token_type_ids" or wants_types)


def _encode(tokenizer: Any, pairs: Any, names: tuple[str, ...], max_length: int) -> dict[str, np.ndarray]:
    queries = [q for q, _ in pairs]
    docs = [d for _, d in pairs]
    enc = tokenizer(queries, docs, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return _feeds(enc, names)


def _encode_texts(tokenizer: Any, texts: Any, names: tuple[str, ...], max_length: int) -> dict[str, np.ndarray]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return _feeds(enc, names)


def _feeds(enc: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        if n == "token_type_ids" and n not in enc:
            out[n] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            out[n] = np.ascontiguousarray(enc[n], dtype=np.int64)
    return out


def _check_parity(
    onnx_path: Path,
    wrapper: Any,
    names: tuple[str, ...],
    output: str,
    feeds: list[dict[str, np.ndarray]],
    tolerance: float,
    *,
    masked: bool,
) -> None:
    """Compares ONNX Runtime with PyTorch on ``feeds``; with ``masked``, only the rows of real
    tokens (attention_mask 1) of a [batch, sequence, ...] output count."""
    import onnxruntime as ort
    import torch

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise ModelError(f"ONNX Runtime cannot load the exported graph: {e}") from e
    declared = {i.name for i in session.get_inputs()}
    missing = sorted({"input_ids", "attention_mask"} - declared)
    if missing:
        raise ModelError(f"the exported graph has no {missing} input(s); it takes {sorted(declared)}")
    worst = 0.0
    for feed in feeds:
        try:
            # PyTorch gets every input below; the graph only those it declares (the exporter drops
            # inputs that do not reach the output).
            (got,) = session.run([output], {n: a for n, a in feed.items() if n in declared})
        except Exception as e:
            raise ModelError(f"the exported graph fails on a sample batch: {e}") from e
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feed[n]) for n in names)).numpy()
        if got.shape != want.shape:
            raise ModelError(f"exported graph returns shape {got.shape}, PyTorch {want.shape}")
        diff = np.abs(got.astype(np.float64) - want)
        if masked:
            diff = diff[feed["attention_mask"].astype(bool)]
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    if not worst <= tolerance:
        raise ModelError(f"exported graph differs from PyTorch by {worst:.3g} (> {tolerance:g}); export refused")


def copy_model_files(src: Path, dst: Path) -> None:
    """Copies the tokenizer and config files that ``src`` has into ``dst``."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


class atomic_output_dir:
    """Context manager: yields a temporary sibling directory that replaces ``out_dir`` on success.

    Nothing is left behind on failure; an existing ``out_dir`` is refused unless ``force``.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> None:
        self.out = Path(out_dir)
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.out.exists() and not self.force:
            raise ModelError(f"{self.out} already exists; pass --force (force=True) to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
            os.rename(self.out, old)
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        try:
            os.rename(self.tmp, self.out)
        except OSError:  # e.g. another process created out_dir meanwhile: leave nothing behind
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not self.out.exists():
                os.rename(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
