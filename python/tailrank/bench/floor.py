"""The compute floor of a workload: its real-token matmul FLOPs over a matmul rate measured now.

The FLOPs follow from the model's config (padding excluded); the rate is the best of repeated
products of the model's FFN shape ([4096, hidden] x [hidden, intermediate]) with the same thread
budget, per precision. A system's latency over the floor says how much of the request is not
the model's own arithmetic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .measure import Request

__all__ = ["real_token_flops", "matmul_rates", "floor_rate", "request_lengths", "RATE_PRECISIONS"]

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
    """FLOP/s of the model's FFN-shaped GEMM per precision, measured now with ``threads`` torch
    threads (best of 15 after 3 warm-ups). Precisions this torch build cannot run are left out.
    fp32 is the faster of torch's GEMM and ONNX Runtime's own MatMul (MLAS, where the onnx package
    is installed): on an AMD Zen 5 torch's fp32 GEMM ran at 217 GFLOP/s while ONNX Runtime's whole
    model ran faster than that, so a torch-only rate is no floor."""
    import torch

    torch.set_num_threads(threads)
    h = int(config.get("hidden_size", config.get("dim", 0)))
    ffn = int(config.get("intermediate_size", config.get("hidden_dim", 4 * h)))
    m = 4096
    flops = 2.0 * m * h * ffn
    out: dict[str, float] = {}

    def best(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(15):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / min(times)

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name in precisions:
        if name in dtypes:
            a, b = torch.randn(m, h, dtype=dtypes[name]), torch.randn(h, ffn, dtype=dtypes[name])
            out[name] = best(lambda: a @ b)
            if name == "fp32":
                ort_run = _ort_matmul(m, h, ffn, threads)
                if ort_run is not None:
                    out[name] = max(out[name], best(ort_run))
        elif name == "int8":
            a8 = torch.randint(-128, 127, (m, h), dtype=torch.int8)
            b8 = torch.randint(-128, 127, (h, ffn), dtype=torch.int8)
            try:
                out["int8"] = best(lambda: torch._int_mm(a8, b8))
            except RuntimeError:  # pragma: no cover - depends on the torch build and shapes
                pass
        else:
            raise ValueError(f"no matmul probe for precision {name!r}; use one of {RATE_PRECISIONS}")
    return out


def _ort_matmul(m: int, k: int, n: int, threads: int) -> Callable[[], Any] | None:
    """One fp32 [m, k] x [k, n] MatMul on ONNX Runtime's CPU provider (a constant weight, as in a
    model), or None without the onnx package."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "matmul_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m, k)).astype(np.float32)
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
