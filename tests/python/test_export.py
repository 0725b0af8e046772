"""Model tooling: `tailrank export` (checkpoint -> ONNX directory) and `tailrank optimize`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tailrank

import models

import onnx  # noqa: E402

from tailrank import CrossEncoder  # noqa: E402
from tailrank.cli import main  # noqa: E402
from tailrank.errors import ModelError  # noqa: E402
from tailrank.export import export  # noqa: E402
from tailrank.optimize import FidelityError, builtin_sample_pairs, kendall_tau, optimize  # noqa: E402



def _graph_io(model_dir: Path) -> tuple[dict[str, tuple[int, list[object]]], list[object]]:
    m = onnx.load(str(model_dir / "onnx" / "model.onnx"), load_external_data=False)

    def dims(v: object) -> list[object]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # type: ignore[attr-defined]

    inputs = {i.name: (i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input}
    return inputs, [(o.name, dims(o)) for o in m.graph.output]


@pytest.mark.parametrize(
    ("family", "types"), [("bert", True), ("distilbert", False), ("electra", True), ("roberta", False)]
)
def test_export_writes_a_ready_model_dir(tmp_path_factory, family, types):
    hf_dir, out = models.exported(tmp_path_factory, family, 1)
    assert (out / "onnx" / "model.onnx").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    inputs, outputs = _graph_io(out)
    want = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
    assert sorted(inputs) == sorted(want)
    for elem_type, dims in inputs.values():
        assert elem_type == onnx.TensorProto.INT64
        assert all(isinstance(d, str) for d in dims)  # dynamic batch and sequence axes
    assert outputs == [("logits", ["batch", 1])]
    # Atomic: no temporary directory is left beside the output.
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf", "onnx"]


def test_cli_export_in_a_subprocess(tmp_path):
    hf_dir = models.build_checkpoint("bert", tmp_path / "hf", num_labels=2)
    # The child imports the same tailrank as this process (installed, or an in-place build).
    here = os.path.dirname(os.path.dirname(tailrank.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tailrank.cli", "export", str(hf_dir), str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout
    assert CrossEncoder(tmp_path / "out", threads=1).n_labels == 2
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_export_force_replaces_and_errors_are_model_errors(tmp_path, tmp_path_factory, capsys):
    hf_dir, _ = models.exported(tmp_path_factory, "bert", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ModelError, match="already exists"):
        export(hf_dir, out)
    export(hf_dir, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "onnx" / "model.onnx").is_file()

    with pytest.raises(ModelError, match="config.json is missing"):
        export(tmp_path / "missing", tmp_path / "x")
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_mismatch_and_writes_nothing(tmp_path, tmp_path_factory):
    hf_dir, _ = models.exported(tmp_path_factory, "roberta", 1)
    with pytest.raises(ModelError, match="differs from PyTorch"):
        export(hf_dir, tmp_path / "out", tolerance=-1.0)  # no export can pass a negative tolerance
    assert list(tmp_path.iterdir()) == []


# --- optimize -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return models.exported(tmp_path_factory, "bert", 1)[1]


@pytest.fixture(scope="module")
def samples(bert_dir):
    return builtin_sample_pairs(bert_dir, queries=8, docs=12)


def test_fusion_keeps_parity(bert_dir, samples, tmp_path):
    report = optimize(bert_dir, tmp_path / "fused", sample_pairs=samples, threads=1)
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["kendall_tau"] == 1.0 and report["top1_kept"] == 1.0 and report["passed"]
    assert report["fused_operators"].get("Attention") == 2  # the fusion really happened
    assert json.loads((tmp_path / "fused" / "fidelity.json").read_text()) == report
    ce = CrossEncoder(tmp_path / "fused", threads=1)
    ref = CrossEncoder(bert_dir, threads=1)
    pairs = models.mixed_pairs(seed=1)
    np.testing.assert_allclose(ce.predict(pairs), ref.predict(pairs), atol=1e-4, rtol=0)


def test_int8_writes_fidelity(bert_dir, samples, tmp_path):
    report = optimize(bert_dir, tmp_path / "int8", precision="int8", sample_pairs=samples, min_tau=0.0, min_top1=0.0,
                      threads=1)
    written = json.loads((tmp_path / "int8" / "fidelity.json").read_text())
    assert written == report
    assert set(written) >= {"max_abs_logit_diff", "kendall_tau", "top10_overlap", "top1_kept", "passed"}
    assert written["precision"] == "int8" and 0 < written["max_abs_logit_diff"] < 1
    graph = onnx.load(str(tmp_path / "int8" / "onnx" / "model.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)  # 8-bit weights, int8 compute


def test_threshold_failure_refuses_without_force(bert_dir, samples, tmp_path, capsys):
    # A tau above 1 cannot be met: the refusal path, whatever the quantization error.
    with pytest.raises(FidelityError, match="below the fidelity thresholds") as err:
        optimize(bert_dir, tmp_path / "out", precision="int8", sample_pairs=samples, min_tau=1.5, threads=1)
    assert err.value.report["passed"] is False
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left

    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "documents": d}) + "\n" for q, d in samples[:3]))
    args = ["optimize", str(bert_dir), str(tmp_path / "out"), "--int8", "--sample-pairs", str(jsonl), "--threads", "1"]
    assert main([*args, "--min-tau", "1.5"]) == 3
    assert "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--min-tau", "1.5", "--force"]) == 0
    assert json.loads((tmp_path / "out" / "fidelity.json").read_text())["passed"] is False


HAS_OPENVINO = "OpenVINOExecutionProvider" in __import__("onnxruntime").get_available_providers()


def test_fp16(bert_dir, samples, tmp_path):
    report = optimize(bert_dir, tmp_path / "fp16", precision="fp16", sample_pairs=samples, min_tau=0.0, min_top1=0.0,
                      threads=1)
    assert report["max_abs_logit_diff"] < 0.05


@pytest.mark.skipif(HAS_OPENVINO, reason="OpenVINO is available here: test_bf16_on_openvino runs instead")
def test_bf16_refused_without_openvino(bert_dir, samples, tmp_path):
    with pytest.raises(ModelError, match="onnxruntime-openvino"):
        optimize(bert_dir, tmp_path / "bf16", precision="bf16", sample_pairs=samples)
    assert not (tmp_path / "bf16").exists()


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs onnxruntime-openvino (make test-openvino runs it)")
def test_bf16_on_openvino(bert_dir, samples, tmp_path):
    out = tmp_path / "bf16"
    report = optimize(bert_dir, out, precision="bf16", sample_pairs=samples, min_tau=0.0, min_top1=0.0, threads=1)
    assert report["runtime"] == {"device": "openvino", "precision": "bf16"}
    assert json.loads((out / "fidelity.json").read_text())["kendall_tau"] == report["kendall_tau"]
    assert json.loads((out / "tailrank.json").read_text()) == {"device": "openvino", "precision": "bf16"}
    # The fp32 graph itself: bf16 is how OpenVINO runs it, not what the file holds.
    assert (out / "onnx" / "model.onnx").read_bytes() == (bert_dir / "onnx" / "model.onnx").read_bytes()
    pairs = models.mixed_pairs(seed=5)
    fp32 = CrossEncoder(bert_dir, activation="none", threads=1, device="cpu").predict(pairs)
    bf16 = CrossEncoder(out, activation="none", threads=1)  # device "auto": what tailrank.json says
    assert bf16.device == "openvino" and bf16.inference_precision == "bf16"
    got = bf16.predict(pairs)
    assert 0 < np.abs(got - fp32).max() < 0.1  # bf16 matmuls really ran, and stay close
    assert report["kendall_tau"] > 0.8 and report["max_abs_logit_diff"] < 0.1
    on_cpu = CrossEncoder(out, activation="none", threads=1, device="cpu")
    np.testing.assert_array_equal(on_cpu.predict(pairs), fp32)
    # Gated like every precision: an unreachable threshold writes nothing.
    with pytest.raises(FidelityError):
        optimize(bert_dir, tmp_path / "strict", precision="bf16", sample_pairs=samples, min_tau=1.5, threads=1)
    assert not (tmp_path / "strict").exists()


def test_builtin_samples_and_kendall_tau(tmp_path_factory):
    for family in ("bert", "roberta", "xlm-roberta"):
        s = builtin_sample_pairs(models.exported(tmp_path_factory, family, 1)[1], queries=3, docs=12)
        assert len(s) == 3 and all(len(d) == 12 for _, d in s)
    import scipy.stats as scipy_stats
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 6, 30).astype(float)  # ties on purpose
        b = a + rng.normal(0, 2, 30)
        assert kendall_tau(a, b) == pytest.approx(scipy_stats.kendalltau(a, b).statistic)
