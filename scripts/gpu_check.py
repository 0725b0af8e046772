#!/usr/bin/env python3
"""One short GPU check of tailrank's CrossEncoder: providers, CUDA-vs-CPU fidelity, request time.

Usage:
    PYTHONPATH=python python scripts/gpu_check.py [--model EXPORTED_DIR | --hf HF_DIR] [--fp16]
    PYTHONPATH=python python scripts/gpu_check.py --llm [--cpu-only]

--llm checks a decoder-only (LLM) reranker instead: a seeded tiny Qwen3 reranker is built (the
tests' builder: hidden 256, 4 layers, a tokenizer trained here), exported with the qwen3 template,
made fp16 by ``tailrank optimize --fp16``, and scored on CUDA fp16 (and fp32) against CPU fp32:
max |logit diff|, Kendall tau, p50/p99 per 100-candidate request. --cpu-only runs the CPU side
of that (build, export, fp16 graphs, scores on the CPU provider) without a GPU: a dry run that
proves the script, not the GPU.

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
    p.add_argument("--llm", action="store_true", help="check a decoder (LLM) reranker (see above)")
    p.add_argument("--cpu-only", action="store_true", help="with --llm: the CPU side only (no GPU needed)")
    p.add_argument("--max-length", type=int, default=512, help="with --llm: prompt tokens (default 512)")
    args = p.parse_args()

    import onnxruntime as ort

    if args.llm:
        return _check_llm(args, "CUDAExecutionProvider" in ort.get_available_providers())

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


def _check_llm(args: argparse.Namespace, cuda: bool) -> int:
    """A seeded tiny Qwen3 reranker: CUDA fp16 (and fp32) vs CPU fp32, or with --cpu-only the
    fp16 graphs on the CPU provider vs fp32 (a dry run of the same code path)."""
    sys.path.insert(0, str(REPO / "tests" / "python"))  # the tests' seeded builder, not a copy of it
    import llm_models  # type: ignore[import-not-found]

    from tailrank import CrossEncoder
    from tailrank.export import export
    from tailrank.optimize import kendall_tau, optimize

    if not cuda and not args.cpu_only:
        print("no CUDAExecutionProvider: nothing to check on a GPU (pass --cpu-only for the CPU dry run)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        hf = llm_models.build_llm_checkpoint("qwen3", Path(tmp) / "hf", hidden=256, layers=4,
                                             positions=max(1024, args.max_length))
        model = export(hf, Path(tmp) / "model", rerank_template="qwen3")
        report = optimize(model, Path(tmp) / "fp16", precision="fp16", force=True)
        print(f"built, exported and made fp16 in {time.perf_counter() - t:.1f}s; fp16 gate on the CPU:",
              json.dumps({k: report[k] for k in ("max_abs_logit_diff", "kendall_tau", "top1_kept", "passed")}))
        kw: dict[str, object] = {"activation": "none", "max_length": args.max_length}
        cpu = CrossEncoder(model, device="cpu", **kw)
        device = "cpu" if args.cpu_only else "cuda"
        runs = {f"{device} fp16": CrossEncoder(Path(tmp) / "fp16", device=device, **kw)}
        if not args.cpu_only:
            runs["cuda fp32"] = CrossEncoder(model, device="cuda", **kw)
        if any(m.device != device for m in runs.values()):
            print("the CUDA provider did not initialise (see the log line above); nothing to check on a GPU")
            return 0
        requests = _requests(args.requests + 3)
        print(f"{'CPU dry run (no GPU used)' if args.cpu_only else 'GPU check'}: {len(requests)} requests of "
              f"1 query x 100 documents, max_length {args.max_length}")
        for name, m in runs.items():
            worst, taus = 0.0, []
            for q, docs in requests[:3]:
                a = cpu.predict([(q, d) for d in docs]).astype(np.float64)
                b = m.predict([(q, d) for d in docs]).astype(np.float64)
                worst = max(worst, float(np.abs(a - b).max()))
                taus.append(kendall_tau(a, b))
            print(f"{name} vs cpu fp32 on 300 pairs: max |logit diff| {worst:.2e}, Kendall tau {np.mean(taus):.4f}")
            m.rank(*requests[0])  # warm
            print(f"{name}, 100 candidates:", json.dumps(_time(m, requests[3:])))
        print("cpu fp32, 100 candidates:", json.dumps(_time(cpu, requests[3:4])), "(1 request)")
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
