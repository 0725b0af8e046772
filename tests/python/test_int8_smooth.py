"""``optimize --int8-smooth`` (SmoothQuant-style smoothing + dynamic int8) on seeded small models of
every family: every weight MatMul becomes int8, the gate judges queries the calibration never saw,
and rankings stay within the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import models

onnx = pytest.importorskip("onnx")

from tailrank import _int8  # noqa: E402
from tailrank.optimize import FidelityError, builtin_sample_pairs, fidelity, optimize  # noqa: E402


@pytest.mark.parametrize("family", models.FAMILIES + models.NEW_FAMILIES)
def test_int8_smooth_keeps_rankings_on_held_out_queries(family: str, tmp_path: Path,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = models.exported(tmp_path_factory, family, 1)[1]
    samples = builtin_sample_pairs(model_dir, queries=40, docs=8, seed=3)
    report = optimize(model_dir, tmp_path / "q", precision="int8-smooth", sample_pairs=samples, threads=1)
    assert report["passed"] and report["kendall_tau"] >= 0.95 and report["top1_kept"] >= 0.95
    assert report["calibration"] == {"queries": 20, "pairs": 160, "alpha": 0.5, "gated_on_other_queries": True}
    assert report["queries"] == 20  # the other half
    graph = onnx.load(str(tmp_path / "q" / "onnx" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulIntegerToFloat") >= 2  # per-token int8 (smoothing + VNNI u8s8)
    weights = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # none left fp32
    held_out = samples[1::2]
    again = fidelity(model_dir, tmp_path / "q", held_out, threads=1)
    assert again["kendall_tau"] == pytest.approx(report["kendall_tau"])
    assert json.loads((tmp_path / "q" / "fidelity.json").read_text())["precision"] == "int8-smooth"


def test_int8_smooth_is_refused_below_its_gate(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = models.exported(tmp_path_factory, "bert", 1)[1]
    samples = builtin_sample_pairs(model_dir, queries=4, docs=8, seed=1)
    with pytest.raises(FidelityError, match="int8-smooth model below"):
        optimize(model_dir, tmp_path / "refused", precision="int8-smooth", sample_pairs=samples, threads=1, min_tau=1.5)
    assert not (tmp_path / "refused").exists()


def test_smoothing_folds_into_the_value_columns_and_cuts_the_int8_error() -> None:
    # An outlier channel in the attention context (from one value column) is what per-tensor int8
    # loses on; smoothing divides it out of the context (folded into the value weights, no extra
    # op) and into the output projection's weight rows.
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden = 8
    w_qkv = rng.standard_normal((hidden, 3 * hidden)).astype(np.float32)
    b_qkv = rng.standard_normal(3 * hidden).astype(np.float32)
    w_qkv[:, 2 * hidden + 3] *= 40  # value column 3: an outlier channel of the context
    b_qkv[2 * hidden + 3] *= 40
    w_out = rng.standard_normal((hidden, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["ctx"], domain="com.microsoft", num_heads=2),
        helper.make_node("MatMul", ["ctx", "wout"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, hidden])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, hidden])],
                          [numpy_helper.from_array(w_qkv, "wqkv"), numpy_helper.from_array(b_qkv, "bqkv"),
                           numpy_helper.from_array(w_out, "wout")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, 5, hidden)).astype(np.float32)

    import onnxruntime as ort

    def run(m: object) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # type: ignore[attr-defined]

    ref = run(model)
    ranges = _int8.matmul_input_ranges(model, [{"x": x}])
    assert set(ranges) == {"ctx"}
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    assert _int8.smooth_quantize_dynamic(smoothed, ranges, alpha=0.5) == 1
    ops = [n.op_type for n in smoothed.graph.node]
    assert ops == ["Attention", "DynamicQuantizeMatMul"]  # the 1/s went into the value columns, no Mul
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    _int8.smooth_quantize_dynamic(plain, None)
    err_smoothed = float(np.abs(run(smoothed) - ref).max())
    err_plain = float(np.abs(run(plain) - ref).max())
    assert err_smoothed < err_plain  # the outlier's range moved into the weights
    assert err_smoothed < 0.05 * float(np.abs(ref).max())
