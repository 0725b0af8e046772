"""Shared helpers of the benchmark suites: environment facts, timing statistics, JSON and markdown."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tailrank
except ImportError as exc:  # the suites measure the package; say how to make it importable
    raise SystemExit(
        f"cannot import tailrank ({exc}); install it (pip install '.[bench]') or build it in place "
        "(scripts/dev_build.sh) and run with PYTHONPATH=python"
    ) from exc

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(REPO_ROOT.parent / "shared" / "data" / "scifact")
DEFAULT_OUT = str(REPO_ROOT / "benchmarks" / "results")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_tag(dist: str) -> str | None:
    """The wheel tag a package was installed from (``linux_x86_64`` means built on this machine)."""
    try:
        text = importlib.metadata.distribution(dist).read_text("WHEEL") or ""
    except importlib.metadata.PackageNotFoundError:
        return None
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]
    return ",".join(tags) or None


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def environment() -> dict[str, Any]:
    """Machine, versions and load: everything needed to judge whether two runs are comparable."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "tailrank": getattr(tailrank, "__version__", None),
        "tailrank_file": os.path.dirname(tailrank.__file__),
        "tailrank_core_sha256": _file_sha256(tailrank._core.__file__)[:16],
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_sources": bool(_git("status", "--porcelain", "--", "csrc", "python", "CMakeLists.txt")),
        "distance_isa": tailrank.distance_isa(),
        "numpy": np.__version__,
        "hnswlib": _version("hnswlib"),
        "hnswlib_wheel_tag": _wheel_tag("hnswlib"),
        "tokenizers": _version("tokenizers"),
    }


def environment_line(env: dict[str, Any]) -> str:
    return (
        f"{env['cpu_model']}, {env['usable_cpus']} usable CPUs; Python {env['python']}; "
        f"tailrank {env['tailrank']} (git {env['git_commit']}{'+dirty' if env['git_dirty_sources'] else ''}, "
        f"_core {env['tailrank_core_sha256']}, distance_isa={env['distance_isa']}), hnswlib {env['hnswlib']} "
        f"(wheel {env['hnswlib_wheel_tag']}), numpy {env['numpy']}, tokenizers {env['tokenizers']}; "
        f"load average at start {env['loadavg_at_start']}; {env['date_utc']} UTC"
    )


def latency_stats(ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Microsecond statistics of per-call timings given in nanoseconds."""
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "calls": int(us.size),
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "min_us": float(us.min()),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
