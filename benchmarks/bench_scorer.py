"""Cross-encoder scoring speed: tailrank against the usual ways to run the same model.

    PYTHONPATH=python python benchmarks/bench_scorer.py --data ../shared/data/scifact \
        --model ../shared/models/scifact-minilm-l6-ce --queries 20 --threads 2

Workload: the first ``--queries`` SciFact test claims (qrels/test.tsv order), each against the same
``--candidates`` abstracts per claim, a seeded random sample of the corpus (title + " " + text);
the model's own max_length. One request = one claim and its candidates, scored and ranked.
Every system gets the same model weights, the same pairs and the same thread budget; two warm-up
requests per system are excluded; each system then serves every request ``--repeats`` times, in
the same order, one at a time (single client).

Systems (skipped with a reason when not installed):
  tailrank-*     tailrank.CrossEncoder on ONNX Runtime; "docstore" scores pre-tokenized documents
                 (the product path), "texts" tokenizes every document on every request (cache off).
                 Precisions come from `tailrank optimize` (fusions; int8; bf16) and are kept only if
                 they pass its fidelity thresholds.
  st-fp32/bf16   sentence-transformers CrossEncoder (PyTorch), batch_size 32.
  st-onnx*       sentence-transformers CrossEncoder(backend="onnx"): as exported; O1-O4 through its
                 export_optimized_onnx_model; qint8 through export_dynamic_quantized_onnx_model
                 ("avx512_vnni"). Each runs in a worker process, with --st-onnx-path first on its
                 PYTHONPATH when optimum-onnx conflicts with this environment's transformers.
  st-openvino*   the same with backend="openvino"; qint8 is OpenVINO static int8 as
                 export_static_quantized_openvino_model makes it (OVQuantizer, default config, pairs
                 padded to 384), calibrated on 300 held-out SciFact pairs instead of its GLUE download
                 (no network here). --st-openvino-path as above.
  ort-plain      onnxruntime on the exported fp32 graph, tokenizers encode_batch, pairs in input
                 order, batches of 32 padded to their longest pair.
  flashrank      FlashRank's Ranker pointed at the same exported fp32 graph (offline), its session
                 rebuilt with the same thread budget.

The compute floor of a precision is the request's real-token FLOPs (from the model config; padding
excluded) divided by the matmul rate of that precision measured in this run (same threads, a
[4096, H] x [H, FFN] product, the fastest of every kernel installed for it: torch and ONNX Runtime
MLAS for fp32, torch oneDNN for bf16, torch _int_mm and ONNX Runtime MatMulInteger /
DynamicQuantizeMatMul for int8; fp32's rate where it is faster); results name the kernel.

The measurement pieces (systems, timing, floor, fidelity, machine facts) live in the package,
``tailrank.bench``, shared with ``tailrank bench``; this file only chooses the systems and
formats the suite's table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DEFAULT_DATA, DEFAULT_OUT, environment, environment_line, markdown_table, write_json, write_text  # noqa: E402

from tailrank._ort import openvino_available  # noqa: E402
from tailrank.bench import peers  # noqa: E402
from tailrank.bench.fidelity import ranking_agreement  # noqa: E402
from tailrank.bench.floor import floor_rate, matmul_probes, real_token_flops, request_lengths  # noqa: E402
from tailrank.bench.measure import Request, Scorer, percentiles_ms  # noqa: E402
from tailrank.bench.models import prepare_precision, prepare_reranker  # noqa: E402
from tailrank.bench.workload import random_workload  # noqa: E402

DEFAULT_MODEL = str(Path(DEFAULT_DATA).parent.parent / "models" / "scifact-minilm-l6-ce")
PRECISION_OF = {"st-bf16": "bf16", "tailrank-int8": "int8", "tailrank-int8-static": "int8", "tailrank-int8-smooth": "int8", "tailrank-int8-openvino": "int8", "tailrank-bf16": "bf16", "st-onnx-qint8": "int8",
                "st-openvino-qint8": "int8"}
# Systems on ONNX Runtime's OpenVINO provider: the onnxruntime-openvino wheel replaces onnxruntime,
# so unless this process has it they run in a worker process of --openvino-python (same workload,
# threads and timing code), e.g. the .venv-openvino that `make test-openvino` builds.
OPENVINO_SYSTEMS = ("tailrank-ov-fp32", "tailrank-bf16", "tailrank-int8-openvino")
DEFAULT_OPENVINO_PYTHON = Path(__file__).resolve().parent.parent / ".venv-openvino" / "bin" / "python"


def add_arguments(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF cross-encoder checkpoint directory")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--systems",
        default="tailrank-fp32-docstore,tailrank-fp32-texts,tailrank-opt-fp32,tailrank-int8,tailrank-int8-static,tailrank-int8-smooth,"
        "tailrank-ov-fp32,"
        "tailrank-bf16,tailrank-int8-openvino,st-fp32,st-bf16," + ",".join(peers.ST_BACKENDS) + ",ort-plain,flashrank",
    )
    p.add_argument("--openvino-python", default=str(DEFAULT_OPENVINO_PYTHON),
                   help="a Python with onnxruntime-openvino for the OpenVINO systems (default: .venv-openvino)")
    p.add_argument("--st-onnx-path", default=None,
                   help="a folder of packages put first on the PYTHONPATH of the st-onnx* workers (optimum-onnx "
                   "with the transformers it needs), when they conflict with this environment's")
    p.add_argument("--st-openvino-path", default=None,
                   help="the same for the st-openvino* workers (optimum-intel, openvino, nncf)")
    p.add_argument("--fidelity-queries", type=int, default=30,
                   help="held-out claims (x 50 documents) for the optimize gate and calibration (default 30)")
    p.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help="directory for exported models (default: a temp dir)")


def load_workload(data: str, n_queries: int, n_candidates: int, seed: int) -> list[Request]:
    """The first ``n_queries`` test claims, each against a fresh seeded sample of the corpus."""
    return random_workload(data, n_queries, n_candidates, seed).requests


def _fidelity_samples(args: argparse.Namespace) -> list[Request]:
    """Held-out claims (not the timed ones) for the optimize gate."""
    return load_workload(args.data, args.queries + args.fidelity_queries, 50, args.seed + 1)[args.queries :]


def _openvino_factory(name: str, fp32_dir: Path, work: Path, args: argparse.Namespace
                      ) -> tuple[Callable[[], Scorer] | None, dict[str, Any] | None]:
    """The factory of an OpenVINO system in this process (and, for bf16, its optimize report)."""
    if name == "tailrank-ov-fp32":
        return (lambda: peers.TailrankDocStore(fp32_dir, args.threads, device="openvino")), None
    prec = name.removeprefix("tailrank-")
    out, rep = prepare_precision(fp32_dir, work, prec, samples=_fidelity_samples(args), threads=args.threads)
    if out is None or not rep.get("passed", True):
        return None, rep | ({} if out is None else {"skipped": "below the fidelity thresholds"})
    return (lambda: peers.TailrankDocStore(out, args.threads, device="openvino")), rep


def _calibration_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Held-out (query, document) pairs for static quantization (none of them timed)."""
    return [(q, d) for q, docs in _fidelity_samples(args) for d in docs][:300]


def run_worker(args: argparse.Namespace) -> int:
    """--worker NAME: times one OpenVINO or sentence-transformers-backend system on the suite's
    workload in this process; writes --worker-out JSON (latencies, scores, package versions)."""
    from tailrank.bench.machine import package_version

    work = Path(args.work)
    workload = load_workload(args.data, args.queries, args.candidates, args.seed)
    out: dict[str, Any] = {"versions": {d: package_version(d) for d in (
        "sentence-transformers", "transformers", "optimum", "optimum-onnx", "optimum-intel", "openvino", "nncf",
        "onnxruntime", "onnxruntime-openvino", "torch")}}
    if args.worker.startswith("st-openvino"):
        # OpenVINO's CPU default precision is bf16 on CPUs with AVX512-BF16 or AMX: the row's
        # precision is what OpenVINO ran, not the graph's type.
        import openvino

        out["openvino_inference_precision"] = str(openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    if args.worker in peers.ST_BACKENDS:
        factory: Callable[[], Scorer] | None = lambda: peers.st_backend_system(  # noqa: E731
            args.model, args.threads, args.max_length, args.worker, work, _calibration_pairs(args))
        rep = None
    else:
        fp32_dir, _ = prepare_reranker(args.model, work)
        factory, rep = _openvino_factory(args.worker, fp32_dir, work, args)
    out["optimize"] = rep
    if factory is None:
        out["skipped"] = (rep or {}).get("skipped", "not available")
    else:
        lat_ns, scores = peers.time_system(factory, workload, warmup=2, repeats=args.repeats)
        out.update(lat_ns=lat_ns, scores=[s.tolist() for s in scores])
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


class _Skipped(Exception):
    def __init__(self, reason: str, report: dict[str, Any] | None) -> None:
        super().__init__(reason)
        self.report = report


def _in_worker(name: str, work: Path, args: argparse.Namespace, python: str, path: str | None = None
               ) -> tuple[list[int], list[np.ndarray], dict[str, Any]]:
    """Runs ``--worker name`` under ``python`` (``path`` first on its PYTHONPATH); returns
    (latencies, scores, the worker's JSON). A failing worker raises _Skipped with its last error line."""
    out_path = work / f"{name}.worker.json"
    out_path.unlink(missing_ok=True)
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--worker-out", str(out_path),
           "--data", args.data, "--model", args.model, "--queries", str(args.queries), "--candidates",
           str(args.candidates), "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed",
           str(args.seed), "--work", str(work), "--max-length", str(args.max_length), "--fidelity-queries",
           str(args.fidelity_queries)]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent / "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, here, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln.split(":")[0]] or lines[-1:]
        raise _Skipped(f"the worker failed: {errors[-1].strip() if errors else proc.returncode}", None)
    got = json.loads(out_path.read_text())
    if "skipped" in got:
        raise _Skipped(got["skipped"], got.get("optimize"))
    return got["lat_ns"], [np.asarray(s, dtype=np.float32) for s in got["scores"]], got


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    work = Path(args.work or tempfile.mkdtemp(prefix="tailrank-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(args.model) / "config.json").read_text())
    workload = load_workload(args.data, args.queries, args.candidates, args.seed)

    fp32_dir, _ = prepare_reranker(args.model, work)
    # Names, not a substring test: "tailrank-int8" is inside "tailrank-int8-openvino".
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    samples = _fidelity_samples(args)
    fidelity: dict[str, Any] = {}
    model_dirs = {"fp32": fp32_dir}
    for prec in ("opt-fp32", "int8", "int8-static", "int8-smooth"):
        if f"tailrank-{prec}" not in systems:
            continue
        out, rep = prepare_precision(fp32_dir, work, prec, samples=samples, threads=args.threads)
        fidelity[prec] = rep
        if out is not None and rep.get("passed", True):
            model_dirs[prec] = out
        elif out is not None:
            fidelity[prec]["skipped"] = "below the fidelity thresholds"

    lengths_per_request, max_length = request_lengths(fp32_dir, workload)
    args.max_length = max_length
    flops = [real_token_flops(config, lens) for lens in lengths_per_request]
    probes = matmul_probes(config, args.threads, ("fp32", "bf16", "int8"))
    rates = {k: v["rate"] for k, v in probes.items()}

    factories: dict[str, Callable[[], Scorer]] = {
        "tailrank-fp32-docstore": lambda: peers.TailrankDocStore(model_dirs["fp32"], args.threads),
        "tailrank-fp32-texts": lambda: peers.tailrank_texts(model_dirs["fp32"], args.threads),
        "st-fp32": lambda: peers.st_system(args.model, args.threads, max_length),
        "st-bf16": lambda: peers.st_system(args.model, args.threads, max_length, bf16=True),
        "ort-plain": lambda: peers.ort_plain_system(fp32_dir, args.threads, max_length),
        "flashrank": lambda: peers.flashrank_system(fp32_dir, args.threads, max_length, work / "flashrank"),
    }
    for prec in ("opt-fp32", "int8", "int8-static", "int8-smooth"):
        if prec in model_dirs:
            factories[f"tailrank-{prec}"] = (lambda p: lambda: peers.TailrankDocStore(model_dirs[p], args.threads))(prec)
    here = openvino_available()
    for name in OPENVINO_SYSTEMS:
        if name in systems and here:
            factory, rep = _openvino_factory(name, fp32_dir, work, args)
            if rep is not None:
                fidelity[name.removeprefix("tailrank-")] = rep
            if factory is not None:
                factories[name] = factory

    results: dict[str, Any] = {}
    scores_of: dict[str, list[np.ndarray]] = {}
    for name in systems:
        if name in peers.ST_BACKENDS:
            # Always a worker: optimum may need an overlay of packages (--st-*-path), and a worker
            # that fails to import or export is reported with its error instead of ending the run.
            overlay = args.st_onnx_path if name.startswith("st-onnx") else args.st_openvino_path
            try:
                lat_ns, scores_of[name], got = _in_worker(name, work, args, sys.executable, overlay)
            except _Skipped as e:
                results[name] = {"skipped": str(e) + (f" (with {overlay} first on PYTHONPATH)" if overlay else
                                                      " (in this environment; see --st-onnx-path / --st-openvino-path)")}
                continue
            results[name] = _timing(name, lat_ns, flops, rates, args) | {"versions": got["versions"],
                                                                         "package_overlay": overlay}
            # openvino 2026 prints the hint as "<Type: 'bfloat16'>", earlier releases as "bf16".
            hint = got.get("openvino_inference_precision", "").lower()
            if name == "st-openvino" and ("bf16" in hint or "bfloat16" in hint):
                results[name] |= _timing(name, lat_ns, flops, rates, args, precision="bf16")
                results[name]["openvino_inference_precision"] = got["openvino_inference_precision"]
            continue
        if name in OPENVINO_SYSTEMS and not here:
            if not Path(args.openvino_python).is_file():
                results[name] = {"skipped": f"needs onnxruntime-openvino: no {args.openvino_python} "
                                 "(make test-openvino builds .venv-openvino)"}
                continue
            try:
                lat_ns, scores_of[name], got = _in_worker(name, work, args, args.openvino_python)
                rep = got.get("optimize")
            except _Skipped as e:
                results[name] = {"skipped": str(e)}
                rep = e.report
            else:
                results[name] = _timing(name, lat_ns, flops, rates, args)
            if rep is not None:
                fidelity[name.removeprefix("tailrank-")] = rep
            continue
        if name not in factories:
            results[name] = {"skipped": fidelity.get(name.removeprefix("tailrank-"), {}).get("skipped", "not available")}
            continue
        try:
            lat_ns, scores_of[name] = peers.time_system(factories[name], workload, warmup=2, repeats=args.repeats)
        except ImportError as e:
            results[name] = {"skipped": f"not installed ({e.name})"}
            continue
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this model is reported, not fatal
            if name == "tailrank-fp32-docstore":
                raise
            results[name] = {"skipped": f"{type(e).__name__}: {e}"}
            continue
        results[name] = _timing(name, lat_ns, flops, rates, args)
        gc.collect()

    ref = scores_of.get("tailrank-fp32-docstore") or scores_of.get("st-fp32")
    if ref:
        for name, got in scores_of.items():
            results[name]["fidelity_vs_fp32"] = ranking_agreement(ref, got)
    med_len = float(np.median([x for lens in lengths_per_request for x in lens]))
    return {
        "suite": "scorer",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "work"} | {"max_length": max_length},
        "workload": {
            "requests": len(workload),
            "candidates": args.candidates,
            "median_pair_tokens": med_len,
            "median_request_gflop": float(np.median(flops)) / 1e9,
        },
        "matmul_gflops": {k: v / 1e9 for k, v in rates.items()},
        "floor_kernels": {k: {"kernel": v["kernel"], "gflops": {n: r / 1e9 for n, r in v["kernels"].items()}}
                          for k, v in probes.items()},
        "optimize_fidelity": fidelity,
        "systems": results,
    }


def _timing(name: str, lat_ns: list[int], flops: list[float], rates: dict[str, float],
            args: argparse.Namespace, precision: str | None = None) -> dict[str, Any]:
    stats = percentiles_ms(lat_ns)
    prec = precision or PRECISION_OF.get(name, "fp32")
    floor_s = float(np.median(flops)) / floor_rate(rates, prec)[0]
    print(f"[scorer] {name}: p50 {stats['p50']:.1f} ms p99 {stats['p99']:.1f} ms", file=sys.stderr)
    return {
        "latency_ms": stats,
        "requests": len(lat_ns),
        "pairs_per_s": args.candidates * len(lat_ns) / (sum(lat_ns) / 1e9),
        "precision": prec,
        "floor_ms": floor_s * 1e3,
        "ratio_to_floor": stats["p50"] / 1e3 / floor_s,
        "raw_ns": lat_ns,
    }


def markdown(res: dict[str, Any]) -> str:
    sysres = res["systems"]
    st = sysres.get("st-fp32", {}).get("latency_ms", {}).get("p50")
    ort_p50 = sysres.get("ort-plain", {}).get("latency_ms", {}).get("p50")
    rows = []
    for name, r in sysres.items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"]] + [""] * 8)
            continue
        lat = r["latency_ms"]
        fid = r.get("fidelity_vs_fp32", {})
        rows.append(
            [
                name,
                r["precision"],
                f"{lat['p50']:.0f}",
                f"{lat['p99']:.0f}",
                f"{lat['p99'] / lat['p50']:.2f}",
                f"{r['pairs_per_s']:.0f}",
                f"{st / lat['p50']:.2f}x" if st else "",
                f"{ort_p50 / lat['p50']:.2f}x" if ort_p50 else "",
                f"{r['ratio_to_floor']:.2f}",
                f"{fid.get('kendall_tau_mean', float('nan')):.3f} / {fid.get('top10_overlap_mean', float('nan')):.2f}",
            ]
        )
    w = res["workload"]
    head = (
        f"### Scorer: {w['requests']} requests x {w['candidates']} candidates, median pair {w['median_pair_tokens']:.0f} tokens, "
        f"{w['median_request_gflop']:.0f} GFLOP per request; {res['settings']['threads']} threads for every system\n\n"
        f"{environment_line(res['environment'])}\n\n"
        f"Matmul rate measured in this run (GFLOP/s, the fastest kernel per precision): "
        + ", ".join(f"{k} {v:.0f} ({res['floor_kernels'][k]['kernel']})" for k, v in res["matmul_gflops"].items())
        + "\n\n"
    )
    return head + markdown_table(
        ["system", "precision", "p50 ms", "p99 ms", "p99/p50", "pairs/s", "vs st-fp32", "vs ort-plain", "p50 / floor", "tau / top-10 vs fp32"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    res = run(args)
    md = markdown(res)
    write_json(Path(args.out) / "scorer.json", res)
    write_text(Path(args.out) / "scorer.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
