"""Serve mode of ``tailrank bench``: ``tailrank serve`` under open-loop Poisson load.

The server runs as its own process (``python -m tailrank.cli serve``), so the load generator
never shares its interpreter; the load and its summary come from the server's own generator
(:mod:`tailrank.serve.loadgen`). One request = one benchmark query and its candidates, in the
Cohere dialect on ``/rerank``.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .measure import Request, insufficient, percentiles_ms

__all__ = ["run_serve", "RERANK_PATH"]

RERANK_PATH = "/rerank"
_STARTUP_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[Any], base: str, timeout_s: float) -> str | None:
    """None once GET /ready answers 200 (model loaded and warmed), else why it did not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"tailrank serve exited with status {proc.returncode} before it was ready"
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2.0) as resp:
                if resp.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)  # waiting on another process's start-up: nothing to block on
    return f"tailrank serve was not ready within {timeout_s:.0f} s"


def _summary(loadgen: Any, rate: float, duration_s: float, records: Sequence[Any]) -> dict[str, Any]:
    ok_ns = [int(r.latency_s * 1e9) for r in records if r.status == 200]
    s = loadgen.summarize(records, duration_s=duration_s)
    out: dict[str, Any] = {"rate": rate, **s, "rate_429": s["rejected"] / s["offered"] if s["offered"] else 0.0}
    if ok_ns:
        out["latency_ms"] = percentiles_ms(ok_ns)
        out["insufficient_samples"] = insufficient(len(ok_ns))
    out["raw_ok_ns"] = ok_ns
    return out


def run_serve(
    model_dir: str | os.PathLike[str],
    requests: Sequence[Request],
    rates: Sequence[float],
    *,
    duration_s: float,
    seed: int,
    threads: int,
    log_file: str | os.PathLike[str],
) -> dict[str, Any]:
    """Starts ``tailrank serve --reranker model_dir``, offers each rate for ``duration_s``
    seconds, and stops it. Returns ``{"skipped": reason}`` when the server cannot run here."""
    try:
        loadgen = importlib.import_module("tailrank.serve.loadgen")
        importlib.import_module("tailrank.serve.app")  # the web stack (serve extra)
    except ImportError as e:
        return {"skipped": f"server not available ({e})"}
    port = _free_port()
    pkg_parent = str(Path(__file__).resolve().parents[2])  # so an in-place build serves the same code
    env = {k: v for k, v in os.environ.items() if k != "TAILRANK_API_KEY"}  # our own loopback server: no key
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "tailrank.cli", "serve", "--reranker", os.fspath(model_dir), "--port", str(port),
           "--threads", str(threads), "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            why = _wait_ready(proc, base, _STARTUP_TIMEOUT_S)
            if why is not None:
                return {"skipped": f"{why}; see {log_file}"}
            out = []
            for i, rate in enumerate(rates):
                records = loadgen.run_open_loop(
                    base + RERANK_PATH,
                    lambda n: {"query": requests[n % len(requests)][0], "documents": requests[n % len(requests)][1]},
                    rate, duration_s, seed + i,
                )
                out.append(_summary(loadgen, float(rate), duration_s, records))
            return {"command": cmd, "duration_s": duration_s, "route": RERANK_PATH, "threads": threads, "rates": out}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
