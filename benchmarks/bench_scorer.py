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
  ort-plain      onnxruntime on the exported fp32 graph, tokenizers encode_batch, pairs in input
                 order, batches of 32 padded to their longest pair.
  flashrank      FlashRank's Ranker pointed at the same exported fp32 graph (offline), its session
                 rebuilt with the same thread budget.

The compute floor of a precision is the request's real-token FLOPs (from the model config; padding
excluded) divided by the matmul rate of that precision measured in this run (torch, same threads,
a [4096, H] x [H, FFN] product).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DEFAULT_DATA, DEFAULT_OUT, environment, environment_line, markdown_table, write_json, write_text  # noqa: E402

DEFAULT_MODEL = str(Path(DEFAULT_DATA).parent.parent / "models" / "scifact-minilm-l6-ce")


def add_arguments(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF cross-encoder checkpoint directory")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--systems",
        default="tailrank-fp32-docstore,tailrank-fp32-texts,tailrank-opt-fp32,tailrank-int8,tailrank-bf16,"
        "st-fp32,st-bf16,ort-plain,flashrank",
    )
    p.add_argument("--work", default=None, help="directory for exported models (default: a temp dir)")


# ---------------------------------------------------------------------------------------------
# workload


def load_workload(data: str, n_queries: int, n_candidates: int, seed: int) -> list[tuple[str, list[str]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from tailrank._beir import iter_corpus, load_qrels, load_queries

    corpus = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in iter_corpus(data)]
    queries = load_queries(data)
    qids = list(load_qrels(data, "test"))[:n_queries]
    rng = random.Random(seed)
    return [(queries[q], [corpus[i] for i in rng.sample(range(len(corpus)), n_candidates)]) for q in qids]


def real_token_flops(config: dict[str, Any], lengths: list[int]) -> float:
    """Matmul FLOPs of an encoder over sequences of the given real lengths (2 FLOPs per MAC)."""
    h = int(config["hidden_size"])
    ffn = int(config.get("intermediate_size", 4 * h))
    layers = int(config["num_hidden_layers"])
    total = 0.0
    for n in lengths:
        per_layer = n * (8 * h * h + 4 * h * ffn) + 4 * n * n * h
        total += layers * per_layer
    return total


def matmul_rates(config: dict[str, Any], threads: int) -> dict[str, float]:
    """FLOP/s of a representative GEMM per precision, measured now with the thread budget."""
    import torch

    torch.set_num_threads(threads)
    h = int(config["hidden_size"])
    ffn = int(config.get("intermediate_size", 4 * h))
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

    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, h, dtype=dt), torch.randn(h, ffn, dtype=dt)
        out[name] = best(lambda: a @ b)
    a8 = torch.randint(-128, 127, (m, h), dtype=torch.int8)
    b8 = torch.randint(-128, 127, (h, ffn), dtype=torch.int8)
    try:
        out["int8"] = best(lambda: torch._int_mm(a8, b8))
    except RuntimeError:  # pragma: no cover - depends on the torch build
        pass
    return out


# ---------------------------------------------------------------------------------------------
# systems: each returns (name, setup-notes, callable(query, docs) -> np.ndarray scores in input order)


def tailrank_system(model_dir: str, threads: int, mode: str) -> Callable[[str, list[str]], np.ndarray]:
    import tailrank

    if mode == "docstore":
        ce = tailrank.CrossEncoder(model_dir, threads=threads)
        store = tailrank.DocStore(ce.vocab_size)
        ids_of: dict[str, int] = {}

        def run(query: str, docs: list[str]) -> np.ndarray:
            ids = np.array([ids_of[d] for d in docs], dtype=np.int64)
            ranked = ce.rank_ids(query, store, ids)
            pos = {int(i): k for k, i in enumerate(ids)}
            scores = np.empty(len(docs), dtype=np.float32)
            for r in ranked:
                scores[pos[r["corpus_id"]]] = r["score"]
            return scores

        def ingest(all_docs: list[str]) -> None:
            fresh = [d for d in dict.fromkeys(all_docs) if d not in ids_of]
            toks = ce.tokenize_documents(fresh)
            new_ids = np.arange(len(ids_of), len(ids_of) + len(fresh), dtype=np.int64)
            for d, i in zip(fresh, new_ids):
                ids_of[d] = int(i)
            store.add(new_ids, toks)

        run.ingest = ingest  # type: ignore[attr-defined]
        return run
    ce = tailrank.CrossEncoder(model_dir, threads=threads, cache_tokens=0)

    def run_texts(query: str, docs: list[str]) -> np.ndarray:
        ranked = ce.rank(query, docs)
        scores = np.empty(len(docs), dtype=np.float32)
        for r in ranked:
            scores[r["corpus_id"]] = r["score"]
        return scores

    return run_texts


def st_system(hf_dir: str, threads: int, max_length: int, bf16: bool) -> Callable[[str, list[str]], np.ndarray]:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    kwargs: dict[str, Any] = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if bf16 else {}
    model = CrossEncoder(hf_dir, device="cpu", max_length=max_length, **kwargs)

    def run(query: str, docs: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(model.predict([(query, d) for d in docs], batch_size=32, show_progress_bar=False), dtype=np.float32)

    return run


def ort_session(onnx_path: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def ort_plain_system(model_dir: str, threads: int, max_length: int) -> Callable[[str, list[str]], np.ndarray]:
    from tokenizers import Tokenizer

    sess = ort_session(str(Path(model_dir) / "onnx" / "model.onnx"), threads)
    names = {i.name for i in sess.get_inputs()}
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.enable_truncation(max_length, strategy="longest_first")
    tok.enable_padding()

    def run(query: str, docs: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(docs), 32):
            enc = tok.encode_batch([(query, d) for d in docs[s : s + 32]])
            feed = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            }
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
            out.append(sess.run(None, feed)[0][:, 0])
        return 1.0 / (1.0 + np.exp(-np.concatenate(out).astype(np.float32)))

    return run


def flashrank_system(model_dir: str, threads: int, max_length: int, cache: str) -> Callable[[str, list[str]], np.ndarray]:
    from flashrank import Ranker, RerankRequest
    from flashrank.Config import model_file_map

    name = "ms-marco-MiniLM-L-12-v2"  # a name FlashRank knows; the files inside are ours
    target = Path(cache) / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(model_dir) / "onnx" / "model.onnx", target / model_file_map[name])
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "vocab.txt"):
        if (Path(model_dir) / f).exists():
            shutil.copy(Path(model_dir) / f, target / f)
    ranker = Ranker(model_name=name, cache_dir=cache, max_length=max_length, log_level="WARNING")
    ranker.session = ort_session(str(target / model_file_map[name]), threads)  # same thread budget

    def run(query: str, docs: list[str]) -> np.ndarray:
        res = ranker.rerank(RerankRequest(query=query, passages=[{"id": i, "text": d} for i, d in enumerate(docs)]))
        scores = np.empty(len(docs), dtype=np.float32)
        for r in res:
            scores[int(r["id"])] = float(r["score"])
        return scores

    return run


# ---------------------------------------------------------------------------------------------


def latency_ms(ns: list[int]) -> dict[str, float]:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    pct = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}
    return {"min": float(ms.min()), **{k: float(np.percentile(ms, v)) for k, v in pct.items()}, "max": float(ms.max())}


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    work = Path(args.work or tempfile.mkdtemp(prefix="tailrank-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(args.model) / "config.json").read_text())
    workload = load_workload(args.data, args.queries, args.candidates, args.seed)
    all_docs = [d for _, docs in workload for d in docs]

    from tailrank.cli import main as cli

    fp32_dir = work / "fp32"
    if not (fp32_dir / "onnx" / "model.onnx").exists():
        assert cli(["export", args.model, str(fp32_dir), "--force"]) == 0
    sample = work / "sample_pairs.jsonl"
    with open(sample, "w") as f:  # fidelity sample: held-out claims (not the timed ones)
        for q, docs in load_workload(args.data, args.queries + 30, 50, args.seed + 1)[args.queries :]:
            f.write(json.dumps({"query": q, "documents": docs}) + "\n")
    fidelity: dict[str, Any] = {}
    model_dirs = {"fp32": str(fp32_dir)}
    for prec, flag in (("opt-fp32", []), ("int8", ["--int8"]), ("bf16", ["--bf16"])):
        if f"tailrank-{prec}" not in args.systems:
            continue
        out = work / prec
        code = cli(["optimize", str(fp32_dir), str(out), *flag, "--force", "--sample-pairs", str(sample), "--threads", str(args.threads)]) if not (out / "fidelity.json").exists() else 0
        if code == 0 and (out / "fidelity.json").exists():
            rep = json.loads((out / "fidelity.json").read_text())
            fidelity[prec] = rep
            if rep.get("passed", True):
                model_dirs[prec] = str(out)
            else:
                fidelity[prec]["skipped"] = "below the fidelity thresholds"
        else:
            fidelity[prec] = {"skipped": f"tailrank optimize exited {code}"}

    import tailrank

    tok = tailrank.CrossEncoder(str(fp32_dir), threads=args.threads)
    max_length = tok.max_length
    template = tailrank.PairTemplate.from_tokenizer(fp32_dir)
    batcher = tailrank.PairBatcher(template, max_length=max_length)
    lengths_per_request = []
    for q, docs in workload:
        (qi,) = tok.tokenize_documents([q])
        kept = [batcher.truncate_lengths(len(qi), len(d)) for d in tok.tokenize_documents(docs)]
        lengths_per_request.append([kq + kd + template.n_special for kq, kd in kept])
    del tok
    flops = [real_token_flops(config, lens) for lens in lengths_per_request]
    rates = matmul_rates(config, args.threads)

    factories: dict[str, Callable[[], Callable[[str, list[str]], np.ndarray]]] = {
        "tailrank-fp32-docstore": lambda: tailrank_system(model_dirs["fp32"], args.threads, "docstore"),
        "tailrank-fp32-texts": lambda: tailrank_system(model_dirs["fp32"], args.threads, "texts"),
        "st-fp32": lambda: st_system(args.model, args.threads, max_length, False),
        "st-bf16": lambda: st_system(args.model, args.threads, max_length, True),
        "ort-plain": lambda: ort_plain_system(str(fp32_dir), args.threads, max_length),
        "flashrank": lambda: flashrank_system(str(fp32_dir), args.threads, max_length, str(work / "flashrank")),
    }
    for prec in ("opt-fp32", "int8", "bf16"):
        if prec in model_dirs:
            factories[f"tailrank-{prec}"] = (lambda p: lambda: tailrank_system(model_dirs[p], args.threads, "docstore"))(prec)
    precision_of = {"st-bf16": "bf16", "tailrank-int8": "int8", "tailrank-bf16": "bf16"}

    results: dict[str, Any] = {}
    scores_of: dict[str, list[np.ndarray]] = {}
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if name not in factories:
            results[name] = {"skipped": fidelity.get(name.removeprefix("tailrank-"), {}).get("skipped", "not available")}
            continue
        try:
            fn = factories[name]()
        except ImportError as e:
            results[name] = {"skipped": f"not installed ({e.name})"}
            continue
        if hasattr(fn, "ingest"):
            fn.ingest(all_docs)  # type: ignore[attr-defined]
        for q, docs in workload[:2]:
            fn(q, docs)  # warm-up, excluded
        lat_ns: list[int] = []
        got: list[np.ndarray] = []
        for rep in range(args.repeats):
            for q, docs in workload:
                gc.collect()
                t = time.perf_counter_ns()
                s = fn(q, docs)
                lat_ns.append(time.perf_counter_ns() - t)
                if rep == 0:
                    got.append(s)
        scores_of[name] = got
        stats = latency_ms(lat_ns)
        pairs = args.candidates * len(lat_ns)
        prec = precision_of.get(name, "fp32")
        floor_s = float(np.median(flops)) / rates.get(prec, rates["fp32"])
        results[name] = {
            "latency_ms": stats,
            "requests": len(lat_ns),
            "pairs_per_s": pairs / (sum(lat_ns) / 1e9),
            "precision": prec,
            "floor_ms": floor_s * 1e3,
            "ratio_to_floor": stats["p50"] / 1e3 / floor_s,
            "raw_ns": lat_ns,
        }
        print(f"[scorer] {name}: p50 {stats['p50']:.1f} ms p99 {stats['p99']:.1f} ms", file=sys.stderr)
        del fn
        gc.collect()

    ref = scores_of.get("tailrank-fp32-docstore") or scores_of.get("st-fp32")
    if ref:
        for name, got in scores_of.items():
            taus = [kendall_tau(a, b) for a, b in zip(ref, got)]
            top10 = [len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(ref, got)]
            top1 = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(ref, got)]
            results[name]["fidelity_vs_fp32"] = {
                "kendall_tau_mean": float(np.mean(taus)),
                "top10_overlap_mean": float(np.mean(top10)),
                "top1_kept": float(np.mean(top1)),
                "max_abs_score_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(ref, got))),
            }
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
        "optimize_fidelity": fidelity,
        "systems": results,
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
        f"Matmul rate measured in this run (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in res["matmul_gflops"].items())
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
    res = run(args)
    md = markdown(res)
    write_json(Path(args.out) / "scorer.json", res)
    write_text(Path(args.out) / "scorer.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
