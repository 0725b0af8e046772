#!/usr/bin/env python3
"""One short GPU check of tailrank's CrossEncoder: providers, CUDA-vs-CPU fidelity, request time.

Usage:
    PYTHONPATH=python python scripts/gpu_check.py [--model EXPORTED_DIR | --hf HF_DIR] [--fp16]

Without --model it exports ../shared/models/scifact-minilm-l6-ce (or $TAILRANK_SHARED/models/...)
to a temporary directory. Exits 0 with a message when onnxruntime has no CUDA provider (the
CPU-only wheel, or no visible GPU), so it is safe to run anywhere.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if any((REPO / "python" / "tailrank").glob("_core*.so")):  # a dev build; else the installed package
    sys.path.insert(0, str(REPO / "python"))


def _shared() -> Path:
    return Path(os.environ.get("TAILRANK_SHARED", REPO.parent / "shared"))


def _requests(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """n (claim, 100 abstracts) requests from SciFact when present, else synthetic text."""
    data = _shared() / "data" / "scifact"
    rng = random.Random(seed)
    if (data / "corpus.jsonl.gz").is_file():
        with gzip.open(data / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [(d["title"] + " " + d["text"]).strip() for d in map(json.loads, f)]
        with open(data / "queries.jsonl", encoding="utf-8") as f:
            queries = [json.loads(line)["text"] for line in f]
    else:
        words = "cell protein gene expression patients disease risk study results human tumor therapy".split()
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 300))) for _ in range(2000)]
        queries = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    return [(rng.choice(queries), rng.sample(docs, 100)) for _ in range(n)]


def _time(ce: object, requests: list[tuple[str, list[str]]]) -> dict[str, float]:
    lat = []
    for q, docs in requests:
        t = time.perf_counter()
        ce.rank(q, docs)  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t)
    ms = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "pairs_per_s": float(100 * len(lat) / ms.sum() * 1000)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a model directory made by `tailrank export`")
    p.add_argument("--hf", type=Path, help="a Hugging Face checkpoint to export first")
    p.add_argument("--requests", type=int, default=20, help="timed 100-candidate requests (default 20)")
    p.add_argument("--fp16", action="store_true", help="also time an fp16 model made by `tailrank optimize`")
    p.add_argument("--reference", type=Path, help="JSON {requests: [{query, documents, logits}]} with CPU fp32 "
                   "logits made elsewhere: checks --model on CUDA against them (for machines without the fp32 model)")
    p.add_argument("--repeat", type=int, default=5, help="timed passes over the reference requests (default 5)")
    args = p.parse_args()

    import onnxruntime as ort

    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} ({ort.get_device()}); providers: {providers}")
    if "CUDAExecutionProvider" not in providers:
        print("no CUDAExecutionProvider: this is the CPU-only onnxruntime wheel or CUDA is not set up "
              "(pip install onnxruntime-gpu); nothing to check on a GPU")
        return 0

    from tailrank import CrossEncoder

    if args.reference is not None:
        return _check_reference(args)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            hf = args.hf or _shared() / "models" / "scifact-minilm-l6-ce"
            if not hf.is_dir():
                print(f"no model: pass --model or --hf (looked for {hf})")
                return 2
            from tailrank.export import export

            t = time.perf_counter()
            model = export(hf, Path(tmp) / "model")
            print(f"exported {hf} in {time.perf_counter() - t:.1f}s")

        gpu = CrossEncoder(model, device="cuda", activation="none")
        if gpu.device != "cuda":
            print("the CUDA provider did not initialise (see the log line above); nothing to check on a GPU")
            return 0
        cpu = CrossEncoder(model, device="cpu", activation="none")
        requests = _requests(args.requests + 3)
        worst, taus = 0.0, []
        from tailrank.optimize import kendall_tau

        for q, docs in requests[:3]:
            a = cpu.predict([(q, d) for d in docs])
            b = gpu.predict([(q, d) for d in docs])
            worst = max(worst, float(np.abs(a - b).max()))
            taus.append(kendall_tau(a.astype(np.float64), b.astype(np.float64)))
        print(f"fidelity CUDA vs CPU on 300 pairs: max |logit diff| {worst:.2e}, Kendall tau {np.mean(taus):.4f}")
        print(f"CUDA fp32: {gpu!r}")
        gpu.rank(*requests[0])  # warm
        print("CUDA fp32, 100 candidates:", json.dumps(_time(gpu, requests[3:])))
        print("CPU  fp32, 100 candidates:", json.dumps(_time(cpu, requests[3:6])), "(3 requests)")
        if args.fp16:
            from tailrank.optimize import optimize

            report = optimize(model, Path(tmp) / "fp16", precision="fp16", force=True)
            print("fp16 fidelity (on CPU):", json.dumps({k: report[k] for k in ("max_abs_logit_diff", "kendall_tau")}))
            half = CrossEncoder(Path(tmp) / "fp16", device="cuda")
            half.rank(*requests[0])
            print("CUDA fp16, 100 candidates:", json.dumps(_time(half, requests[3:])))
    return 0


def _check_reference(args: argparse.Namespace) -> int:
    """Fidelity of ``--model`` on CUDA against CPU fp32 logits computed elsewhere, and its
    latency per 100-candidate request."""
    from tailrank import CrossEncoder
    from tailrank.optimize import kendall_tau

    if args.model is None:
        print("--reference needs --model")
        return 2
    ref = json.loads(args.reference.read_text(encoding="utf-8"))["requests"]
    t = time.perf_counter()
    gpu = CrossEncoder(args.model, device="cuda", activation="none")
    print(f"loaded and warmed in {time.perf_counter() - t:.1f}s: {gpu!r}")
    if gpu.device != "cuda":
        print("the CUDA provider did not initialise (see the log line above)")
        return 1
    worst, taus, top1, top10 = 0.0, [], 0, []
    for r in ref:
        want = np.asarray(r["logits"], dtype=np.float64)
        got = gpu.predict([(r["query"], d) for d in r["documents"]]).reshape(-1).astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max()))
        taus.append(kendall_tau(want, got))
        top1 += int(np.argmax(want) == np.argmax(got))
        top10.append(len(set(np.argsort(-want)[:10]) & set(np.argsort(-got)[:10])) / 10)
    n = len(ref)
    print(json.dumps({"fidelity_vs_cpu_fp32": {"requests": n, "pairs": sum(len(r["documents"]) for r in ref),
                      "max_abs_logit_diff": worst, "mean_kendall_tau": float(np.mean(taus)),
                      "top1_agreement": top1 / n, "mean_top10_overlap": float(np.mean(top10))}}))
    reqs = [(r["query"], r["documents"]) for r in ref]
    gpu.rank(*reqs[0])
    print("CUDA, 100 candidates:", json.dumps(_time(gpu, reqs * args.repeat)))
    for rows in (128, 256):
        big = CrossEncoder(args.model, device="cuda", activation="none", max_batch_size=rows, batch_tokens=rows * 384)
        big.rank(*reqs[0])
        print(f"CUDA, max_batch_size {rows}:", json.dumps(_time(big, reqs * args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
