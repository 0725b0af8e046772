"""Model preparation for benchmarks: export once, optimize per precision once, both cached."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .._ort import file_fingerprint
from ..errors import ModelError

__all__ = ["fingerprint", "prepare_reranker", "prepare_precision", "PRECISIONS", "has_onnx"]

# Benchmark precision name -> tailrank.optimize precision; "fp32" is the exported model as is.
PRECISIONS = {"fp32": None, "opt-fp32": "fp32", "int8": "int8", "int8-static": "int8-static", "int8-smooth": "int8-smooth",
              "int8-openvino": "int8-openvino", "fp16": "fp16", "bf16": "bf16"}


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A short hash of every file under ``path`` (names and contents)."""
    root = Path(path)
    files = sorted(q for q in root.rglob("*") if q.is_file())
    names = "\0".join(str(q.relative_to(root)) for q in files)
    return hashlib.sha256((names + "\0" + file_fingerprint(*files)).encode()).hexdigest()[:16]


def has_onnx(d: Path) -> bool:
    """Whether ``d`` holds an ONNX graph (a model directory, not a checkpoint)."""
    return (d / "onnx" / "model.onnx").is_file() or (d / "model.onnx").is_file()


def prepare_reranker(reranker: str | os.PathLike[str], cache: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """The ONNX model directory of ``reranker`` and its Hugging Face checkpoint, if known.

    A directory with an ONNX graph is used as is (no checkpoint); a Hugging Face checkpoint is
    exported once into ``cache/<fingerprint>/fp32`` and is its own checkpoint.
    """
    src = Path(reranker)
    if not src.is_dir():
        raise ModelError(f"reranker directory not found: {src}")
    if has_onnx(src):
        return src, None
    out = Path(cache) / fingerprint(src) / "fp32"
    if not has_onnx(out):
        from ..export import export

        export(src, out, force=True)
    return out, src


def prepare_precision(
    fp32_dir: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    precision: str,
    *,
    samples: Any = None,
    threads: int | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """``tailrank optimize`` of the fp32 model at one precision, made once under ``cache``.

    The model is written even below the fidelity thresholds; the report (``fidelity.json``)
    says whether it passed. Returns (model dir, report), or (None, {"skipped": reason}) when
    optimize refuses the precision.
    """
    from ..optimize import optimize

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    target = PRECISIONS[precision]
    if target is None:
        return Path(fp32_dir), {"precision": "fp32", "reference": True}
    out = Path(cache) / fingerprint(fp32_dir) / precision
    if (out / "fidelity.json").is_file():
        return out, json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
    try:
        report = optimize(fp32_dir, out, precision=target, force=True, sample_pairs=samples, threads=threads)  # type: ignore[arg-type]
    except ModelError as e:
        return None, {"skipped": str(e)}
    return out, report
