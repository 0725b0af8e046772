"""The compute floor of a workload: its real-token matmul FLOPs over a matmul rate measured now.

The FLOPs follow from the model's config (padding excluded); the rate is the best of repeated
products of the model's FFN shape ([4096, hidden] x [hidden, intermediate]) with the same thread
budget, per precision, over every kernel installed for it (torch, ONNX Runtime's MLAS). A system's latency over the floor says how much of the request is not
the model's own arithmetic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .measure import Request

__all__ = ["real_token_flops", "matmul_rates", "matmul_probes", "floor_rate", "request_lengths", "RATE_PRECISIONS"]

RATE_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def real_token_flops(config: dict[str, Any], lengths: Iterable[int]) -> float:
    """Matmul FLOPs of an encoder over sequences of the given real lengths (2 FLOPs per MAC):
    per layer and token, the Q, K, V and output projections (8 h^2), the FFN (4 h f) and the
    attention scores and weighted sum (4 n h)."""
    h = int(config.get("hidden_size", config.get("dim", 0)))
    ffn = int(config.get("intermediate_size", config.get("hidden_dim", 4 * h)))
    layers = int(config.get("num_hidden_layers", config.get("n_layers", 0)))
    if h <= 0 or layers <= 0:
        raise ValueError("config.json needs hidden_size and num_hidden_layers to count FLOPs")
    total = 0.0
    for n in lengths:
        per_layer = n * (8 * h * h + 4 * h * ffn) + 4 * n * n * h
        total += layers * per_layer
    return total


def matmul_rates(
    config: dict[str, Any], threads: int, precisions: Sequence[str] = ("fp32", "bf16", "int8")
) -> dict[str, float]:
    """FLOP/s of the model's FFN-shaped GEMM per precision: the best kernel of
    :func:`matmul_probes` for each. Precisions no installed kernel can run are left out."""
    return {p: r["rate"] for p, r in matmul_probes(config, threads, precisions).items()}


def matmul_probes(
    config: dict[str, Any], threads: int, precisions: Sequence[str] = ("fp32", "bf16", "int8")
) -> dict[str, dict[str, Any]]:
    """Per precision: every kernel that can run the model's FFN-shaped GEMM ([4096, hidden] x
    [hidden, intermediate], a constant weight as in a model) with ``threads`` threads, its FLOP/s
    (best of 15 after 3 warm-ups), and the fastest (``rate``, ``kernel``).

    A precision's floor must be the best this CPU offers for it, whatever library has it: one
    library's slow kernel is no floor (torch's int8 GEMM read 5 GOP/s on an AVX2 EPYC, torch's
    fp32 GEMM 217 GFLOP/s on a Zen 5 where ONNX Runtime's whole model ran faster). Kernels tried:
    fp32 torch and ONNX Runtime MatMul (MLAS); bf16 torch (oneDNN); fp16 torch; int8 torch
    ``_int_mm`` and ONNX Runtime's own int8 kernels (MatMulInteger u8 x s8 and the contrib
    DynamicQuantizeMatMul, MLAS's VNNI / AMX paths, with its activation quantization included)."""
    h = int(config.get("hidden_size", config.get("dim", 0)))
    ffn = int(config.get("intermediate_size", config.get("hidden_dim", 4 * h)))
    m = 4096
    flops = 2.0 * m * h * ffn
    kernels: dict[str, dict[str, float]] = {}

    def best(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(15):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / min(times)

    for name in precisions:
        if name not in RATE_PRECISIONS:
            raise ValueError(f"no matmul probe for precision {name!r}; use one of {RATE_PRECISIONS}")
        found: dict[str, float] = {}
        for kernel, make in _kernels(name, m, h, ffn, threads):
            try:
                fn = make()
            except (ImportError, RuntimeError):  # a library or kernel this build lacks
                continue
            if fn is not None:
                try:
                    found[kernel] = best(fn)
                except RuntimeError:  # pragma: no cover - depends on the build and shapes
                    pass
        if found:
            kernels[name] = found
    out: dict[str, dict[str, Any]] = {}
    for name, found in kernels.items():
        kernel = max(found, key=found.__getitem__)
        out[name] = {"rate": found[kernel], "kernel": kernel, "kernels": found}
    return out


def _kernels(precision: str, m: int, k: int, n: int, threads: int) -> list[tuple[str, Callable[[], Any]]]:
    def torch_mm(dtype_name: str) -> Callable[[], Any]:
        import torch

        torch.set_num_threads(threads)
        dtype = getattr(torch, dtype_name)
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        return lambda: a @ b

    def torch_int_mm() -> Callable[[], Any]:
        import torch

        torch.set_num_threads(threads)
        a8 = torch.randint(-128, 127, (m, k), dtype=torch.int8)
        b8 = torch.randint(-128, 127, (k, n), dtype=torch.int8)
        torch._int_mm(a8, b8)  # raises RuntimeError where this build has no CPU kernel
        return lambda: torch._int_mm(a8, b8)

    if precision == "fp32":
        return [("torch fp32 GEMM", lambda: torch_mm("float32")),
                ("onnxruntime MatMul (MLAS fp32)", lambda: _ort_probe("MatMul", m, k, n, threads))]
    if precision == "bf16":
        return [("torch bf16 GEMM (oneDNN)", lambda: torch_mm("bfloat16"))]
    if precision == "fp16":
        return [("torch fp16 GEMM", lambda: torch_mm("float16"))]
    return [("torch _int_mm (s8 x s8)", torch_int_mm),
            ("onnxruntime MatMulInteger (MLAS u8 x s8)", lambda: _ort_probe("MatMulInteger", m, k, n, threads)),
            ("onnxruntime DynamicQuantizeMatMul (MLAS, activations quantized per call)",
             lambda: _ort_probe("DynamicQuantizeMatMul", m, k, n, threads))]


def _ort_probe(op: str, m: int, k: int, n: int, threads: int) -> Callable[[], Any] | None:
    """One [m, k] x [k, n] product on ONNX Runtime's CPU provider with a constant weight, as in a
    model: fp32 ``MatMul``, ``MatMulInteger`` (uint8 activations x int8 weights, int32 out) or
    ``com.microsoft.DynamicQuantizeMatMul`` (fp32 in and out); None without the onnx package."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    opsets = [helper.make_opsetid("", 17)]
    if op == "MatMul":
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")]
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
        a = rng.standard_normal((m, k)).astype(np.float32)
    elif op == "MatMulInteger":
        inits = [numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w"),
                 numpy_helper.from_array(np.array(128, dtype=np.uint8), "az"),
                 numpy_helper.from_array(np.array(0, dtype=np.int8), "wz")]
        node = helper.make_node("MatMulInteger", ["a", "w", "az", "wz"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
        a = rng.integers(0, 255, (m, k), dtype=np.uint8)
    else:
        inits = [numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w"),
                 numpy_helper.from_array(np.array([0.01], dtype=np.float32), "ws"),
                 numpy_helper.from_array(np.array([0], dtype=np.int8), "wz")]
        node = helper.make_node("DynamicQuantizeMatMul", ["a", "w", "ws", "wz"], ["y"], domain="com.microsoft")
        opsets.append(helper.make_opsetid("com.microsoft", 1))
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
        a = rng.standard_normal((m, k)).astype(np.float32)
    graph = helper.make_graph([node], "matmul_probe", [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # an op this onnxruntime build lacks
        raise RuntimeError(str(e)) from e
    return lambda: session.run(None, {"a": a})


def floor_rate(rates: dict[str, float], precision: str) -> tuple[float, str] | None:
    """The matmul rate that bounds a precision, and which probe gave it: the faster of its own
    and fp32's, since a lower precision can always compute as fp32 does (on CPUs without fp16
    arithmetic, torch's fp16 GEMM is far slower than fp32). None without either rate."""
    found = [(rates[k], k) for k in dict.fromkeys((precision, "fp32")) if rates.get(k)]
    return max(found) if found else None


def request_lengths(model_dir: str | os.PathLike[str], requests: Sequence[Request]) -> tuple[list[list[int]], int]:
    """Real token count of every pair of every request as the model sees it (its own pair
    template and truncation to its max_length), special tokens included; and that max_length."""
    from ..cross_encoder import CrossEncoder
    from ..pairs import PairBatcher, PairTemplate

    ce = CrossEncoder(model_dir, threads=1, device="cpu")
    tok_path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    template = PairTemplate.from_tokenizer(tok_path)
    batcher = PairBatcher(template, max_length=ce.max_length)
    out = []
    for q, docs in requests:
        (qi,) = ce.tokenize_documents([q])
        kept = [batcher.truncate_lengths(len(qi), len(d)) for d in ce.tokenize_documents(docs)]
        out.append([kq + kd + template.n_special for kq, kd in kept])
    return out, ce.max_length
