"""Dynamic int8 of a fused encoder graph with SmoothQuant-style smoothing (``optimize --int8-smooth``).

Each MatMul with a constant weight gets int8 weights per output column and activations quantized
at run time, either per token (row; ``MatMulIntegerToFloat``, what ``--int8-smooth`` uses) or per
tensor (``DynamicQuantizeMatMul``, faster but unfaithful on FFN2's post-GELU outliers). A few
input channels carry most of the activation range; smoothing divides each input channel by
``s = max|x|^alpha / max|w|^(1 - alpha)`` (``max|x|`` from calibration pairs, real tokens only) and
multiplies the weight's row by ``s``, so the product is unchanged and the int8 error is shared
between activations and weights. BERT-style encoders are post-LayerNorm: the LayerNorm output also
feeds the residual add, so ``1/s`` cannot be folded into its gamma and beta; it is a ``Mul`` on the
MatMul's input, except for the attention output projection, where it folds into the value columns
of the fused Attention's QKV weight and bias (the context only feeds that projection).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["matmul_input_ranges", "smooth_quantize_dynamic", "weight_matmuls"]


def weight_matmuls(model: Any) -> list[Any]:
    """The graph's MatMul nodes whose second input is a constant 2-D float32 weight used once."""
    return [model.graph.node[i] for i in _weight_matmul_indices(model)]


def _weight_matmul_indices(model: Any) -> list[int]:
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    out = []
    for i, n in enumerate(model.graph.node):
        if n.op_type != "MatMul" or len(n.input) != 2 or n.input[1] not in inits or uses[n.input[1]] != 1:
            continue
        w = inits[n.input[1]]
        if len(w.dims) == 2 and w.data_type == 1:  # FLOAT
            out.append(i)
    return out


def matmul_input_ranges(model: Any, feeds: Iterable[dict[str, Any]], threads: int | None = None) -> dict[str, Any]:
    """max |x| per input channel of every weight MatMul's input over ``feeds`` (rows whose
    attention mask is 0, i.e. padding, are left out: they never reach a score)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = list(dict.fromkeys(n.input[0] for n in weight_matmuls(m)))
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None) for nm in names if nm not in known)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ranges: dict[str, Any] = {}
    for f in feeds:
        mask = np.asarray(f["attention_mask"]).astype(bool) if "attention_mask" in f else None
        for nm, x in zip(names, sess.run(names, f)):
            x = np.asarray(x)
            rows = x[mask] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            cur = np.abs(rows).max(axis=0)
            ranges[nm] = np.maximum(ranges[nm], cur) if nm in ranges else cur
    return ranges


def _attention_feeding(model: Any, tensor: str) -> Any | None:
    """The fused ``Attention`` node whose only consumer-visible output is ``tensor``, if any."""
    for n in model.graph.node:
        if n.op_type == "Attention" and n.domain == "com.microsoft" and tensor in n.output:
            return n
    return None


def smooth_quantize_dynamic(
    model: Any,
    ranges: dict[str, Any] | None,
    *,
    alpha: float = 0.5,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    per_token: bool | Callable[[str], bool] = False,
) -> int:
    """Rewrites ``model`` in place; returns the number of MatMuls made int8.

    Args:
        model: A fused ONNX graph (``onnx.ModelProto``).
        ranges: :func:`matmul_input_ranges` of that graph on calibration pairs; None: no smoothing.
        alpha: SmoothQuant's migration strength (0: all range stays on the activations).
        keep_fp32: Node names to leave in fp32 (mixed precision).
        per_token: One activation scale per token (row) instead of per tensor (:func:`_per_token`),
            for every MatMul or for the node names a predicate accepts.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    replace: dict[int, list[Any]] = {}  # node index -> its replacement (protobuf wrappers have no stable id)
    drop: set[str] = set()
    new_inits = []
    count = 0
    for index in _weight_matmul_indices(model):
        n = model.graph.node[index]
        if keep_fp32(n.name):
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        x = n.input[0]
        pre: list[Any] = []
        tag = n.input[1]
        if ranges is not None and x in ranges:
            xmax = np.maximum(np.asarray(ranges[x], np.float64), 1e-5)
            wmax = np.maximum(np.abs(w).max(axis=1).astype(np.float64), 1e-5)
            s = (xmax**alpha / wmax ** (1.0 - alpha)).astype(np.float32)
            att = _attention_feeding(model, x)
            if att is not None and _fold_into_value(att, s, inits):
                pass  # the context channels are already divided by s
            else:
                inv = tag + "_smooth_inv"
                new_inits.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
                pre.append(helper.make_node("Mul", [x, inv], [tag + "_smoothed"], name=tag + "_smooth"))
                x = tag + "_smoothed"
            w = w * s[:, None]
        scale = np.abs(w).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        qn, sn, zn = tag + "_s8", tag + "_s8_scale", tag + "_s8_zero"
        new_inits += [numpy_helper.from_array(q, qn), numpy_helper.from_array(scale.astype(np.float32), sn),
                      numpy_helper.from_array(np.zeros(q.shape[1], np.int8), zn)]
        drop.add(n.input[1])
        if per_token(n.name) if callable(per_token) else per_token:
            nodes_pt, inits_pt = _per_token(tag, x, n.output[0], qn, sn, zn, w.shape[0])
            replace[index] = pre + nodes_pt
            new_inits += inits_pt
        else:
            replace[index] = pre + [helper.make_node("DynamicQuantizeMatMul", [x, qn, sn, zn], list(n.output),
                                                     name=(n.name or tag) + "_int8", domain="com.microsoft")]
        count += 1
    nodes = []
    for i, n in enumerate(model.graph.node):
        nodes.extend(replace.get(i, [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _per_token(tag: str, x: str, y: str, wq: str, ws: str, wz: str, k: int) -> tuple[list[Any], list[Any]]:
    """x [..., K] -> y [..., N]: symmetric int8 with one scale per row (token) found at run time,
    stored as uint8 with zero point 128 (u8 x s8 is VNNI's native product), then
    MatMulIntegerToFloat (the column scales applied in its kernel) and the row scales."""
    from onnx import TensorProto, helper, numpy_helper

    p = tag + "_tok_"
    consts = {"inv127": np.float32(1 / 127), "eps": np.float32(1e-8), "zp": np.uint8(128), "one": np.float32(1.0),
              "c128": np.float32(128.0), "zero": np.float32(0.0),
              "mat": np.array([-1, k], np.int64), "last": np.array([-1], np.int64)}
    inits = [numpy_helper.from_array(np.asarray(v), p + name) for name, v in consts.items()]
    c = {name: p + name for name in consts}
    nodes = [
        helper.make_node("Reshape", [x, c["mat"]], [p + "x2"]),
        helper.make_node("Abs", [p + "x2"], [p + "abs"]),
        helper.make_node("ReduceMax", [p + "abs"], [p + "m"], axes=[-1], keepdims=0),
        helper.make_node("Mul", [p + "m", c["inv127"]], [p + "s0"]),
        helper.make_node("Max", [p + "s0", c["eps"]], [p + "s"]),  # [M]: an all-zero row keeps a finite scale
        helper.make_node("Mul", [p + "s", c["zero"]], [p + "z0"]),
        helper.make_node("Add", [p + "z0", c["c128"]], [p + "z1"]),
        helper.make_node("Cast", [p + "z1"], [p + "z"], to=TensorProto.UINT8),
        helper.make_node("QuantizeLinear", [p + "x2", p + "s", p + "z"], [p + "q"], axis=0),
        helper.make_node("MatMulIntegerToFloat", [p + "q", wq, c["one"], ws, c["zp"], wz], [p + "y2"],
                         domain="com.microsoft"),
        helper.make_node("Unsqueeze", [p + "s", c["last"]], [p + "sc"]),
        helper.make_node("Mul", [p + "y2", p + "sc"], [p + "y3"]),
        helper.make_node("Shape", [x], [p + "xshape"]),
        helper.make_node("Shape", [p + "y3"], [p + "yshape"]),
        helper.make_node("Slice", [p + "xshape", p + "rows0", p + "rowsend"], [p + "lead"]),
        helper.make_node("Slice", [p + "yshape", p + "last", p + "lastend"], [p + "n"]),
        helper.make_node("Concat", [p + "lead", p + "n"], [p + "outshape"], axis=0),
        helper.make_node("Reshape", [p + "y3", p + "outshape"], [y]),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), p + "rows0"),
              numpy_helper.from_array(np.array([-1], np.int64), p + "rowsend"),
              numpy_helper.from_array(np.array([2**62], np.int64), p + "lastend")]
    return nodes, inits


def _fold_into_value(att: Any, s: Any, inits: dict[str, Any]) -> bool:
    """Divides the value columns of a fused Attention's QKV weight and bias by ``s`` in place."""
    from onnx import numpy_helper

    if len(att.input) < 3 or att.input[1] not in inits or att.input[2] not in inits:
        return False
    w = numpy_helper.to_array(inits[att.input[1]]).astype(np.float32)
    b = numpy_helper.to_array(inits[att.input[2]]).astype(np.float32)
    hidden = s.shape[0]
    if w.ndim != 2 or w.shape[1] != 3 * hidden or b.shape != (3 * hidden,):
        return False
    w = w.copy()
    b = b.copy()
    w[:, 2 * hidden :] /= s[None, :]
    b[2 * hidden :] /= s
    inits[att.input[1]].CopyFrom(numpy_helper.from_array(w, att.input[1]))
    inits[att.input[2]].CopyFrom(numpy_helper.from_array(b, att.input[2]))
    return True
