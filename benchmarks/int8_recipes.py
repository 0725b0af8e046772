"""Where int8 loses the ranking: simulated int8 per MatMul group, activation scheme and smoothing.

Issue 17 point 3. Each recipe is applied to the exported (unfused) fp32 graph as fake quantization
(int8 weights per output channel dequantized to fp32; activations quantized and dequantized by
standard ONNX ops), so the rankings are those of the int8 arithmetic without needing its kernels.
Calibration uses SciFact test claims 50..69 x 16 sampled abstracts; fidelity is measured on other
claims (20.. in the scorer benchmark's held-out order), so no claim is both calibrated and gated on.

    python benchmarks/int8_recipes.py --model-dir EXPORTED_FP32_DIR --claims 10 --docs 50
    python benchmarks/int8_recipes.py --model-dir EXPORTED_FP32_DIR --fused --rounds 2 --timed-claims 2

Prints one JSON line per recipe: mean Kendall tau and top-1 kept vs fp32. ``--fused`` instead
rewrites the fused graph with the real kernels (tailrank._int8) and also times each recipe,
interleaved, against the fused fp32 graph.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from tailrank._ort import default_max_length, read_json  # noqa: E402
from tailrank.bench.workload import random_workload  # noqa: E402
from tailrank.optimize import kendall_tau  # noqa: E402

GROUPS = {"q": "attention/self/query", "k": "attention/self/key", "v": "attention/self/value",
          "ao": "attention/output/dense", "f1": "intermediate/dense", "f2": "output/dense"}


def group_of(name: str) -> tuple[str, int] | None:
    m = re.search(r"layer\.(\d+)/(.+)/MatMul$", name)
    if not m:
        return None
    for g, pat in GROUPS.items():
        if m.group(2) == pat:
            return g, int(m.group(1))
    return None


def features(model_dir: Path, requests: list[tuple[str, list[str]]], batch: int = 16) -> list[list[dict[str, Any]]]:
    from tokenizers import Tokenizer

    config = read_json(model_dir / "config.json", "config.json")
    tok_cfg = read_json(model_dir / "tokenizer_config.json", "tokenizer_config.json")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(default_max_length(config, tok_cfg), strategy="longest_first")
    tok.enable_padding()
    out = []
    for q, docs in requests:
        feeds = []
        for s in range(0, len(docs), batch):
            enc = tok.encode_batch([(q, d) for d in docs[s : s + batch]])
            feeds.append({"input_ids": np.asarray([e.ids for e in enc], np.int64),
                          "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
                          "token_type_ids": np.asarray([e.type_ids for e in enc], np.int64)})
        out.append(feeds)
    return out


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and group_of(n.name)]


def calibrate(model: onnx.ModelProto, feeds: list[dict[str, Any]], threads: int) -> dict[str, dict[str, Any]]:
    """Per MatMul input: min, max, per-channel max |x| over the calibration batches."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [n.input[0] for n in weight_matmuls(m)]
    names = list(dict.fromkeys(names))
    for nm in names:
        m.graph.output.append(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    stats: dict[str, dict[str, Any]] = {}
    for f in feeds:
        outs = sess.run(names, f)
        mask = f["attention_mask"].astype(bool)
        for nm, x in zip(names, outs):
            x = x[mask]  # real tokens only
            s = stats.setdefault(nm, {"min": np.inf, "max": -np.inf, "chmax": np.zeros(x.shape[-1], np.float32)})
            s["min"] = min(s["min"], float(x.min()))
            s["max"] = max(s["max"], float(x.max()))
            s["chmax"] = np.maximum(s["chmax"], np.abs(x).max(axis=0))
    return stats


def c(model: onnx.ModelProto, name: str, arr: Any) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    return name


def fake_quant_act(model: onnx.ModelProto, x: str, mode: str, st: dict[str, Any], tag: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes that quantize-dequantize activation ``x``; returns (nodes, output name)."""
    o = f"{x}_fq_{tag}"
    if mode == "static":  # uint8 asymmetric per tensor, MinMax range incl. 0 (as quantize_static)
        lo, hi = min(st["min"], 0.0), max(st["max"], 0.0)
        scale = np.float32((hi - lo) / 255.0)
        zp = np.uint8(np.clip(round(-lo / scale), 0, 255))
        sn, zn = c(model, o + "_s", scale), c(model, o + "_z", zp)
        return [helper.make_node("QuantizeLinear", [x, sn, zn], [o + "_q"]),
                helper.make_node("DequantizeLinear", [o + "_q", sn, zn], [o])], o
    if mode == "dyn":  # per tensor at run time (DynamicQuantizeLinear, as DynamicQuantizeMatMul)
        return [helper.make_node("DynamicQuantizeLinear", [x], [o + "_q", o + "_s", o + "_z"]),
                helper.make_node("DequantizeLinear", [o + "_q", o + "_s", o + "_z"], [o])], o
    if mode in ("tok", "tok8"):  # symmetric per token (row) at run time
        eps = c(model, o + "_eps", np.float32(1e-12))
        qmax = c(model, o + "_127", np.float32(127.0))
        lo, hi = c(model, o + "_lo", np.float32(-127.0)), c(model, o + "_hi", np.float32(127.0))
        return [
            helper.make_node("Abs", [x], [o + "_abs"]),
            helper.make_node("ReduceMax", [o + "_abs"], [o + "_m"], axes=[-1], keepdims=1),
            helper.make_node("Max", [o + "_m", eps], [o + "_m2"]),
            helper.make_node("Div", [o + "_m2", qmax], [o + "_s"]),
            helper.make_node("Div", [x, o + "_s"], [o + "_d"]),
            helper.make_node("Round", [o + "_d"], [o + "_r"]),
            helper.make_node("Clip", [o + "_r", lo, hi], [o + "_c"]),
            helper.make_node("Mul", [o + "_c", o + "_s"], [o]),
        ], o
    raise ValueError(mode)


def build(model: onnx.ModelProto, stats: dict[str, dict[str, Any]], select: Any, mode: str,
          alpha: float | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the MatMuls for which ``select(group, layer)`` holds fake-quantized."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    new_nodes = []
    for n in m.graph.node:
        g = group_of(n.name) if n.op_type == "MatMul" and n.input[1] in inits else None
        if g is None or not select(*g):
            new_nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        x = n.input[0]
        st = dict(stats[x])
        tag = re.sub(r"\W", "_", n.name)
        if alpha is not None:  # SmoothQuant: x / s, s * W (s per input channel)
            s = np.power(np.maximum(st["chmax"], 1e-5), alpha) / np.power(np.maximum(np.abs(w).max(axis=1), 1e-5), 1 - alpha)
            s = s.astype(np.float32)
            sn = c(m, tag + "_sm", (1.0 / s).astype(np.float32))
            new_nodes.append(helper.make_node("Mul", [x, sn], [tag + "_xs"]))
            x = tag + "_xs"
            w = w * s[:, None]
            st["chmax"] = st["chmax"] / s
            st["min"], st["max"] = -float(st["chmax"].max()), float(st["chmax"].max())  # symmetric bound after smoothing
        ws = np.abs(w).max(axis=0) / 127.0
        ws[ws == 0] = 1.0
        wq = np.clip(np.round(w / ws), -127, 127) * ws
        wn = c(m, tag + "_wq", wq.astype(np.float32))
        if mode != "none":
            nodes, x = fake_quant_act(m, x, mode, st, tag)
            new_nodes.extend(nodes)
        new_nodes.append(helper.make_node("MatMul", [x, wn], list(n.output), name=n.name))
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m


def scores(model: onnx.ModelProto, feats: list[list[dict[str, Any]]], threads: int) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [np.concatenate([sess.run(None, f)[0].reshape(-1) for f in req]) for req in feats]


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    taus = [kendall_tau(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(ref, got)]
    top1 = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ref, got)]
    return {"tau": round(float(np.mean(taus)), 4), "tau_min": round(float(np.min(taus)), 4),
            "top1": round(float(np.mean(top1)), 3)}


def recipes(layers: int) -> list[tuple[str, Any, str, float | None]]:
    allm = lambda g, l: True  # noqa: E731
    out: list[tuple[str, Any, str, float | None]] = [
        ("weights only, all", allm, "none", None),
        ("static, all", allm, "static", None),
        ("dynamic per-tensor, all", allm, "dyn", None),
        ("per-token, all", allm, "tok", None),
    ]
    for g in GROUPS:
        out.append((f"static, only {g}", (lambda gg: lambda g, l: g == gg)(g), "static", None))
    for layer in range(layers):
        out.append((f"static, only layer {layer}", (lambda ll: lambda g, l: l == ll)(layer), "static", None))
    for g in GROUPS:
        out.append((f"per-token, only {g}", (lambda gg: lambda g, l: g == gg)(g), "tok", None))
    out += [
        ("smooth a=0.5 + static, all", allm, "static", 0.5),
        ("smooth a=0.5 + dynamic per-tensor, all", allm, "dyn", 0.5),
        ("smooth a=0.5 + per-token, all", allm, "tok", 0.5),
    ]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    p.add_argument("--claims", type=int, default=10)
    p.add_argument("--docs", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="regex: run the recipes whose name matches")
    p.add_argument("--fused", action="store_true", help="real int8 kernels on the fused graph, timed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timed-claims", type=int, default=3)
    a = p.parse_args()
    model_dir = Path(a.model_dir)
    model = onnx.load(str(model_dir / "onnx" / "model.onnx"))
    held = random_workload(a.data, 20 + a.claims, a.docs, 1).requests[20:]
    calib = random_workload(a.data, 70, 16, 2).requests[50:70]
    hf, cf = features(model_dir, held), features(model_dir, calib)
    if a.fused:
        main_fused(a, model_dir, hf, cf)
        return 0
    stats = calibrate(model, [f for req in cf for f in req], a.threads)
    ref = scores(model, hf, a.threads)
    layers = 1 + max(group_of(n.name)[1] for n in weight_matmuls(model))  # type: ignore[index]
    for name, sel, mode, alpha in recipes(layers):
        if a.only and not re.search(a.only, name):
            continue
        t = time.perf_counter()
        got = scores(build(model, stats, sel, mode, alpha), hf, a.threads)
        print(json.dumps({"recipe": name} | agreement(ref, got) | {"s": round(time.perf_counter() - t, 1)}), flush=True)
    return 0



# --- real int8 kernels on the fused graph (tailrank._int8), timed against fused fp32 -----------------

def fused_recipes() -> list[tuple[str, float | None, Any, Any]]:
    """(name, smoothing alpha or None, keep-fp32 predicate on node names, per-token or a predicate)."""
    none = lambda name: False  # noqa: E731
    f2 = lambda name: "output/dense" in name and "attention" not in name  # noqa: E731
    return [
        ("fused: smooth a=0.5 + per-tensor, FFN2 per-token", 0.5, none, f2),
        ("fused: smooth a=0.5 + per-tensor, FFN2 fp32", 0.5, f2, False),
        ("fused: dynamic per-tensor (DynamicQuantizeMatMul), all", None, none, False),
        ("fused: smooth a=0.5 + per-token (MatMulIntegerToFloat), all", 0.5, none, True),
        ("fused: per-token (MatMulIntegerToFloat), all", None, none, True),
        ("fused: smooth a=0.5 + dynamic per-tensor, all", 0.5, none, False),
    ]


def main_fused(a: argparse.Namespace, model_dir: Path, hf: list[Any], cf: list[Any]) -> None:
    from tailrank import _int8
    from tailrank.optimize import _fuse

    fused_model = _fuse(model_dir / "onnx" / "model.onnx", read_json(model_dir / "config.json", "config.json")).model
    ranges = _int8.matmul_input_ranges(fused_model, [f for req in cf for f in req], a.threads)
    ref = scores(fused_model, hf, a.threads)
    built = {"fused fp32": fused_model}
    for name, alpha, keep, tok in fused_recipes():
        if a.only and not re.search(a.only, name):
            continue
        m = onnx.ModelProto()
        m.CopyFrom(fused_model)
        _int8.smooth_quantize_dynamic(m, ranges if alpha is not None else None, alpha=alpha or 0.5, keep_fp32=keep, per_token=tok)
        built[name] = m
        print(json.dumps({"recipe": name} | agreement(ref, scores(m, hf, a.threads))), flush=True)
    if a.rounds == 0:
        return
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sessions = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for k, m in built.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    timed = hf[: a.timed_claims]
    for _ in range(a.rounds):  # interleaved: every recipe scores the same claims in turn
        for k, s in sessions.items():
            for req in timed:
                t = time.perf_counter()
                for f in req:
                    s.run(None, f)
                times[k].append(time.perf_counter() - t)
    base = float(np.median(times["fused fp32"]))
    for k, v in times.items():
        print(json.dumps({"timing": k, "median_ms_per_claim": round(float(np.median(v)) * 1e3),
                          "speed_vs_fused_fp32": round(base / float(np.median(v)), 2)}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
