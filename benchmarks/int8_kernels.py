"""Which ONNX Runtime int8 kernel is fast here: one FFN-sized matmul per candidate, interleaved.

Issue 17 point 3: a faithful int8 recipe is only worth keeping if its kernels beat fp32 MLAS. Each
candidate is a one-MatMul graph [M, K] x [K, N] (M = 16 pairs x 344 tokens, a SciFact request's
batch); rounds interleave the candidates so load swings hit them alike; the median per candidate
is printed as a ratio to fp32 MatMul.

    python benchmarks/int8_kernels.py --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))


def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], k: int, n: int, opset: int = 17) -> bytes:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def per_token_nodes(prefix: str, x: str, y: str, wq: str, ws: str) -> list[onnx.NodeProto]:
    """Symmetric int8 per row at run time, stored as uint8 with zero point 128 (u8s8, VNNI's
    native form), MatMulInteger, then int32 -> float times the row and column scales."""
    p = prefix
    return [
        helper.make_node("Abs", [x], [p + "abs"]),
        helper.make_node("ReduceMax", [p + "abs"], [p + "m"], axes=[-1], keepdims=1),
        helper.make_node("Mul", [p + "m", p + "inv127"], [p + "s"]),  # row scale [M, 1]
        helper.make_node("Max", [p + "s", p + "eps"], [p + "s2"]),
        helper.make_node("Div", [x, p + "s2"], [p + "d"]),
        helper.make_node("Add", [p + "d", p + "c128"], [p + "d2"]),
        helper.make_node("QuantizeLinear", [p + "d2", p + "one", p + "zp0"], [p + "q"]),  # round+saturate to uint8
        helper.make_node("MatMulInteger", [p + "q", wq, p + "zp128"], [p + "i"]),
        helper.make_node("Cast", [p + "i"], [p + "f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [p + "f", ws], [p + "fw"]),
        helper.make_node("Mul", [p + "fw", p + "s2"], [y]),
    ]


def per_token_inits(p: str) -> dict[str, np.ndarray]:
    return {p + "inv127": np.float32(1 / 127), p + "eps": np.float32(1e-12), p + "c128": np.float32(128.0),
            p + "one": np.float32(1.0), p + "zp0": np.uint8(0), p + "zp128": np.uint8(128)}


def candidates(k: int, n: int, rng: np.random.Generator) -> dict[str, bytes]:
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    ws = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
    out = {"fp32 MatMul": _graph([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}, k, n)}
    out["DynamicQuantizeMatMul (per tensor)"] = _graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws", "wz"], ["y"], domain="com.microsoft")],
        {"wq": wq, "ws": ws, "wz": np.zeros(n, np.int8)}, k, n)
    out["per-token: QuantizeLinear + MatMulInteger u8s8 + 2 Mul"] = _graph(
        per_token_nodes("t_", "x", "y", "wq", "ws"), {"wq": wq, "ws": ws} | per_token_inits("t_"), k, n)
    from tailrank._int8 import _per_token

    nodes, inits = _per_token("p", "x", "y", "wq", "ws", "wz", k)
    out["per-token as --int8-smooth: QuantizeLinear per row + MatMulIntegerToFloat + Mul"] = _graph(
        nodes, {"wq": wq, "ws": ws, "wz": np.zeros(n, np.int8)} | {t.name: numpy_helper.to_array(t) for t in inits}, k, n)
    out["static: QuantizeLinear + MatMulIntegerToFloat"] = _graph(
        [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
         helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "as", "ws", "az"], ["y"], domain="com.microsoft")],
        {"wq": wq, "ws": ws, "as": np.float32(0.05), "az": np.uint8(128)}, k, n)
    for bits, block in ((8, 128), (8, 32), (4, 32)):
        blocks = -(-k // block)
        wt = w.T.reshape(n, blocks, block)
        qmax = 2 ** (bits - 1) - 1
        sc = np.abs(wt).max(axis=2) / qmax
        q = (np.clip(np.round(wt / sc[..., None]), -qmax, qmax) + 2 ** (bits - 1)).astype(np.uint8)
        if bits == 4:
            q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        out[f"MatMulNBits {bits}-bit block {block} acc4"] = _graph(
            [helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                              block_size=block, accuracy_level=4)],
            {"q": q.reshape(n, blocks, -1), "s": sc.astype(np.float32).reshape(-1)}, k, n)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=16 * 344)
    p.add_argument("--k", type=int, default=384)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((a.m, a.k)) * 1.0).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sessions = {name: ort.InferenceSession(g, so, providers=["CPUExecutionProvider"]) for name, g in candidates(a.k, a.n, rng).items()}
    ref = sessions["fp32 MatMul"].run(None, {"x": x})[0]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(a.rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[name].append(time.perf_counter() - t)
    base = float(np.median(times["fp32 MatMul"]))
    for name, s in sessions.items():
        y = s.run(None, {"x": x})[0]
        med = float(np.median(times[name]))
        print(json.dumps({"kernel": name, "median_ms": round(med * 1e3, 2), "speed_vs_fp32": round(base / med, 2),
                          "gop_s": round(2 * a.m * a.k * a.n / med / 1e9), "rel_err": float(np.abs(y - ref).max() / np.abs(ref).max())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
