"""``tailrank export``: a transformers sequence-classification checkpoint -> an ONNX model directory.

torch and transformers are imported only inside :func:`export` (the ``export`` extra), so the rest of
tailrank never needs them.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._ort import default_max_length
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
    "tokenizer.model",
)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts of different lengths for the parity check; shapes differ from the tracing sample on purpose
# so that a trace that froze a shape fails the check.
_CHECK_PAIRS = (
    ("what is the role of insulin?", "Insulin is a hormone that regulates glucose levels in the blood."),
    ("a", ""),
    ("protein binding", "The receptor binds the protein " * 6),
)
_TRACE_PAIRS = (("query", "a short document"), ("another query here", "document"))
TOLERANCE = 1e-4


def export(
    hf_model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    opset: int = 17,
    force: bool = False,
    tolerance: float = TOLERANCE,
) -> Path:
    """Exports a transformers sequence-classification checkpoint to ``out_dir/onnx/model.onnx``.

    The graph takes ``input_ids``, ``attention_mask`` and, where the model and its tokenizer use
    them, ``token_type_ids`` (int64, dynamic batch and sequence axes) and returns ``logits``
    [batch, num_labels]. The tokenizer and config files are copied alongside. The export is checked
    against the PyTorch forward pass with ONNX Runtime and refused if any logit differs by more
    than ``tolerance``. ``out_dir`` appears complete or not at all (written to a temporary
    directory, then renamed).

    Args:
        hf_model_dir: A directory with config.json, the weights and the tokenizer files.
        out_dir: The model directory to create; it must not exist unless ``force``.
        opset: ONNX opset (>= 17).
        force: Replace an existing ``out_dir``.
        tolerance: Largest accepted |logit difference| between ONNX Runtime and PyTorch.

    Returns:
        The output directory.

    Raises:
        ModelError: The checkpoint is missing or not a sequence classifier, the exported graph does
            not match PyTorch, or ``out_dir`` exists without ``force``.
    """
    src = Path(hf_model_dir)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src} is not a Hugging Face model directory: config.json is missing")
    if opset < 17:
        raise ModelError(f"opset must be >= 17, got {opset}")
    try:
        import torch
        import transformers
    except ImportError as e:  # the optional extra is not installed
        raise ModelError(f"tailrank export needs torch and transformers: pip install 'tailrank[export]' ({e})") from e

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call,unused-ignore]
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(src, attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {src} as a transformers sequence-classification model: {e}") from e
    model.eval()
    names = _input_names(model, tokenizer)

    class _Logits(torch.nn.Module):  # positional inputs in, a plain logits tensor out
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return self.inner(**dict(zip(names, args))).logits

    wrapper = _Logits(model).eval()  # the exporter restores the wrapper's mode: it must be eval
    max_length = min(128, default_max_length(model.config.to_dict(), {}))
    sample = _encode(tokenizer, _TRACE_PAIRS, names, max_length)

    with atomic_output_dir(out_dir, force=force) as tmp:
        onnx_path = tmp / "onnx" / "model.onnx"
        onnx_path.parent.mkdir()
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["logits"] = {0: "batch"}
        with warnings.catch_warnings():
            # The TorchScript exporter's deprecation and tracer warnings are expected here; the
            # numeric check below is what decides whether the trace is right.
            warnings.simplefilter("ignore")
            with torch.inference_mode(False), torch.no_grad():
                torch.onnx.export(
                    wrapper,
                    tuple(torch.from_numpy(sample[n]) for n in names),
                    str(onnx_path),
                    input_names=list(names),
                    output_names=["logits"],
                    dynamic_axes=axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        _check_parity(onnx_path, wrapper, tokenizer, names, max_length, tolerance)
        copy_model_files(src, tmp)
        if not (tmp / "tokenizer.json").is_file():
            # A checkpoint with only slow-tokenizer files: let transformers convert it.
            with tempfile.TemporaryDirectory() as conv:
                tokenizer.save_pretrained(conv)
                if not (Path(conv) / "tokenizer.json").is_file():
                    raise ModelError(f"the tokenizer of {src} cannot be converted to tokenizer.json")
                shutil.copy2(Path(conv) / "tokenizer.json", tmp / "tokenizer.json")
    return Path(out_dir)


def _input_names(model: Any, tokenizer: Any) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    for required in ("input_ids", "attention_mask"):
        if required not in params:
            raise ModelError(f"{type(model).__name__}.forward takes no {required}; not a text cross-encoder")
    # token_type_ids only where the model takes them and its tokenizer makes them (RoBERTa-family
    # forwards accept them but their tokenizers never produce them).
    wants_types = "token_type_ids" in params and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return tuple(n for n in _INPUTS if n != "token_type_ids" or wants_types)


def _encode(tokenizer: Any, pairs: Any, names: tuple[str, ...], max_length: int) -> dict[str, np.ndarray]:
    queries = [q for q, _ in pairs]
    docs = [d for _, d in pairs]
    enc = tokenizer(queries, docs, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    out = {}
    for n in names:
        if n == "token_type_ids" and n not in enc:
            out[n] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            out[n] = np.ascontiguousarray(enc[n], dtype=np.int64)
    return out


def _check_parity(
    onnx_path: Path, wrapper: Any, tokenizer: Any, names: tuple[str, ...], max_length: int, tolerance: float
) -> None:
    import onnxruntime as ort
    import torch

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise ModelError(f"ONNX Runtime cannot load the exported graph: {e}") from e
    worst = 0.0
    # One padded batch and each pair alone: both shapes differ from the trace's.
    for chunk in (list(_CHECK_PAIRS), *([p] for p in _CHECK_PAIRS)):
        feed = _encode(tokenizer, chunk, names, max_length)
        try:
            (got,) = session.run(["logits"], feed)
        except Exception as e:
            raise ModelError(f"the exported graph fails on a sample batch: {e}") from e
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feed[n]) for n in names)).numpy()
        if got.shape != want.shape:
            raise ModelError(f"exported graph returns shape {got.shape}, PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
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
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
