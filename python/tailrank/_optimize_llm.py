"""``tailrank optimize`` of an LLM-reranker model directory: fp16 of its three graphs (full prompt,
prefix, continuation) for the CUDA provider, behind the same fidelity gate as the encoders.

Only fp16: ONNX Runtime's transformer optimizer has no fusions for these decoder graphs (RoPE,
grouped-query attention as exported), and its int8 and OpenVINO bf16 recipes are tuned and gated
on encoders. The graphs keep float32 inputs and outputs (the KV cache between prefix and
continuation included), so the scorer runs them unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ._llm import CONTINUE_GRAPH, PREFIX_GRAPH
from .errors import ModelError
from .rerank_template import TEMPLATE_FILE

__all__ = ["optimize_llm", "LLM_PRECISIONS"]

LLM_PRECISIONS = ("fp16",)
_GRAPHS = ("model.onnx", PREFIX_GRAPH, CONTINUE_GRAPH)


def refusal(src_dir: Path, precision: str) -> str:
    """Why ``precision`` is refused for an LLM reranker, naming what works."""
    return (f"{src_dir} is an LLM reranker: tailrank optimize makes --fp16 of it (for the CUDA provider), "
            f"not {precision}; on the CPU use the exported fp32 directory as it is (prefix reuse is its speed-up)")


def optimize_llm(src_dir: Path, out_dir: str | os.PathLike[str], *, precision: str, force: bool, samples: Any,
                 min_tau: float, min_top1: float, threads: int | None, gate: Any, fidelity: Any) -> dict[str, Any]:
    """fp16 of every graph of ``src_dir`` into ``out_dir`` (atomic), checked by ``fidelity`` on the
    CPU against the fp32 directory and refused by ``gate`` below the thresholds."""
    from .export import atomic_output_dir, copy_model_files

    if precision not in LLM_PRECISIONS:
        raise ModelError(refusal(src_dir, precision))
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise ModelError(f"tailrank optimize needs onnx and onnxruntime: pip install 'tailrank[export]' ({e})") from e
    for name in _GRAPHS:
        if not (src_dir / "onnx" / name).is_file():
            raise ModelError(f"{src_dir}/onnx/{name} is missing; re-export the model with tailrank export")
    with atomic_output_dir(out_dir, force=force) as tmp:
        (tmp / "onnx").mkdir()
        for name in _GRAPHS:
            try:
                model = convert_float_to_float16(onnx.load(str(src_dir / "onnx" / name)), keep_io_types=True)
            except Exception as e:  # the converter raises whatever its passes raise
                raise ModelError(f"fp16 conversion of {name} failed: {e}") from e
            onnx.save(model, str(tmp / "onnx" / name))
        copy_model_files(src_dir, tmp)
        shutil.copy2(src_dir / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
        report = fidelity(src_dir, tmp, samples, threads=threads)
        report.update(precision=precision, graphs=list(_GRAPHS), thresholds={"kendall_tau": min_tau,
                                                                             "top1_kept": min_top1})
        gate(report, precision, min_tau, min_top1, force)
        (tmp / "fidelity.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report
