"""``tailrank bench`` end to end on a tiny seeded model and a 20-document BEIR folder."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest

from models import corpus, exported, exported_st, sample_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_beir(folder: Path, *, n_docs: int = 20, n_queries: int = 6, seed: int = 0) -> Path:
    """A seeded BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv (two relevant docs per query)."""
    rng = random.Random(seed)
    texts = corpus(seed, n_docs)
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"_id": f"d{i}", "title": f"title {i}", "text": t}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in range(n_queries):
            f.write(json.dumps({"_id": f"q{q}", "text": sample_text(rng, 5)}) + "\n")
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in range(n_queries):
            for d in rng.sample(range(n_docs), 2):
                f.write(f"q{q}\td{d}\t1\n")
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_beir(tmp_path_factory.mktemp("beir"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return exported(tmp_path_factory, "bert")


def check_png(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def check_latency(r: dict[str, Any], samples: int) -> None:
    lat = r["latency_ms"]
    order = [lat[k] for k in ("min", "p50", "p90", "p99", "p99.9", "max")]
    assert all(a <= b for a, b in zip(order, order[1:])), lat
    assert order[0] > 0
    assert r["samples"] == samples == len(r["raw_ns"])
    assert r["insufficient_samples"] == ["p90", "p99", "p99.9"] if samples < 10 else "p99.9" in r["insufficient_samples"]
    assert r["pairs_per_s"] > 0


def test_bench_end_to_end(bert: tuple[Path, Path], beir: Path, tmp_path: Path) -> None:
    from tailrank.cli import main

    hf_dir, onnx_dir = bert
    out = tmp_path / "out"
    argv = [
        "bench", "--reranker", str(onnx_dir), "--reranker-hf", str(hf_dir), "--dataset", str(beir),
        "--candidates", "8", "--queries", "4", "--repeats", "2", "--threads", "1", "--precisions", "fp32,int8,bf16",
        "--peers", "st,ort,flashrank", "--serve", "--rates", "2", "--serve-duration", "1", "--out", str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())

    for key in ("machine", "settings", "workload", "matmul_gflops", "optimize_fidelity", "systems", "quality", "serve"):
        assert key in res, key
    m = res["machine"]
    assert m["usable_cpus"] >= 1 and m["cpu_quota"] >= 1 and isinstance(m["cpu_flags"], list)
    assert m["packages"]["tailrank"] and m["packages"]["numpy"]
    assert res["settings"]["threads"] == 1 and res["settings"]["repeats"] == 2

    w = res["workload"]
    assert w["requests"] == 4 and w["candidates_per_request"] == [8] * 4 and w["pairs"] == 32
    assert w["median_request_gflop"] > 0 and len(w["request_gflop"]) == 4
    assert set(res["matmul_gflops"]) >= {"fp32", "int8"} and all(v > 0 for v in res["matmul_gflops"].values())

    systems = res["systems"]
    for name in ("tailrank-fp32", "tailrank-int8", "st-fp32", "ort-plain"):
        r = systems[name]
        check_latency(r, samples=8)
        assert r["pairs"] == 64
        assert r["ratio_to_floor"] >= 1 and r["ratio_to_floor_total"] >= 1, (name, r)
        fid = r["fidelity_vs_fp32"]
        assert -1 <= fid["kendall_tau_mean"] <= 1 and 0 <= fid["top10_overlap_mean"] <= 1
    assert systems["tailrank-fp32"]["fidelity_vs_fp32"]["kendall_tau_mean"] == 1.0
    # the st peer runs the same weights in PyTorch: same ranking
    assert systems["st-fp32"]["fidelity_vs_fp32"]["kendall_tau_mean"] > 0.9
    assert systems["tailrank-int8"]["precision"] == "int8"
    assert "fidelity_gate_passed" in systems["tailrank-int8"]
    # bf16 is refused by optimize on ONNX Runtime's CPU provider: skipped with its reason, not a crash
    assert "bf16" in systems["tailrank-bf16"]["skipped"]
    # FlashRank cannot run this model (not installed, or the model lacks files it reads): skipped with a reason
    if importlib.util.find_spec("flashrank") is None:
        assert systems["flashrank"]["skipped"].startswith("not installed")
    else:
        assert "skipped" in systems["flashrank"] or systems["flashrank"]["samples"] == 8

    opt = res["optimize_fidelity"]
    assert opt["int8"]["precision"] == "int8" and 0 < opt["int8"]["queries"]
    assert "skipped" in opt["bf16"]

    q = res["quality"]
    assert "skipped" in q["first_stage"]
    for name in ("tailrank-fp32", "tailrank-int8", "st-fp32", "ort-plain"):
        metrics = q["systems"][name]
        assert metrics["queries"] == 4
        assert 0 < metrics["ndcg@10"] <= 1
        assert metrics["recall@8"] == pytest.approx(1.0)  # every relevant doc is a candidate

    sv = res["serve"]
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        assert sv["skipped"].startswith("server not available")
    else:
        (rate,) = sv["rates"]
        assert rate["rate"] == 2.0 and rate["offered"] >= 0 and rate["ok"] + rate["rejected"] <= rate["offered"]
        assert rate["ok"] == len(rate["raw_ok_ns"]) and 0 <= rate["rate_429"] <= 1
        if rate["ok"]:
            lat = rate["latency_ms"]
            assert lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
        assert "latency_vs_load.png" in res["plots"]

    report = (out / "report.md").read_text()
    for section in ("## Library mode", "## Quality", "## Serve mode", "tailrank-int8", "skipped: not installed"
                    if importlib.util.find_spec("flashrank") is None else "flashrank"):
        assert section in report, section
    assert res["plots"] and "latency_cdf.png" in res["plots"] and "speed_vs_quality.png" in res["plots"]
    for name in res["plots"]:
        check_png(out / name)


def test_bench_first_stage_and_embedding_cache(
    bert: tuple[Path, Path], beir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tailrank
    from tailrank.cli import main

    _, onnx_dir = bert
    _, embedder_dir = exported_st(tmp_path_factory, pooling="mean", normalize=True)
    argv = ["bench", "--reranker", str(onnx_dir), "--embedder", str(embedder_dir), "--dataset", str(beir),
            "--candidates", "5", "--queries", "3", "--threads", "1", "--precisions", "fp32", "--peers", "st",
            "--warmup", "1", "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["workload"]["source"].startswith("first stage")
    assert res["workload"]["candidates_per_request"] == [5, 5, 5]
    fs = res["quality"]["first_stage"]
    assert fs["queries"] == 3 and 0 <= fs["ndcg@10"] <= 1 and 0 <= fs["recall@5"] <= fs["recall@10"] <= 1
    assert res["systems"]["st-fp32"]["skipped"].startswith("needs the Hugging Face checkpoint")
    assert res["serve"] is None
    cached = Path(res["workload"]["embedding_cache"])
    assert cached.is_file() and cached.parent.parent == tmp_path / "cache"

    texts_encoded: list[int] = []
    encode = tailrank.Embedder.encode

    def counting(self: Any, texts: Any, *args: Any, **kwargs: Any) -> Any:
        texts_encoded.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(tailrank.Embedder, "encode", counting)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert texts_encoded == [3]  # only the queries: the corpus embeddings came from the cache
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["workload"]["query_ids"] == res["workload"]["query_ids"]
    assert again["quality"]["first_stage"] == fs


def test_bench_rejects_bad_arguments(beir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tailrank.cli import main

    assert main(["bench", "--reranker", str(tmp_path), "--dataset", str(beir), "--precisions", "fp8"]) == 2
    assert "unknown precision" in capsys.readouterr().err


def test_bench_names_the_extra_before_any_work(bert: tuple[Path, Path], beir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    import tailrank.bench.suite as suite
    from tailrank.cli import main

    _, onnx_dir = bert
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed: find_spec and import both fail
    prepared: list[Any] = []
    monkeypatch.setattr(suite, "prepare_reranker", lambda *a: prepared.append(a))
    out = tmp_path / "out"
    argv = ["bench", "--reranker", str(onnx_dir), "--dataset", str(beir), "--precisions", "fp32,int8",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one message
    assert "onnx" in err and "int8" in err and 'pip install "tailrank[bench]"' in err
    assert prepared == [] and not out.exists()  # nothing measured, nothing written


def test_bench_without_matplotlib_writes_results_and_report(bert: tuple[Path, Path], beir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from tailrank.cli import main

    _, onnx_dir = bert
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    argv = ["bench", "--reranker", str(onnx_dir), "--dataset", str(beir), "--candidates", "4", "--queries", "2",
            "--threads", "1", "--precisions", "fp32", "--peers", "ort", "--warmup", "0", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "matplotlib (the PNG plots)" in err and 'pip install "tailrank[bench]"' in err
    res = json.loads((out / "results.json").read_text())
    assert res["plots"] == [] and "matplotlib is not installed" in res["plots_skipped"]
    assert "matplotlib" in res["not_installed"]
    assert res["systems"]["tailrank-fp32"]["samples"] == 2 and res["systems"]["ort-plain"]["samples"] == 2
    report = (out / "report.md").read_text()
    assert "Plots: none, matplotlib is not installed" in report and "tailrank-fp32" in report
    assert not list(out.glob("*.png"))


def test_bench_writes_numbers_before_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tailrank.bench.suite as suite

    def broken_plot(*args: Any) -> None:
        raise RuntimeError("plot failed")

    monkeypatch.setattr(suite, "plot_latency_cdf", broken_plot)
    res = {"systems": {"a": {"raw_ns": [1, 2], "pairs_per_s": 1.0}}, "quality": {}, "serve": None}
    monkeypatch.setattr(suite, "markdown", lambda r: "report of " + ",".join(r["systems"]))
    with pytest.raises(RuntimeError, match="plot failed"):
        suite.write_outputs(res, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["systems"]["a"]["raw_ns"] == [1, 2]
    assert (tmp_path / "report.md").read_text() == "report of a"


def test_bench_reports_why_a_backend_peer_cannot_run(bert: tuple[Path, Path], beir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tailrank.cli import main

    hf_dir, onnx_dir = bert
    monkeypatch.setitem(sys.modules, "optimum", None)  # optimum absent: both backends need it
    out = tmp_path / "out"
    argv = ["bench", "--reranker", str(onnx_dir), "--reranker-hf", str(hf_dir), "--dataset", str(beir),
            "--candidates", "4", "--queries", "2", "--threads", "1", "--precisions", "fp32",
            "--peers", "st-onnx-O2,st-openvino-qint8", "--warmup", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for name in ("st-onnx-O2", "st-openvino-qint8"):
        reason = res["systems"][name]["skipped"]
        assert "ptimum" in reason, reason  # names the package, not dropped silently
    assert "optimum" in res["not_installed"]


def test_import_failure_tells_missing_from_conflicting() -> None:
    from tailrank.bench.suite import _import_failure

    assert _import_failure(ImportError("x", name="no_such_package_xyz.sub")) == "not installed (no_such_package_xyz)"
    got = _import_failure(ImportError("cannot import name 'is_offline_mode'", name="json.decoder"))
    assert got.startswith("import failed, a dependency conflict") and "is_offline_mode" in got
    assert _import_failure(ImportError("Using the ONNX backend requires optimum")).startswith("cannot import: Using")


def test_floor_probes_name_the_kernel_that_set_each_rate() -> None:
    from tailrank.bench.floor import floor_rate, matmul_probes, matmul_rates

    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    probes = matmul_probes(config, 1, ("fp32", "int8"))
    for p, r in probes.items():
        assert r["rate"] == max(r["kernels"].values()) and r["kernels"][r["kernel"]] == r["rate"] > 0, (p, r)
    # ONNX Runtime's own kernels are probed beside torch's: a slow kernel of one library is no floor
    assert "onnxruntime MatMul (MLAS fp32)" in probes["fp32"]["kernels"] and "torch fp32 GEMM" in probes["fp32"]["kernels"]
    assert {"onnxruntime MatMulInteger (MLAS u8 x s8)", "torch _int_mm (s8 x s8)"} <= set(probes["int8"]["kernels"]) or \
        "onnxruntime MatMulInteger (MLAS u8 x s8)" in probes["int8"]["kernels"]
    rates = matmul_rates(config, 1, ("fp32",))
    assert set(rates) == {"fp32"} and rates["fp32"] > 0
    assert floor_rate({"fp32": 2.0, "int8": 1.0}, "int8") == (2.0, "fp32")
    with pytest.raises(ValueError, match="no matmul probe"):
        matmul_probes(config, 1, ("fp8",))
