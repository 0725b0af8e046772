"""``tailrank bench``: speed, tail latency, compute floor and quality of reranking, on one workload.

Library mode times tailrank at each precision and the peers (sentence-transformers, plain
onnxruntime, FlashRank) on the same pairs with the same thread budget; serve mode runs
``tailrank serve`` under open-loop load. See :func:`run_bench`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import deps, peers
from .fidelity import ranking_agreement
from .floor import floor_rate, matmul_probes, real_token_flops, request_lengths
from .machine import machine_info
from .measure import Scorer, insufficient, percentiles_ms
from .models import PRECISIONS, has_onnx, prepare_precision, prepare_reranker
from .report import markdown, plot_latency_cdf, plot_latency_vs_load, plot_speed_vs_quality, write_json, write_text
from .workload import Workload, corpus_file_hash, first_stage, load_corpus, load_qrels_if_any, random_workload

__all__ = ["BenchConfig", "run_bench", "write_outputs", "PEERS"]

PEERS = ("st", "st-bf16", *peers.ST_BACKENDS, "ort", "flashrank")
PEER_SYSTEMS = {"st": "st-fp32", "st-bf16": "st-bf16", **{n: n for n in peers.ST_BACKENDS}, "ort": "ort-plain",
                "flashrank": "flashrank"}
REFERENCE = "tailrank-fp32"
_FIDELITY_QUERIES, _FIDELITY_DOCS = 30, 50  # held-out sample for optimize's gate


@dataclasses.dataclass
class BenchConfig:
    """Settings of one ``tailrank bench`` run (the CLI flags)."""

    reranker: str
    dataset: str
    out: str
    embedder: str | None = None
    reranker_hf: str | None = None
    candidates: int = 100
    queries: int = 20
    threads: int | None = None
    precisions: Sequence[str] = ("fp32", "int8")
    peers: Sequence[str] = PEERS
    repeats: int = 1
    warmup: int = 2
    seed: int = 0
    split: str = "test"
    cache: str | None = None
    serve: bool = False
    rates: Sequence[float] = (1.0, 2.0, 4.0)
    serve_duration_s: float = 10.0
    progress: bool = True

    def validate(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; use some of {', '.join(PRECISIONS)}")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer(s) {unknown}; use some of {', '.join(PEERS)}")
        for name in ("candidates", "queries", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.serve and (not self.rates or min(self.rates) <= 0):
            raise ValueError("--rates needs positive request rates, e.g. --rates 1,2,4")


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[3]
    return root if (root / ".git").exists() else None


class _Progress:
    """A tqdm bar over requests (warm-up included), silent when stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="tailrank bench", unit="req", disable=None if enabled else True, leave=False)

    def system(self, name: str) -> None:
        self.bar.set_postfix_str(name)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _workload(cfg: BenchConfig, threads: int, cache: Path, embedder: Any) -> tuple[Workload, list[tuple[str, list[str]]], dict[str, Any]]:
    """The timed workload, the held-out fidelity sample, and a note on how candidates were chosen."""
    corpus = load_corpus(cfg.dataset)
    qrels = load_qrels_if_any(cfg.dataset, cfg.split)
    note: dict[str, Any] = {}
    if embedder is None and cfg.embedder is not None:
        from ..embedder import Embedder

        embedder = Embedder(cfg.embedder, threads=threads)
    if embedder is not None:
        # Corpus embeddings are cached by the model's fingerprint and the corpus file's hash.
        key = str(getattr(embedder, "fingerprint", "") or "")[:16]
        cache_file = cache / "embeddings" / f"{key}-{corpus_file_hash(cfg.dataset)}.npy" if key else None
        note["embedding_cache"] = str(cache_file) if cache_file else None
        wl = first_stage(cfg.dataset, embedder, cfg.queries, cfg.candidates, corpus=corpus, qrels=qrels,
                         cache_file=cache_file, threads=threads)
    else:
        wl = random_workload(cfg.dataset, cfg.queries, cfg.candidates, cfg.seed, corpus=corpus, qrels=qrels,
                             include_relevant=qrels is not None)
    held = random_workload(cfg.dataset, _FIDELITY_QUERIES, _FIDELITY_DOCS, cfg.seed + 1, corpus=corpus, qrels=qrels,
                           skip=len(wl.qids))
    samples = [(q, d) for q, d in held.requests if len(d) >= 2]
    note["fidelity_sample"] = f"{len(samples)} held-out queries x up to {_FIDELITY_DOCS} docs" if samples else \
        "optimize's built-in samples (no held-out queries in the dataset)"
    return wl, samples, note


def _factories(cfg: BenchConfig, model_dirs: dict[str, Path | str], fp32_dir: Path, hf_dir: Path | None, threads: int,
               max_length: int, cache: Path, samples: list[tuple[str, list[str]]]) -> dict[str, Callable[[], Scorer] | str]:
    """System name -> factory, or the reason it cannot run (``model_dirs`` holds reasons too)."""
    out: dict[str, Callable[[], Scorer] | str] = {}
    for p, d in model_dirs.items():
        out[f"tailrank-{p}"] = d if isinstance(d, str) else (lambda d=d: peers.TailrankDocStore(d, threads))  # type: ignore[misc]
    for peer in cfg.peers:
        name = PEER_SYSTEMS[peer]
        if peer.startswith("st"):
            if hf_dir is None:
                out[name] = "needs the Hugging Face checkpoint: give --reranker as a checkpoint or pass --reranker-hf"
            elif peer in peers.ST_BACKENDS:
                calibration = [(q, d) for q, docs in samples for d in docs][:300]  # held out, never timed
                out[name] = (lambda n=peer, c=calibration: peers.st_backend_system(  # type: ignore[misc]
                    hf_dir, threads, max_length, n, cache / "st", c))
            else:
                out[name] = lambda b=peer == "st-bf16": peers.st_system(hf_dir, threads, max_length, bf16=b)  # type: ignore[misc]
        elif peer == "ort":
            out[name] = lambda: peers.ort_plain_system(fp32_dir, threads, max_length)
        else:
            out[name] = lambda: peers.flashrank_system(fp32_dir, threads, max_length, cache / "flashrank")
    return out


def run_bench(cfg: BenchConfig, *, embedder: Any = None) -> dict[str, Any]:
    """Runs the benchmark and returns every number (what ``results.json`` holds).

    Args:
        cfg: The settings.
        embedder: An object with ``encode(texts) -> float32 [n, dim]`` to use as the first stage
            instead of loading ``cfg.embedder`` (its ``fingerprint`` attribute, if any, keys the
            embedding cache).
    """
    from .._ort import cpu_quota

    cfg.validate()
    # Before any work: a missing module named now, not after minutes of measuring.
    missing = deps.check(export_needed=not has_onnx(Path(cfg.reranker)), precisions=cfg.precisions, peers=cfg.peers,
                         serve=cfg.serve, quality=True)
    if missing.note():
        print(f"tailrank bench: {missing.note()}", file=sys.stderr)
    threads = cfg.threads or cpu_quota()
    out_dir = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    machine = machine_info(_repo_root())

    fp32_dir, hf_dir = prepare_reranker(cfg.reranker, cache)
    hf_dir = Path(cfg.reranker_hf) if cfg.reranker_hf else hf_dir
    wl, samples, wl_note = _workload(cfg, threads, cache, embedder)
    if not wl.requests:
        raise ValueError(f"no queries in {cfg.dataset} (split {cfg.split!r})")
    requests = wl.requests

    precisions = list(dict.fromkeys(["fp32", *cfg.precisions]))  # fp32 is the reference of fidelity
    model_dirs: dict[str, Path | str] = {}  # precision -> model dir, or why there is none
    opt_reports: dict[str, Any] = {}
    for p in precisions:
        d, rep = prepare_precision(fp32_dir, cache, p, samples=samples or None, threads=threads)
        opt_reports[p] = rep
        model_dirs[p] = rep["skipped"] if d is None else d

    config = json.loads((fp32_dir / "config.json").read_text(encoding="utf-8"))
    lengths, max_length = request_lengths(fp32_dir, requests)
    flops = [real_token_flops(config, lens) for lens in lengths]
    rate_names = sorted({"fp32"} | {_rate_key(p) for p, d in model_dirs.items() if not isinstance(d, str)})
    probes = matmul_probes(config, threads, rate_names)
    rates = {k: v["rate"] for k, v in probes.items()}
    floor_skipped = None if rates else "no matmul kernel could be probed (torch and onnx are both missing)"

    factories = _factories(cfg, model_dirs, fp32_dir, hf_dir, threads, max_length, cache, samples)
    all_docs = [d for _, docs in requests for d in docs]
    n_runnable = sum(1 for f in factories.values() if callable(f))
    bar = _Progress(n_runnable * (min(cfg.warmup, len(requests)) + len(requests) * cfg.repeats), cfg.progress)
    systems: dict[str, Any] = {}
    scores_of: dict[str, list[np.ndarray]] = {}
    timed: dict[str, list[int]] = {}
    try:
        for name, factory in factories.items():
            if isinstance(factory, str):
                systems[name] = {"skipped": factory}
                continue
            bar.system(name)
            try:
                lat_ns, got = peers.time_system(factory, requests, warmup=cfg.warmup, repeats=cfg.repeats, progress=bar)
            except ImportError as e:
                if name == REFERENCE:
                    raise
                systems[name] = {"skipped": _import_failure(e)}
                continue
            except Exception as e:  # noqa: BLE001 - a peer that cannot run this model is reported, not fatal
                if name == REFERENCE:
                    raise
                systems[name] = {"skipped": f"{type(e).__name__}: {e}"}
                continue
            finally:
                gc.collect()  # the system's model is gone before the next one loads
            scores_of[name] = got
            timed[name] = lat_ns
            systems[name] = {}  # keeps the systems' order; filled below
    finally:
        bar.close()

    if rates:
        # Probed again after the timing: one probe can land on a busy moment (another process,
        # a model's threads winding down) and under-measure; the floor uses the best of both.
        later = matmul_probes(config, threads, sorted(rates))
        for k, v in later.items():
            for kernel, r in v["kernels"].items():
                probes[k]["kernels"][kernel] = max(r, probes[k]["kernels"].get(kernel, 0.0))
            if v["rate"] > probes[k]["rate"]:
                probes[k].update(rate=v["rate"], kernel=v["kernel"])
        rates = {k: v["rate"] for k, v in probes.items()}
    for name, lat_ns in timed.items():
        systems[name] = _system_result(name, lat_ns, requests, flops, rates, opt_reports)

    ref = scores_of.get(REFERENCE)
    for name, got in scores_of.items():
        if ref is not None:
            systems[name]["fidelity_vs_fp32"] = ranking_agreement(ref, got)

    quality = _quality(cfg, wl, scores_of)
    res: dict[str, Any] = {
        "suite": "tailrank bench",
        "machine": machine,
        "settings": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
            "threads": threads,
            "max_length": max_length,
            "reranker_onnx": str(fp32_dir),
            "reranker_hf": str(hf_dir) if hf_dir else None,
            "cache": str(cache),
        },
        "workload": {
            "source": wl.source,
            "requests": len(requests),
            "pairs": sum(len(d) for _, d in requests),
            "candidates_per_request": [len(d) for _, d in requests],
            "median_pair_tokens": float(np.median([x for lens in lengths for x in lens])) if all_docs else None,
            "median_request_gflop": float(np.median(flops)) / 1e9,
            "request_gflop": [f / 1e9 for f in flops],
            "query_ids": wl.qids,
            **wl_note,
        },
        "matmul_gflops": {k: v / 1e9 for k, v in rates.items()},
        "floor_kernels": {k: {"kernel": v["kernel"], "gflops": {n: r / 1e9 for n, r in v["kernels"].items()}}
                          for k, v in probes.items()},
        "floor_skipped": floor_skipped,
        "optimize_fidelity": opt_reports,
        "systems": systems,
        "quality": quality,
        "serve": None,
        "not_installed": missing.note() or None,
    }
    if cfg.serve:
        from .serve import run_serve

        out_dir.mkdir(parents=True, exist_ok=True)
        res["serve"] = run_serve(fp32_dir, requests, cfg.rates, duration_s=cfg.serve_duration_s, seed=cfg.seed,
                                 threads=threads, log_file=out_dir / "serve.log")
    return res


def _rate_key(precision: str) -> str:
    """The matmul probe of a benchmark precision (int8 recipes share the int8 kernels' floor)."""
    target = PRECISIONS.get(precision) or "fp32"
    return "int8" if target.startswith("int8") else target


def _import_failure(e: ImportError) -> str:
    """Why a system could not import: a missing package, or one that is there but conflicts (its
    import fails inside, e.g. a release pinned to other transformers versions)."""
    top = (e.name or "").split(".")[0]
    if not top:
        return f"cannot import: {e}"
    if not deps.have(top):
        return f"not installed ({top})"
    return f"import failed, a dependency conflict in this environment: {e}"


def _system_result(name: str, lat_ns: list[int], requests: Sequence[Any], flops: list[float], rates: dict[str, float],
                   opt_reports: dict[str, Any]) -> dict[str, Any]:
    precision = name.removeprefix("tailrank-") if name.startswith("tailrank-") else "fp32"
    rate_key = _rate_key(precision)
    pairs_per_pass = sum(len(d) for _, d in requests)
    passes = len(lat_ns) // max(1, len(requests))
    stats = percentiles_ms(lat_ns)
    out: dict[str, Any] = {
        "precision": precision,
        "samples": len(lat_ns),
        "insufficient_samples": insufficient(len(lat_ns)),
        "latency_ms": stats,
        "pairs": pairs_per_pass * passes,
        "pairs_per_s": pairs_per_pass * passes / (sum(lat_ns) / 1e9),
    }
    report = opt_reports.get(precision) if name.startswith("tailrank-") else None
    if report and "passed" in report:
        out["fidelity_gate_passed"] = bool(report["passed"])
    bound = floor_rate(rates, rate_key)
    if bound:
        rate, out["matmul_rate_precision"] = bound
        floors_s = np.asarray(flops) / rate
        out["floor_ms"] = float(np.median(floors_s)) * 1e3
        out["ratio_to_floor"] = stats["p50"] / 1e3 / float(np.median(floors_s))
        out["ratio_to_floor_total"] = (sum(lat_ns) / 1e9) / (float(floors_s.sum()) * passes)
    out["raw_ns"] = lat_ns
    return out


def _quality(cfg: BenchConfig, wl: Workload, scores_of: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    qrels = load_qrels_if_any(cfg.dataset, cfg.split)
    if qrels is None:
        return {"skipped": f"no qrels/{cfg.split}.tsv in {cfg.dataset}"}
    try:
        from .quality import evaluate

        ks = sorted({10, cfg.candidates})
        out: dict[str, Any] = {"recall_at": ks}
        if wl.first_stage_run is not None:
            out["first_stage"] = evaluate(qrels, wl.first_stage_run, recall_at=ks)
        else:
            out["first_stage"] = {
                "skipped": "not measured: without --embedder the candidates are every qrels-relevant document plus "
                "seeded random ones, so Recall@k is 1 by construction and nDCG@10 measures the reranker alone"
            }
        out["systems"] = {name: evaluate(qrels, wl.run_from(got), recall_at=ks) for name, got in scores_of.items()}
        return out
    except ImportError as e:
        return {"skipped": f"pytrec_eval is not installed ({e}); pip install 'tailrank[bench]'"}


def write_outputs(res: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Writes results.json and report.md into ``out``, then the plots (and both files again with
    the plots listed); returns the paths written. Without matplotlib the report says so and there
    are no plots: the numbers never depend on the plotting library."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, report = out_dir / "results.json", out_dir / "report.md"
    if not deps.have("matplotlib"):
        res["plots"] = []
        res["plots_skipped"] = f"matplotlib is not installed: no plots ({deps.BENCH_EXTRA})"
    write_json(results, res)
    write_text(report, markdown(res))
    if "plots_skipped" in res:
        return [results, report]
    plots: list[Path] = []
    ran = {k: v for k, v in res["systems"].items() if "raw_ns" in v}
    if ran:
        plots.append(out_dir / "latency_cdf.png")
        plot_latency_cdf(ran, plots[-1])
    sv = res.get("serve") or {}
    if sv.get("rates"):
        plots.append(out_dir / "latency_vs_load.png")
        plot_latency_vs_load(sv, plots[-1])
    q = res["quality"].get("systems") or {}
    if q and all("ndcg@10" in q.get(n, {}) for n in ran):
        points = [(n, ran[n]["pairs_per_s"], q[n]["ndcg@10"]) for n in ran]
        label = "nDCG@10"
    else:
        points = [(n, r["pairs_per_s"], r.get("fidelity_vs_fp32", {}).get("kendall_tau_mean", float("nan"))) for n, r in ran.items()]
        label = "Kendall tau vs tailrank fp32"
    if points:
        plots.append(out_dir / "speed_vs_quality.png")
        plot_speed_vs_quality(points, label, plots[-1])
    res["plots"] = [p.name for p in plots]
    write_json(results, res)
    write_text(report, markdown(res))
    return [results, report, *plots]
