"""``tailrank export`` and ``tailrank optimize``: model tooling (needs the ``export`` extra)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="transformers / sentence-transformers checkpoint -> ONNX model directory")
    e.add_argument("hf_model_dir", help="Hugging Face checkpoint directory (config.json, weights, tokenizer)")
    e.add_argument("out_dir", help="model directory to create (onnx/model.onnx + tokenizer and config files)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    e.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    e.add_argument("--rerank-template", metavar="NAME|FILE", default=None,
                   help="for a causal-LM (LLM) reranker: qwen3, mxbai-v2, bge-gemma or a template JSON file")

    o = sub.add_parser("optimize", help="ONNX Runtime fusions and a lower precision, with a fidelity check")
    o.add_argument("model_dir", help="model directory made by `tailrank export`")
    o.add_argument("out_dir", help="model directory to create")
    prec = o.add_mutually_exclusive_group()
    prec.add_argument("--int8", action="store_true", help="8-bit weights (MatMulNBits, blockwise) with int8 compute; attention QKV kept fp32")
    prec.add_argument("--fp16", action="store_true", help="float16 weights and compute (float32 inputs/outputs)")
    prec.add_argument("--int8-static", action="store_true",
                      help="static int8: weights per channel, activation scales calibrated on --sample-pairs (use pairs "
                      "from your own corpus); the fused attention, LayerNorm, Softmax and residual adds stay fp32. "
                      "Gated like every precision (on the SciFact cross-encoder it fails: tau 0.65)")
    prec.add_argument("--int8-smooth", action="store_true",
                      help="dynamic int8 (VNNI kernels) after SmoothQuant-style smoothing calibrated on every other query "
                      "of --sample-pairs (use pairs from your own corpus) and gated on the others")
    prec.add_argument("--int8-openvino", action="store_true",
                      help="static int8 by NNCF (SmoothQuant, its transformer preset) on OpenVINO's int8 kernels, "
                      "calibrated on every other query of --sample-pairs and gated on the others (needs "
                      "onnxruntime-openvino and the openvino extra)")
    prec.add_argument("--auto", action="store_true",
                      help="build every precision this machine can run, gate each on fidelity, time each on the sample "
                      "requests and write the fastest passing one (tailrank.json records the decision)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 matmuls on ONNX Runtime's OpenVINO provider (needs onnxruntime-openvino; "
                      "CPUs with AVX512-BF16 or AMX)")
    o.add_argument("--force", action="store_true", help="write even below the fidelity thresholds; replace out_dir")
    o.add_argument("--sample-pairs", metavar="JSONL", help='lines of {"query": str, "documents": [str, ...]}')
    o.add_argument("--min-tau", type=float, default=0.95, help="least mean Kendall tau per query (default 0.95)")
    o.add_argument("--min-top1", type=float, default=0.95, help="least share of queries keeping their top 1 (0.95)")
    o.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads for the check")


def run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from .export import export

        out = export(args.hf_model_dir, args.out_dir, opset=args.opset, force=args.force,
                     rerank_template=args.rerank_template)
        print(f"exported {args.hf_model_dir} -> {out}")
        return 0
    from .optimize import FidelityError, Precision, optimize

    if args.auto:
        from ._auto import optimize_auto

        try:
            record = optimize_auto(args.model_dir, args.out_dir, force=args.force, sample_pairs=args.sample_pairs,
                                   min_tau=args.min_tau, min_top1=args.min_top1, threads=args.threads)
        except FidelityError as e:
            print(json.dumps(e.report, indent=1))
            print(f"tailrank optimize: {e}", file=sys.stderr)
            return 3
        print(json.dumps(record, indent=1))
        print(f"tailrank optimize --auto: wrote {record['decision']} to {args.out_dir}", file=sys.stderr)
        return 0
    precision: Precision = ("int8" if args.int8 else "int8-static" if args.int8_static
                            else "int8-smooth" if args.int8_smooth
                            else "int8-openvino" if args.int8_openvino else "fp16" if args.fp16
                            else "bf16" if args.bf16 else "fp32")
    try:
        report = optimize(
            args.model_dir,
            args.out_dir,
            precision=precision,
            force=args.force,
            sample_pairs=args.sample_pairs,
            min_tau=args.min_tau,
            min_top1=args.min_top1,
            threads=args.threads,
        )
    except FidelityError as e:
        print(json.dumps(e.report, indent=1))
        print(f"tailrank optimize: {e}", file=sys.stderr)
        return 3
    print(json.dumps(report, indent=1))
    return 0
