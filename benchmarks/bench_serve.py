"""Serving under open-loop load: tailrank serve against sentence-transformers behind the same HTTP stack.

    PYTHONPATH=python python benchmarks/bench_serve.py --data ../shared/data/scifact \
        --model ../shared/models/scifact-minilm-l6-ce --threads 2 --duration 60 --overload-duration 300

Workload: SciFact test claims, each with ``--candidates`` seeded random abstracts (the shared
``tailrank.bench.workload``); one request = one claim and its candidates, sent as a Cohere-style
rerank body. Both servers run as their own processes with the same thread budget, on FastAPI under
uvicorn (one worker):

  tailrank   ``tailrank serve`` (the model exported with ``tailrank export`` into ``--work``):
             cross-request batching, deadlines and admission control.
  baseline   sentence-transformers' CrossEncoder on the HF checkpoint, one ``predict`` per request
             in Starlette's threadpool (torch intra-op threads = ``--threads``); no admission.

Steps: (1) saturation throughput of each server, closed loop with ``--saturation-clients`` clients
and no deadline; (2) open-loop Poisson arrivals (``tailrank.serve.loadgen``: seeded, sent at the
scheduled time, latency from the scheduled time) at ``--load-factors`` x tailrank's saturation,
for ``--duration`` seconds each, every request carrying ``X-Request-Timeout-Ms: --deadline-ms``;
(3) tailrank at ``--overload-factor`` x saturation for ``--overload-duration`` seconds while its
RSS is sampled every second. Latency percentiles are of the 200 responses; goodput counts the 200s
that are complete (not degraded) and within the deadline.

``--before-python DIR`` adds the system ``before``: the same ``tailrank serve`` command run from
another checkout's ``python/`` tree (with its own built ``_core``), so that a change is measured
against the code before it in the same run, on the same machine, model, data and threads.
``--endpoint search`` loads ``/search`` instead of ``/rerank``: a SciFact collection of
``--collection-docs`` abstracts (the default all-MiniLM-L6-v2 embedder, this cross-encoder; built
once into ``--work``), one request = one claim, ``k`` 10 and ``--candidates`` reranked. The score
cache is off in every tailrank server (``--score-cache-bytes``, default 0): the cycled requests
would otherwise be answered from it.

Targets checked: at 0.7x saturation p99 <= 2 x p50; at 2x, admitted requests' p99 <= the deadline
and 429s answer within 10 ms p99; RSS flat over the overload period (growth over its last 80%
< 5% and < 50 MB). Writes ``serve.json``, ``serve.md`` and ``serve_latency.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DEFAULT_DATA, DEFAULT_OUT, REPO_ROOT, environment, environment_line, markdown_table, write_json, write_text  # noqa: E402

from tailrank.serve.loadgen import Record, run_open_loop, summarize  # noqa: E402

DEFAULT_MODEL = str(Path(DEFAULT_DATA).parent.parent / "models" / "scifact-minilm-l6-ce")
_STARTUP_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------------------------
# the baseline server (run in its own process by this script: --baseline-server)


def baseline_app(hf_dir: str, threads: int, batch_size: int) -> Any:
    """sentence-transformers CrossEncoder, one predict per request in the threadpool."""
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from sentence_transformers import CrossEncoder
    from starlette.concurrency import run_in_threadpool

    torch.set_num_threads(threads)
    model = CrossEncoder(hf_dir, device="cpu")
    app = FastAPI(title="baseline: sentence-transformers CrossEncoder")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def rerank(request: Any) -> JSONResponse:  # a plain Starlette route: the same stack, no validation
        body = await request.json()
        query, docs = body["query"], body["documents"]
        scores = await run_in_threadpool(
            lambda: model.predict([(query, d) for d in docs], batch_size=batch_size, show_progress_bar=False)
        )
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        top_n = body.get("top_n") or len(docs)
        results = [{"index": int(i), "relevance_score": float(scores[i])} for i in order[:top_n]]
        return JSONResponse({"results": results})

    app.router.add_route("/rerank", rerank, methods=["POST"])
    return app


def serve_baseline(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(baseline_app(args.model, args.threads, args.baseline_batch_size), host="127.0.0.1",
                port=args.port, log_level="warning")
    return 0


# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process on a free port; stopped on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log_path: Path,
                 python_path: str | None = None) -> None:
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        self.base = f"http://127.0.0.1:{port}"
        self.python_path = python_path or str(REPO_ROOT / "python")
        self._log = open(log_path, "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.python_path, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # another process's start-up: nothing to block on
        raise SystemExit(f"{self.name} not ready within {timeout_s:.0f} s; see {self._log.name}")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_tailrank(args: argparse.Namespace, model_dir: str, work: Path, name: str = "tailrank",
                   python_path: str | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "tailrank.cli", "serve", "--reranker", model_dir, "--port", str(port),
           "--threads", str(args.threads), "--log-level", "warning", "--default-deadline-ms", str(args.deadline_ms),
           "--score-cache-bytes", str(args.score_cache_bytes)]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.endpoint == "search":
        cmd += ["--collection", str(args.collection)]
    return Server(name, cmd, port, "/ready", work / f"{name}-serve.log", python_path)


def start_baseline(args: argparse.Namespace, work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "--baseline-server", "--model", args.model, "--port", str(port),
           "--threads", str(args.threads), "--baseline-batch-size", str(args.baseline_batch_size)]
    return Server("baseline", cmd, port, "/health", work / "baseline-serve.log")


# ---------------------------------------------------------------------------------------------
# measurements


# Set by run(): the body of a rerank (or, with --endpoint search, a search) request.
_SEARCH_CANDIDATES: int | None = None


def body_of(request: tuple[str, list[str]]) -> dict[str, Any]:
    query, docs = request
    if _SEARCH_CANDIDATES is not None:
        return {"query": query, "k": 10, "candidates": _SEARCH_CANDIDATES}
    return {"model": "bench", "query": query, "documents": docs, "top_n": 10}


def build_collection(args: argparse.Namespace, model_dir: str, work: Path) -> Path:
    """A SciFact collection of the first --collection-docs abstracts (built once into --work)."""
    path = Path(args.collection) if args.collection else work / f"scifact-{args.collection_docs}"
    if (path / "manifest.json").exists():
        return path
    from tailrank import Collection, CrossEncoder, Embedder
    from tailrank.bench.workload import load_corpus
    from tailrank.embedder import default_embedder_dir

    corpus = load_corpus(args.data)
    n = min(args.collection_docs, len(corpus.ids))
    col = Collection.create(path, embedder=Embedder(default_embedder_dir(), threads=args.threads),
                            reranker=CrossEncoder(model_dir, threads=args.threads))
    col.add(list(corpus.texts[:n]), ids=[str(x) for x in corpus.ids[:n]])
    col.close()
    return path


def saturation(url: str, requests: Sequence[tuple[str, list[str]]], clients: int, duration_s: float) -> dict[str, Any]:
    """Closed loop: ``clients`` clients back to back, no deadline; completed requests per second."""
    import httpx

    async def go() -> tuple[int, float, list[float]]:
        done = 0
        lat: list[float] = []
        stop = time.monotonic() + duration_s
        headers = {"X-Request-Timeout-Ms": "600000"}

        async def client(c: httpx.AsyncClient, k: int) -> None:
            nonlocal done
            n = k
            while time.monotonic() < stop:
                t0 = time.monotonic()
                r = await c.post(url, json=body_of(requests[n % len(requests)]), headers=headers)
                if r.status_code == 200:
                    done += 1
                    lat.append(time.monotonic() - t0)
                n += clients

        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=600) as c:
            await asyncio.gather(*(client(c, k) for k in range(clients)))
        return done, time.monotonic() - t0, lat

    done, elapsed, lat = asyncio.run(go())
    return {"rps": done / elapsed, "completed": done, "elapsed_s": elapsed, "clients": clients,
            "p50_ms": float(np.percentile(lat, 50) * 1000) if lat else None}


def open_loop(url: str, requests: Sequence[tuple[str, list[str]]], rate: float, args: argparse.Namespace,
              seed: int) -> tuple[dict[str, Any], list[Record]]:
    records = run_open_loop(
        url, lambda n: body_of(requests[n % len(requests)]), rate, args.duration, seed,
        headers={"X-Request-Timeout-Ms": str(args.deadline_ms)}, timeout_s=args.client_timeout,
    )
    return summarize(records, duration_s=args.duration, deadline_ms=args.deadline_ms), records


def overload_rss(server: Server, url: str, requests: Sequence[tuple[str, list[str]]], rate: float,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Offers ``rate`` for --overload-duration seconds, sampling the server's RSS every second."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, server.rss_bytes()))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        records = run_open_loop(
            url, lambda n: body_of(requests[n % len(requests)]), rate, args.overload_duration, args.seed + 99,
            headers={"X-Request-Timeout-Ms": str(args.deadline_ms)}, timeout_s=args.client_timeout,
        )
    finally:
        stop.set()
        sampler.join()
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    tail = rss[int(len(rss) * 0.2):] if len(rss) >= 5 else rss
    growth = float(tail[-1] - tail[0]) if tail.size else 0.0
    slope = float(np.polyfit(t[-tail.size:], tail, 1)[0]) * 60 if tail.size >= 2 else 0.0
    return {
        "rate": rate,
        "duration_s": args.overload_duration,
        "summary": summarize(records, duration_s=args.overload_duration, deadline_ms=args.deadline_ms),
        "rss_mb": {"start": rss[0] / 2**20 if rss.size else None, "end": rss[-1] / 2**20 if rss.size else None,
                   "max": rss.max() / 2**20 if rss.size else None},
        "rss_growth_last80_mb": growth / 2**20,
        "rss_slope_mb_per_min": slope / 2**20,
        "rss_flat": bool(tail.size and growth < 0.05 * tail[0] and growth < 50 * 2**20),
        "rss_samples": [(round(a, 1), int(b)) for a, b in samples],
    }


def reject_probe(url: str, requests: Sequence[tuple[str, list[str]]], args: argparse.Namespace) -> dict[str, Any]:
    """Many 429s under load, for a p99 that is not just the slowest few: ``--probe-fill-clients``
    closed-loop clients keep the scorer busy with admitted requests (deadline 600 s), while
    requests with a ``--probe-deadline-ms`` deadline, which the queue ahead makes impossible,
    arrive open-loop (Poisson, ``--probe-rate``/s for ``--probe-duration`` s) and must be refused
    at once. The same 100-document bodies as the load runs."""
    from tailrank.serve.loadgen import RawHttpClient, run_open_loop_async

    fill_bodies = [json.dumps(body_of(r)).encode() for r in requests]
    fill_headers = {"content-type": "application/json", "X-Request-Timeout-Ms": "600000"}

    async def go() -> tuple[list[Record], int]:
        stop = asyncio.Event()
        filled = 0
        c = RawHttpClient(url, timeout_s=args.client_timeout)
        try:
            async def filler(k: int) -> None:
                nonlocal filled
                n = k
                while not stop.is_set():
                    status, _, _ = await c.post(fill_bodies[n % len(fill_bodies)], fill_headers)
                    filled += status == 200
                    n += args.probe_fill_clients

            fills = [asyncio.ensure_future(filler(k)) for k in range(args.probe_fill_clients)]
            await asyncio.sleep(2.0)  # the fill requests are queued and scoring
            records = await run_open_loop_async(
                url, lambda n: body_of(requests[(n + 7) % len(requests)]), args.probe_rate, args.probe_duration,
                args.seed + 7, headers={"X-Request-Timeout-Ms": str(args.probe_deadline_ms)},
                timeout_s=args.client_timeout,
            )
            stop.set()
            for f in fills:
                f.cancel()
            await asyncio.gather(*fills, return_exceptions=True)
        finally:
            await c.aclose()
        return records, filled

    records, filled = asyncio.run(go())
    s = summarize(records, duration_s=args.probe_duration)
    rej = np.array([r.latency_s * 1000 for r in records if r.status == 429])
    srv = np.array([r.server_s * 1000 for r in records if r.status == 429 and r.server_s is not None])
    return {
        "rate": args.probe_rate, "duration_s": args.probe_duration, "deadline_ms": args.probe_deadline_ms,
        "fill_clients": args.probe_fill_clients, "fill_completed": filled, "summary": s,
        "reject_p999_ms": float(np.percentile(rej, 99.9)) if rej.size else None,
        "reject_server_max_ms": float(srv.max()) if srv.size else None,
        "reject_over_10ms": int((rej > 10).sum()),
    }


# ---------------------------------------------------------------------------------------------


def prepare_model(args: argparse.Namespace, work: Path) -> str:
    """The ONNX model directory tailrank serves (exported once into --work)."""
    if (Path(args.model) / "onnx" / "model.onnx").exists() or (Path(args.model) / "model.onnx").exists():
        return args.model
    out = work / "models" / Path(args.model).name
    if not (out / "onnx" / "model.onnx").exists():
        from tailrank.cli import main as cli

        if cli(["export", args.model, str(out), "--force"]) != 0:
            raise SystemExit(f"tailrank export {args.model} failed")
    return str(out)


def check_targets(tailrank: dict[str, Any], factors: Sequence[float], args: argparse.Namespace) -> dict[str, Any]:
    by_factor = {f: r for f, r in zip(factors, tailrank["rates"])}
    out: dict[str, Any] = {}
    r = by_factor.get(0.7)
    if r and r["p50_ms"]:
        out["p99_le_2x_p50_at_0.7x"] = {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "pass": r["p99_ms"] <= 2 * r["p50_ms"]}
    r = by_factor.get(2.0)
    if r:
        ok_p99 = r["p99_ms"]
        out["admitted_p99_le_deadline_at_2x"] = {
            "p99_ms": ok_p99, "deadline_ms": args.deadline_ms, "pass": ok_p99 is not None and ok_p99 <= args.deadline_ms
        }
        rej = r["reject_p99_ms"]
        out["reject_p99_le_10ms_at_2x"] = {"reject_p99_ms": rej, "rejected": r["rejected"],
                                           "server_p99_ms": r.get("reject_server_p99_ms"),
                                           "from_send_p99_ms": r.get("reject_sent_p99_ms"),
                                           "pass": None if rej is None else rej <= 10.0}  # None: no 429s
    if tailrank.get("reject_probe"):
        pr = tailrank["reject_probe"]
        rej = pr["summary"]["reject_p99_ms"]
        out["reject_p99_le_10ms_probe"] = {"reject_p99_ms": rej, "rejected": pr["summary"]["rejected"],
                                           "server_p99_ms": pr["summary"]["reject_server_p99_ms"],
                                           "from_send_p99_ms": pr["summary"]["reject_sent_p99_ms"],
                                           "max_ms": pr["summary"]["reject_max_ms"],
                                           "pass": None if rej is None else rej <= 10.0}
    if tailrank.get("overload"):
        o = tailrank["overload"]
        out["rss_flat_under_overload"] = {"growth_mb": o["rss_growth_last80_mb"], "slope_mb_per_min": o["rss_slope_mb_per_min"],
                                          "pass": o["rss_flat"]}
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    if not res["systems"].get("tailrank", {}).get("rates"):
        return  # no load runs (a probe-only run)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("tailrank", "-"), ("baseline", "--")):
        sys_res = res["systems"].get(name)
        if not sys_res or "rates" not in sys_res:
            continue
        x = [r["offered_rps"] for r in sys_res["rates"]]
        for key, marker in (("p50_ms", "o"), ("p99_ms", "s"), ("p999_ms", "^")):
            y = [r[key] if r[key] is not None else np.nan for r in sys_res["rates"]]
            ax.plot(x, y, style, marker=marker, label=f"{name} {key[:-3]}")
        gx.plot(x, [r["goodput_rps"] for r in sys_res["rates"]], style, marker="o", label=f"{name} goodput")
    sat = res["systems"]["tailrank"]["saturation"]["rps"]
    ax.axhline(res["deadline_ms"], color="grey", lw=0.8, ls=":", label="deadline")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency of 200 responses (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"latency vs offered load (tailrank saturation {sat:.2f} req/s)")
    lim = max(r["offered_rps"] for r in res["systems"]["tailrank"]["rates"]) * 1.05
    gx.plot([0, lim], [0, lim], color="grey", lw=0.8, ls=":", label="offered")
    gx.set_xlabel("offered load (requests/s)")
    gx.set_ylabel("goodput (complete, in-deadline requests/s)")
    gx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for name, sys_res in res["systems"].items():
        if "rates" not in sys_res:
            continue
        for f, r in zip(res["load_factors"], sys_res["rates"]):
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            rows.append([name, f"{f:g}x", f"{r['offered_rps']:.2f}", fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["p999_ms"]),
                         f"{r['goodput_rps']:.2f}", r["ok"], r["degraded"], r["rejected"], fmt(r["reject_p99_ms"]),
                         fmt(r.get("reject_sent_p99_ms")), fmt(r.get("reject_server_p99_ms"))])
    head = (f"# Serving under open-loop load\n\n{environment_line(res['environment'])}\n\n"
            f"Candidates per request: {res['candidates']}; deadline {res['deadline_ms']:.0f} ms; "
            f"{res['duration_s']:g} s per rate; threads {res['threads']}.\n\n"
            + "".join(f"- saturation {n}: {s['saturation']['rps']:.3f} req/s\n" for n, s in res["systems"].items()
                      if "saturation" in s)
            + "\n")
    probe = ""
    for name, system in res["systems"].items():
        pr = system.get("reject_probe")
        if not pr:
            continue
        ps = pr["summary"]
        probe += (f"\n\nRejection probe, {name} ({pr['fill_clients']} closed-loop clients keep the scorer busy; "
                  f"{pr['rate']:g}/s open-loop requests with a {pr['deadline_ms']:.0f} ms deadline for "
                  f"{pr['duration_s']:g} s): {ps['rejected']} x 429, p50 {ps['reject_p50_ms']:.1f} ms, p99 "
                  f"{ps['reject_p99_ms']:.1f} ms, max {ps['reject_max_ms']:.1f} ms (from send: p99 "
                  f"{ps['reject_sent_p99_ms']:.1f} ms; in the server: p99 {ps['reject_server_p99_ms']:.1f} ms); "
                  f"client send lateness p50 {ps['send_late_p50_ms']:.1f} ms, p99 {ps['send_late_p99_ms']:.1f} ms.")
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    targets = "".join(f"- {k}: {verdict[v['pass']]} {json.dumps({a: b for a, b in v.items() if a != 'pass'})}\n"
                      for k, v in res["targets"].items())
    return head + markdown_table(
        ["system", "load", "offered/s", "p50 ms", "p99 ms", "p99.9 ms", "goodput/s", "200", "degraded", "429",
         "429 p99 ms", "429 p99 from send ms", "429 server p99 ms"], rows) + probe + "\n\nTargets (tailrank):\n\n" + targets


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from tailrank.bench.workload import random_workload

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args, work)
    requests = random_workload(args.data, args.queries, args.candidates, args.seed).requests
    res: dict[str, Any] = {
        "environment": environment(), "candidates": args.candidates, "queries": len(requests),
        "deadline_ms": args.deadline_ms, "duration_s": args.duration, "threads": args.threads,
        "load_factors": args.load_factors, "systems": {},
    }
    global _SEARCH_CANDIDATES
    if args.endpoint == "search":
        args.collection = str(build_collection(args, model_dir, work))
        _SEARCH_CANDIDATES = args.candidates
        res["collection"] = {"path": args.collection, "docs": args.collection_docs}
    res["endpoint"] = args.endpoint
    systems = [s for s in args.systems.split(",") if s]
    base_rate: float | None = None
    for name in systems:
        if name == "tailrank":
            server = start_tailrank(args, model_dir, work)
        elif name == "before":
            if not args.before_python:
                raise SystemExit("the system `before` needs --before-python DIR")
            server = start_tailrank(args, model_dir, work, "before", args.before_python)
        else:
            if args.endpoint == "search":
                raise SystemExit("the baseline server has no /search")
            server = start_baseline(args, work)
        try:
            server.wait_ready()
            url = server.base + "/" + args.endpoint
            res.setdefault("load", {})[name] = os.getloadavg()
            for req in requests[:2]:  # warm-up, not timed
                httpx.post(url, json=body_of(req), timeout=args.client_timeout).raise_for_status()
            out: dict[str, Any] = {"command": server.cmd, "pythonpath": server.python_path, "rates": []}
            if args.saturation_duration > 0 or not args.base_rate:
                print(f"{name}: saturation ...", flush=True)
                out["saturation"] = saturation(url, requests, args.saturation_clients, args.saturation_duration)
            if base_rate is None:  # every system is offered the same rates: those of the first (or --base-rate)
                base_rate = args.base_rate or out["saturation"]["rps"]
            for i, f in enumerate(args.load_factors):
                rate = f * base_rate
                print(f"{name}: {f:g}x = {rate:.3f} req/s for {args.duration:g} s ...", flush=True)
                summary, _ = open_loop(url, requests, rate, args, args.seed + i)
                out["rates"].append({"factor": f, "rate": rate, "loadavg": os.getloadavg(), **summary})
            if name != "baseline" and args.probe_duration > 0 and args.endpoint == "rerank":
                print(f"{name}: rejection probe {args.probe_rate:g}/s for {args.probe_duration:g} s ...", flush=True)
                out["reject_probe"] = reject_probe(url, requests, args)
            if name == "tailrank" and args.overload_duration > 0 and args.endpoint == "rerank":
                rate = args.overload_factor * base_rate
                print(f"{name}: overload {args.overload_factor:g}x for {args.overload_duration:g} s (RSS) ...", flush=True)
                out["overload"] = overload_rss(server, url, requests, rate, args)
            res["systems"][name] = out
        finally:
            server.stop()
    if "tailrank" in res["systems"]:
        res["targets"] = check_targets(res["systems"]["tailrank"], args.load_factors, args)
    else:
        res["targets"] = {}
    return res


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF cross-encoder checkpoint (exported for tailrank)")
    p.add_argument("--work", default=str(REPO_ROOT / ".cache" / "bench_serve"), help="exported model and server logs")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=50, help="distinct requests, cycled")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default="tailrank,baseline")
    p.add_argument("--deadline-ms", type=float, default=30_000.0, help="X-Request-Timeout-Ms of every request")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per load factor")
    p.add_argument("--load-factors", type=_floats, default=[0.5, 0.7, 1.0, 2.0], help="x tailrank's saturation")
    p.add_argument("--saturation-clients", type=int, default=4)
    p.add_argument("--base-rate", type=float, default=None,
                   help="requests/s the load factors multiply (default: the first system's measured saturation), "
                   "e.g. tailrank's from an earlier run, to offer a baseline-only run the same rates")
    p.add_argument("--saturation-duration", type=float, default=30.0)
    p.add_argument("--overload-factor", type=float, default=2.0)
    p.add_argument("--overload-duration", type=float, default=300.0, help="RSS watch under overload; 0 skips it")
    p.add_argument("--client-timeout", type=float, default=300.0)
    p.add_argument("--probe-duration", type=float, default=60.0,
                   help="rejection probe: seconds of short-deadline arrivals while the scorer is busy; 0 skips it")
    p.add_argument("--probe-rate", type=float, default=5.0, help="rejection probe arrivals per second")
    p.add_argument("--probe-deadline-ms", type=float, default=2000.0, help="deadline of the probe requests")
    p.add_argument("--probe-fill-clients", type=int, default=3, help="closed-loop clients keeping the scorer busy")
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--baseline-batch-size", type=int, default=32)
    p.add_argument("--endpoint", choices=["rerank", "search"], default="rerank")
    p.add_argument("--collection", default=None, help="collection served at /search (default: built into --work)")
    p.add_argument("--collection-docs", type=int, default=2000, help="SciFact abstracts in the built collection")
    p.add_argument("--before-python", default=None,
                   help="python/ tree (with its _core) of the code before a change: the system `before`")
    p.add_argument("--score-cache-bytes", type=int, default=0, help="score cache of the tailrank servers")
    p.add_argument("--tag", default="serve", help="output file names: <tag>.json, <tag>.md")
    p.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_server:
        return serve_baseline(args)
    res = run(args)
    out = Path(args.out)
    write_json(out / f"{args.tag}.json", res)
    if args.endpoint == "rerank" and "tailrank" in res["systems"]:
        plot(res, out / f"{args.tag}_latency.png")
    md = markdown(res)
    write_text(out / f"{args.tag}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
