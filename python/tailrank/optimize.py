"""``tailrank optimize``: ONNX Runtime transformer fusions and a lower precision, gated by fidelity.

The optimized model is scored against the fp32 model on sample pairs; below the thresholds
(Kendall tau, top-1 kept) nothing is written unless ``force``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._ort import RUNTIME_FILE, find_onnx, openvino_available, read_json
from .errors import ModelError
from .export import atomic_output_dir, copy_model_files

__all__ = ["optimize", "fidelity", "FidelityError", "builtin_sample_pairs", "Precision", "PRECISIONS"]

Precision = Literal["fp32", "int8", "int8-static", "int8-smooth", "int8-openvino", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "int8-static", "int8-smooth", "int8-openvino", "fp16", "bf16")
SampleSet = list[tuple[str, list[str]]]  # (query, documents)


class FidelityError(ModelError):
    """The optimized model ranks too differently from the fp32 model; ``report`` says how."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def optimize(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: Precision = "fp32",
    force: bool = False,
    sample_pairs: str | os.PathLike[str] | SampleSet | None = None,
    min_tau: float = 0.95,
    min_top1: float = 0.95,
    threads: int | None = None,
) -> dict[str, Any]:
    """Fuses (and optionally quantizes or converts) a model directory into ``out_dir``.

    Args:
        model_dir: A model directory made by ``tailrank export`` (fp32).
        out_dir: The directory to create: ``onnx/model.onnx``, the tokenizer and config files and
            ``fidelity.json``. Written atomically; nothing is written when refused.
        precision: ``"fp32"`` (fusions only), ``"int8"`` (int8 weights per block, MatMulNBits),
            ``"int8-static"`` (static int8: weights per channel, activation scales calibrated on
            ``sample_pairs``, which should be pairs from the user's own corpus; see
            :func:`_quantize_static`),
            ``"int8-smooth"`` (int8 weights per column, activations int8 per token at run time,
            VNNI kernels, after SmoothQuant-style smoothing calibrated on every other query of
            ``sample_pairs`` and gated on the others; see :mod:`tailrank._int8`),
            ``"int8-openvino"`` (NNCF's static int8 for OpenVINO's int8 kernels, calibrated on every
            other query of ``sample_pairs`` and gated on the others, run on the OpenVINO execution
            provider with bf16 elsewhere where the CPU has it; see :func:`_quantize_nncf`),
            ``"fp16"`` (float32 inputs and outputs kept) or ``"bf16"`` (the fp32 graph with a
            ``tailrank.json`` that runs it on the OpenVINO execution provider with bf16 matmuls;
            refused without onnxruntime-openvino, as ONNX Runtime's CPU provider has no bf16 kernels).
        force: Write even below the thresholds (and replace an existing ``out_dir``).
        sample_pairs: JSONL path of ``{"query": ..., "documents": [...]}`` lines, or a list of
            ``(query, documents)``; default: pairs generated from the tokenizer's vocabulary.
        min_tau: Least mean per-query Kendall tau vs fp32.
        min_top1: Least share of queries whose fp32 top document stays first.
        threads: ONNX Runtime intra-op threads for the fidelity check.

    Returns:
        The fidelity report (also written as ``fidelity.json``).

    Raises:
        FidelityError: Below the thresholds without ``force`` (nothing written).
        ModelError: Missing files, an unsupported precision, or a failing tool.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    src_dir = Path(model_dir)
    src = find_onnx(src_dir)
    if (src_dir / "rerank_template.json").is_file():  # an LLM reranker: its own recipe (fp16 only)
        from ._optimize_llm import optimize_llm

        return optimize_llm(src_dir, out_dir, precision=precision, force=force,
                            samples=_load_samples(sample_pairs, src_dir), min_tau=min_tau, min_top1=min_top1,
                            threads=threads, gate=_gate, fidelity=fidelity)
    config = read_json(src_dir / "config.json", "config.json")
    if precision in ("bf16", "int8-openvino") and not openvino_available():
        raise ModelError(_openvino_refusal(precision))
    samples = _load_samples(sample_pairs, src_dir)
    if precision == "int8-openvino":
        return _optimize_openvino_int8(src, src_dir, out_dir, samples, force, min_tau, min_top1, threads)

    if precision == "bf16":
        # The fp32 graph as it is (OpenVINO fuses it itself; ORT's contrib fusions are not its
        # ops) and a run-time setting that asks OpenVINO for bf16 matmuls.
        with atomic_output_dir(out_dir, force=force) as tmp:
            (tmp / "onnx").mkdir()
            shutil.copy2(src, tmp / "onnx" / "model.onnx")
            copy_model_files(src_dir, tmp)
            (tmp / RUNTIME_FILE).write_text(json.dumps({"device": "openvino", "precision": "bf16"}) + "\n",
                                            encoding="utf-8")
            report = fidelity(src_dir, tmp, samples, threads=threads, candidate_device="openvino")
            report.update(precision=precision, runtime={"device": "openvino", "precision": "bf16"},
                          thresholds={"kendall_tau": min_tau, "top1_kept": min_top1})
            _gate(report, precision, min_tau, min_top1, force)
            (tmp / "fidelity.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return report

    with atomic_output_dir(out_dir, force=force) as tmp:
        (tmp / "onnx").mkdir()
        target = tmp / "onnx" / "model.onnx"
        fused = _fuse(src, config)
        if precision == "fp16":
            fused.convert_float_to_float16(keep_io_types=True)
        gate_samples = samples
        if precision in ("int8", "int8-static", "int8-smooth"):
            with tempfile.TemporaryDirectory() as scratch:
                fused_path = Path(scratch) / "fused.onnx"
                fused.save_model_to_file(str(fused_path))
                if precision == "int8":
                    _quantize_int8(fused_path, target)
                elif precision == "int8-static":
                    _quantize_static(fused_path, target, src_dir, samples)
                else:
                    calibration, gate_samples = _split_calibration(samples)
                    _quantize_smooth(fused_path, target, src_dir, calibration, threads)
        else:
            fused.save_model_to_file(str(target))
        copy_model_files(src_dir, tmp)
        report = fidelity(src_dir, tmp, gate_samples, threads=threads)
        if precision == "int8-smooth":
            report["calibration"] = {"queries": len(samples) - len(gate_samples),
                                     "pairs": sum(len(d) for _, d in samples) - report["pairs"],
                                     "alpha": _SMOOTH_ALPHA, "gated_on_other_queries": gate_samples is not samples}
        report.update(
            precision=precision,
            fused_operators={k: v for k, v in fused.get_fused_operator_statistics().items() if v},
            thresholds={"kendall_tau": min_tau, "top1_kept": min_top1},
        )
        _gate(report, precision, min_tau, min_top1, force)
        (tmp / "fidelity.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _gate(report: dict[str, Any], precision: str, min_tau: float, min_top1: float, force: bool) -> None:
    """Marks ``report`` passed or not; raises FidelityError below the thresholds unless ``force``."""
    passed = report["kendall_tau"] >= min_tau and report["top1_kept"] >= min_top1
    report["passed"] = bool(passed)
    if not passed and not force:
        raise FidelityError(
            f"{precision} model below the fidelity thresholds (Kendall tau {report['kendall_tau']:.4f} vs "
            f">= {min_tau}, top-1 kept {report['top1_kept']:.3f} vs >= {min_top1}); nothing written "
            "(pass --force to write it anyway)",
            report,
        )


def _fuse(src: Path, config: dict[str, Any]) -> Any:
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:
        raise ModelError(f"tailrank optimize needs onnx and onnxruntime: pip install 'tailrank[export]' ({e})") from e
    heads = config.get("num_attention_heads", config.get("n_heads", 0))
    hidden = config.get("hidden_size", config.get("dim", 0))
    try:
        # model_type "bert" covers the encoder families we export (BERT, DistilBERT, ELECTRA,
        # RoBERTa, XLM-R): the fusion patterns are the same. ONNX Runtime has no optimizer for
        # DeBERTa (disentangled attention) or ModernBERT (RoPE, local windows): on their graphs
        # the attention pattern does not match and only the generic fusions apply (SkipLayerNorm,
        # LayerNorm, Gelu), which the fidelity check below verifies like any other.
        return optimize_model(str(src), model_type="bert", num_heads=int(heads), hidden_size=int(hidden))
    except Exception as e:  # the optimizer raises whatever its passes raise
        raise ModelError(f"ONNX Runtime's transformer optimizer failed on {src}: {e}") from e


# Weight blocks along K for the int8 MatMulNBits kernels. Their accuracy level 4 quantizes the
# activations to int8 per row and block as well, which is what keeps rankings: ``quantize_dynamic``
# quantizes a whole batch's activations with one scale, and on a MiniLM-L6 cross-encoder (SciFact)
# that dropped the mean Kendall tau vs fp32 to ~0.89 (0.95 with the FFN outputs kept fp32).
_INT8_BLOCK = 128


def _quantize_int8(src: Path, dst: Path) -> None:
    """Weight-only int8 (symmetric, per output column and block of ``_INT8_BLOCK`` rows) for every
    MatMul with a constant weight, as ``com.microsoft.MatMulNBits`` (bits=8, accuracy_level=4: int8
    compute with per-block activation scales). The fused Attention's QKV projection stays fp32:
    quantizing it (QAttention, per-tensor activations) cost more fidelity than the rest together."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise ModelError(f"tailrank optimize needs onnx: pip install 'tailrank[export]' ({e})") from e
    try:
        model = onnx.load(str(src))
        weights = {t.name: t for t in model.graph.initializer}
        users: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                users[i] = users.get(i, 0) + 1
        nodes, replaced = [], set()
        for n in model.graph.node:
            w = weights.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
            arr = numpy_helper.to_array(w) if w is not None else None
            if arr is None or arr.ndim != 2 or arr.dtype != np.float32 or users.get(n.input[1], 0) != 1:
                nodes.append(n)
                continue
            k, cols = arr.shape
            blocks = -(-k // _INT8_BLOCK)
            wt = np.pad(arr.T, ((0, 0), (0, blocks * _INT8_BLOCK - k))).reshape(cols, blocks, _INT8_BLOCK)
            scale = np.abs(wt).max(axis=2) / 127.0
            scale[scale == 0] = 1.0
            q = (np.clip(np.round(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)  # zero point 128
            qname, sname = n.input[1] + "_int8", n.input[1] + "_int8_scale"
            model.graph.initializer.extend([
                numpy_helper.from_array(q, qname),
                numpy_helper.from_array(scale.astype(np.float32).reshape(-1), sname),
            ])
            replaced.add(n.input[1])
            nodes.append(helper.make_node(
                "MatMulNBits", [n.input[0], qname, sname], list(n.output), name=(n.name or qname) + "_int8",
                domain="com.microsoft", K=k, N=cols, bits=8, block_size=_INT8_BLOCK, accuracy_level=4,
            ))
        if not replaced:
            raise ModelError(f"{src} has no MatMul with a constant float weight to quantize")
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        kept = [t for t in model.graph.initializer if t.name not in replaced]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        onnx.save(model, str(dst))
    except ModelError:
        raise
    except Exception as e:  # onnx raises whatever its checks raise
        raise ModelError(f"int8 quantization failed: {e}") from e


# Static int8 (QDQ) of the fused graph: only the MatMuls with constant weights go int8 (the
# attention output projection and the FFN), so LayerNorm (SkipLayerNorm), Softmax, residual Adds,
# GELU and the fused Attention (its QKV projection and the probabilities x V product) stay fp32.
# Not a kept recipe: on the SciFact cross-encoder (10 held-out claims x 50) it kept a mean Kendall
# tau of 0.65 (top-1 0.4); with the unfused graph's QKV projections quantized too, 0.64. Static
# per-tensor activation scales are the loss; `optimize` refuses it below the gate like any other.
_STATIC_BATCH = 16
_STATIC_FORMAT = "qdq"
_STATIC_PER_CHANNEL = True


def _calibration_feeds(model_dir: Path, onnx_path: Path, samples: SampleSet) -> list[dict[str, Any]]:
    """The sample pairs as the graph's inputs, batches of ``_STATIC_BATCH`` padded to their longest."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from ._ort import default_max_length

    config = read_json(model_dir / "config.json", "config.json")
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path, "tokenizer_config.json") if tok_cfg_path.is_file() else {}
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(default_max_length(config, tok_cfg), strategy="longest_first")
    tok.enable_padding()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: (np.int64 if i.type == "tensor(int64)" else np.int32) for i in sess.get_inputs()}
    feeds = []
    pairs = [(q, d) for q, docs in samples for d in docs]
    for s in range(0, len(pairs), _STATIC_BATCH):
        enc = tok.encode_batch(pairs[s : s + _STATIC_BATCH])
        cols = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}
        feeds.append({name: np.asarray(cols[name], dtype=dtype) for name, dtype in inputs.items()})
    return feeds


def _quantize_static(src: Path, dst: Path, model_dir: Path, samples: SampleSet) -> None:
    """Static int8 of ``src`` (a fused graph): int8 weights per output channel, uint8 activations
    with scales from a MinMax calibration over ``samples`` (their pairs as the model sees them)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as e:
        raise ModelError(f"tailrank optimize needs onnxruntime's quantization tools and onnx ({e})") from e
    feeds = _calibration_feeds(model_dir, src, samples)

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    kwargs: dict[str, Any] = {"calibration_providers": ["CPUExecutionProvider"]} if _accepts_providers(quantize_static) else {}
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # Types and shapes of every tensor (symbolic inference knows the contrib ops of the fused
        # graph): without them the quantizer skips the MatMuls whose inputs it cannot type.
        typed = src.with_name("typed.onnx")
        quant_pre_process(str(src), str(typed), skip_optimization=True, skip_onnx_shape=False, skip_symbolic_shape=False)
        quantize_static(
            str(typed), str(dst), _Reader(), quant_format=QuantFormat.QDQ if _STATIC_FORMAT == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=["MatMul"], per_channel=_STATIC_PER_CHANNEL, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, **kwargs,
        )
    except Exception as e:  # the quantizer raises whatever its passes raise
        raise ModelError(f"static int8 quantization failed: {e}") from e


# SmoothQuant's migration strength for --int8-smooth (see benchmarks/README.md for the sweep).
_SMOOTH_ALPHA = 0.5


def _split_calibration(samples: SampleSet) -> tuple[SampleSet, SampleSet]:
    """(calibration, gate): every other query each, so the gate judges queries the scales never
    saw; a single query serves as both (its report says so)."""
    if len(samples) < 2:
        return samples, samples
    return samples[0::2], samples[1::2]


def _quantize_smooth(src: Path, dst: Path, model_dir: Path, samples: SampleSet, threads: int | None) -> None:
    """Smoothing calibrated on ``samples`` (their pairs as the model sees them), then int8 with
    per-token activation scales of every weight MatMul of the fused graph ``src``
    (:func:`tailrank._int8.smooth_quantize_dynamic`). Per-tensor scales (DynamicQuantizeMatMul)
    are a little faster but lose the ranking on FFN2's inputs (benchmarks/README.md)."""
    try:
        import onnx

        from . import _int8
    except ImportError as e:
        raise ModelError(f"tailrank optimize needs onnx: pip install 'tailrank[export]' ({e})") from e
    try:
        model = onnx.load(str(src))
        ranges = _int8.matmul_input_ranges(model, _calibration_feeds(model_dir, src, samples), threads)
        if not _int8.smooth_quantize_dynamic(model, ranges, alpha=_SMOOTH_ALPHA, per_token=True):
            raise ModelError(f"{src} has no MatMul with a constant float weight to quantize")
        onnx.save(model, str(dst))
    except ModelError:
        raise
    except Exception as e:  # onnx and onnxruntime raise whatever their checks raise
        raise ModelError(f"int8-smooth quantization failed: {e}") from e


def _accepts_providers(fn: Any) -> bool:
    import inspect

    return "calibration_providers" in inspect.signature(fn).parameters


def _openvino_refusal(precision: str) -> str:
    import onnxruntime as ort

    what = ("bf16 matmuls on CPUs with AVX512-BF16 or AMX" if precision == "bf16" else
            "OpenVINO's int8 kernels; NNCF, from the openvino extra, quantizes the graph")
    return (
        f"--{precision} runs on ONNX Runtime's OpenVINO execution provider ({what}): install "
        f"onnxruntime-openvino in place of onnxruntime (this onnxruntime {ort.__version__} has "
        f"{ort.get_available_providers()}, and its CPU provider has no bfloat16 kernels); or use --int8-smooth"
    )


def _optimize_openvino_int8(src: Path, src_dir: Path, out_dir: str | os.PathLike[str], samples: SampleSet, force: bool,
                            min_tau: float, min_top1: float, threads: int | None) -> dict[str, Any]:
    """``--int8-openvino``: the exported graph quantized by NNCF on half the sample queries, gated
    on the other half on the OpenVINO provider (bf16 for the ops left in float where the CPU has it)."""
    from ._ort import ISA_FLAGS, cpu_flags

    calibration, gate_samples = _split_calibration(samples)
    rest = "bf16" if cpu_flags() & set(ISA_FLAGS["bf16"]) else "fp32"
    runtime = {"device": "openvino", "precision": rest, "requires_cpu_flags": list(ISA_FLAGS["int8"])}
    with atomic_output_dir(out_dir, force=force) as tmp:
        (tmp / "onnx").mkdir()
        ignored = _quantize_nncf(src, tmp / "onnx" / "model.onnx", src_dir, calibration)
        copy_model_files(src_dir, tmp)
        (tmp / RUNTIME_FILE).write_text(json.dumps(runtime) + "\n", encoding="utf-8")
        report = fidelity(src_dir, tmp, gate_samples, threads=threads, candidate_device="openvino")
        report.update(precision="int8-openvino", runtime=runtime,
                      thresholds={"kendall_tau": min_tau, "top1_kept": min_top1},
                      calibration={"queries": len(samples) - len(gate_samples),
                                   "pairs": sum(len(d) for _, d in calibration),
                                   "gated_on_other_queries": gate_samples is not samples,
                                   "kept_in_float": ignored})
        _gate(report, "int8-openvino", min_tau, min_top1, force)
        (tmp / "fidelity.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


_GELU_OPS = frozenset({"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh"})


def _nncf_ignored(model: Any) -> list[str]:
    """The FFN down-projections (weight MatMuls fed by a GELU within a few nodes), which
    --int8-openvino leaves in float: their inputs' outlier channels are where static int8 loses
    the ranking (benchmarks/README.md has both variants' fidelity)."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for n in graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2 or n.input[1] not in weights:
            continue
        frontier, seen = [n.input[0]], 0
        while frontier and seen < 8:  # a GELU is a few elementwise nodes up at most
            p = producer.get(frontier.pop(0))
            seen += 1
            if p is None:
                continue
            if p.op_type in _GELU_OPS:
                out.append(n.name)
                break
            if p.op_type in ("Mul", "Add", "Div", "Cast", "Reshape"):
                frontier.extend(p.input)
    return out


def _quantize_nncf(src: Path, dst: Path, model_dir: Path, samples: SampleSet) -> list[str]:
    """Static int8 by NNCF's ONNX backend with its transformer preset (SmoothQuant, int8 weights per
    channel, activation ranges over ``samples`` as the model sees them): a QDQ graph that OpenVINO
    runs on its int8 kernels. Returns the MatMuls it left in float."""
    try:
        import nncf
        import onnx
    except ImportError as e:
        raise ModelError(f"--int8-openvino needs nncf and onnx: pip install 'tailrank[openvino,export]' ({e})") from e
    try:
        model = onnx.load(str(src))
        ignored = _nncf_ignored(model)
        feeds = _calibration_feeds(model_dir, src, samples)
        kwargs: dict[str, Any] = {"ignored_scope": nncf.IgnoredScope(names=ignored)} if ignored else {}
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                                  model_type=nncf.ModelType.TRANSFORMER, **kwargs)
        onnx.save(quantized, str(dst))
    except Exception as e:  # NNCF and onnx raise whatever their passes raise
        raise ModelError(f"int8-openvino quantization failed: {e}") from e
    return ignored


# --- fidelity -------------------------------------------------------------------------------


def fidelity(
    reference_dir: str | os.PathLike[str],
    candidate_dir: str | os.PathLike[str],
    samples: SampleSet,
    *,
    threads: int | None = None,
    candidate_device: str = "cpu",
) -> dict[str, Any]:
    """Compares a candidate model's logits and per-query rankings with the reference model's (the
    reference on the CPU provider, the candidate on ``candidate_device``).

    Returns:
        ``max_abs_logit_diff``, ``kendall_tau`` (mean over queries; ``kendall_tau_min``),
        ``top10_overlap`` (mean share of the fp32 top 10 kept), ``top1_kept`` (share of queries),
        ``queries`` and ``pairs``.
    """
    from .cross_encoder import CrossEncoder

    ref = CrossEncoder(reference_dir, activation="none", device="cpu", threads=threads)
    cand = CrossEncoder(candidate_dir, activation="none", device=candidate_device, threads=threads)
    if cand.device != candidate_device:
        raise ModelError(f"the fidelity check needs the {candidate_device} device, which this onnxruntime lacks")
    worst = 0.0
    taus, overlaps, kept = [], [], []
    for query, docs in samples:
        pairs = [(query, d) for d in docs]
        a = ref.predict(pairs)
        b = cand.predict(pairs)
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
        ra, rb = _ranking_score(a), _ranking_score(b)
        taus.append(kendall_tau(ra, rb))
        k = min(10, len(docs))
        top_a = set(np.argsort(-ra, kind="stable")[:k].tolist())
        top_b = set(np.argsort(-rb, kind="stable")[:k].tolist())
        overlaps.append(len(top_a & top_b) / k)
        kept.append(int(np.argmax(ra)) == int(np.argmax(rb)))
    return {
        "max_abs_logit_diff": worst,
        "kendall_tau": float(np.mean(taus)),
        "kendall_tau_min": float(np.min(taus)),
        "top10_overlap": float(np.mean(overlaps)),
        "top1_kept": float(np.mean(kept)),
        "queries": len(samples),
        "pairs": sum(len(d) for _, d in samples),
    }


def _ranking_score(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    return x if x.ndim == 1 else x[:, 1] - x[:, 0]  # two logits: the log-odds of label 1


def kendall_tau(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """Kendall's tau-b (ties handled as scipy.stats.kendalltau does); 1.0 for fewer than 2 items
    or when both rankings are constant."""
    if a.size < 2:
        return 1.0
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(a.size, k=1)
    da, db = da[iu], db[iu]
    concordance = float((da * db).sum())
    denom = float(np.sqrt(np.count_nonzero(da) * np.count_nonzero(db)))
    if denom == 0.0:
        return 1.0 if not np.any(da) and not np.any(db) else 0.0
    return concordance / denom


def _load_samples(sample_pairs: Any, model_dir: Path) -> SampleSet:
    if sample_pairs is None:
        return builtin_sample_pairs(model_dir)
    if isinstance(sample_pairs, (str, os.PathLike)):
        out: SampleSet = []
        try:
            with open(sample_pairs, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        out.append((str(row["query"]), [str(d) for d in row["documents"]]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(
                f'cannot read sample pairs from {sample_pairs}: {e}; expected lines of {{"query": ..., "documents": [...]}}'
            ) from e
    else:
        out = [(str(q), [str(d) for d in docs]) for q, docs in sample_pairs]
    if not out or any(len(d) < 2 for _, d in out):
        raise ModelError("sample pairs need at least one query, each with at least 2 documents")
    return out


def builtin_sample_pairs(model_dir: str | os.PathLike[str], *, queries: int = 20, docs: int = 20, seed: int = 0) -> SampleSet:
    """Seeded (query, documents) samples built from the tokenizer's word-like vocabulary.

    Each document repeats a varying share of its query's words among random ones, so the
    reference model's scores spread and rankings are meaningful rather than ties of noise.
    """
    words = _vocab_words(Path(model_dir) / "tokenizer.json")
    rng = random.Random(seed)
    out: SampleSet = []
    for _ in range(queries):
        query = rng.sample(words, k=min(len(words), rng.randint(3, 8)))
        documents = []
        for j in range(docs):
            share = j / docs
            n = rng.randint(8, 60)
            body = [rng.choice(query) if rng.random() < share else rng.choice(words) for _ in range(n)]
            documents.append(" ".join(body))
        rng.shuffle(documents)
        out.append((" ".join(query), documents))
    return out


_MARKERS = re.compile(r"^(Ġ|▁|##)")


def _vocab_words(tokenizer_json: Path) -> list[str]:
    spec = read_json(tokenizer_json, "tokenizer.json")
    vocab = (spec.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        tokens = list(vocab)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        tokens = [v[0] for v in vocab]
    else:
        tokens = []
    specials = {t.get("content") for t in spec.get("added_tokens", [])}
    words = []
    for t in tokens:
        if t in specials or t.startswith("##"):
            continue
        w = _MARKERS.sub("", t)
        if len(w) >= 3 and w.isalpha():
            words.append(w)
    words = sorted(set(words))
    if len(words) < 20:
        raise ModelError(f"{tokenizer_json} has too few word-like tokens for built-in samples; pass --sample-pairs")
    return words
