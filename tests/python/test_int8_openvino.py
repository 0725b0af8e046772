"""``optimize --int8-openvino`` (NNCF static int8, run on OpenVINO's int8 kernels) on seeded small
models of every family: the graph holds int8 weights and activation quantizers, the gate judges
queries the calibration never saw, and ``--auto`` can choose it. Without onnxruntime-openvino it
is refused; ``make test-openvino`` runs the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models

onnx = pytest.importorskip("onnx")

from tailrank import CrossEncoder  # noqa: E402
from tailrank._auto import optimize_auto  # noqa: E402
from tailrank.errors import ModelError  # noqa: E402
from tailrank.optimize import FidelityError, builtin_sample_pairs, fidelity, optimize  # noqa: E402

HAS_OPENVINO = "OpenVINOExecutionProvider" in __import__("onnxruntime").get_available_providers()
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs onnxruntime-openvino (make test-openvino runs it)")


@pytest.mark.skipif(HAS_OPENVINO, reason="OpenVINO is available here: the int8-openvino tests run instead")
def test_int8_openvino_is_refused_without_openvino(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = models.exported(tmp_path_factory, "bert", 1)[1]
    with pytest.raises(ModelError, match="--int8-openvino runs on ONNX Runtime's OpenVINO execution provider"):
        optimize(model_dir, tmp_path / "q", precision="int8-openvino")
    assert not (tmp_path / "q").exists()


@needs_openvino
@pytest.mark.parametrize("family", models.FAMILIES)
def test_int8_openvino_keeps_rankings_on_held_out_queries(family: str, tmp_path: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("nncf")
    model_dir = models.exported(tmp_path_factory, family, 1)[1]
    # These seeded models are 32 wide with a wide initialisation, so a per-tensor activation scale
    # costs them more than a trained model (the SciFact cross-encoder's gate: benchmarks/README.md):
    # their bound is tau 0.90 and top-1 0.85.
    samples = builtin_sample_pairs(model_dir, queries=40, docs=8, seed=3)
    out = tmp_path / "q"
    report = optimize(model_dir, out, precision="int8-openvino", sample_pairs=samples, threads=1,
                      min_tau=0.90, min_top1=0.85)
    assert report["passed"] and report["kendall_tau"] >= 0.90 and report["top1_kept"] >= 0.85
    assert report["calibration"]["queries"] == 20 and report["calibration"]["pairs"] == 160
    assert report["calibration"]["gated_on_other_queries"] is True and report["queries"] == 20
    assert report["calibration"]["kept_in_float"]  # the FFN down-projections
    runtime = json.loads((out / "tailrank.json").read_text())
    assert runtime["device"] == "openvino" and runtime["precision"] in ("bf16", "fp32")
    assert "avx512_vnni" in runtime["requires_cpu_flags"]
    graph = onnx.load(str(out / "onnx" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    # Weights stored as int8 and activations quantized: what OpenVINO turns into int8 matmuls.
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) >= 4 and ops.count("QuantizeLinear") >= 4
    ce = CrossEncoder(out, activation="none", threads=1)  # device "auto": what tailrank.json says
    assert ce.device == "openvino"
    again = fidelity(model_dir, out, samples[1::2], threads=1, candidate_device="openvino")
    assert again["kendall_tau"] == pytest.approx(report["kendall_tau"], abs=1e-9)
    pairs = models.mixed_pairs(seed=5)
    ref = CrossEncoder(model_dir, activation="none", threads=1, device="cpu").predict(pairs)
    got = ce.predict(pairs)
    assert 0 < np.abs(got - ref).max() < 0.5  # int8 really ran, and stays close


@needs_openvino
def test_int8_openvino_is_refused_below_its_gate(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("nncf")
    model_dir = models.exported(tmp_path_factory, "bert", 1)[1]
    samples = builtin_sample_pairs(model_dir, queries=4, docs=8, seed=1)
    with pytest.raises(FidelityError, match="int8-openvino model below"):
        optimize(model_dir, tmp_path / "refused", precision="int8-openvino", sample_pairs=samples, threads=1, min_tau=1.5)
    assert not (tmp_path / "refused").exists()


@needs_openvino
def test_auto_picks_int8_openvino_with_a_portable_fallback(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("nncf")
    model_dir = models.exported(tmp_path_factory, "bert", 1)[1]
    samples = builtin_sample_pairs(model_dir, queries=8, docs=8, seed=2)
    times = {"fp32": 3.0, "int8-openvino": 1.0}

    def timer(path: Path, s: Any, threads: Any) -> float:
        return times[path.name]

    out = tmp_path / "auto"
    record = optimize_auto(model_dir, out, sample_pairs=samples, threads=1, min_tau=0.0, min_top1=0.0,
                           candidates=["fp32", "int8-openvino"], cpu_flags=frozenset({"avx512f", "avx512_vnni"}),
                           timer=timer)
    assert record["decision"] == "int8-openvino" and record["fallback"] == "fp32"
    runtime = json.loads((out / "tailrank.json").read_text())
    # This CPU flag set has no bf16: the float ops' precision is the one the candidate was built with.
    assert runtime["device"] == "openvino" and runtime["precision"] == json.loads(
        (out / "fidelity.json").read_text())["runtime"]["precision"]
    assert runtime["fallback"] == {"onnx": "onnx/fallback.onnx", "device": "cpu", "precision": "fp32"}
    assert CrossEncoder(out, threads=1).device == "openvino"
