"""Shared helpers of the benchmark suites: environment facts, timing statistics, JSON and markdown."""

from __future__ import annotations

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

# The machine facts and output writers are the package's, shared with `tailrank bench`.
from tailrank.bench.machine import environment as _environment
from tailrank.bench.machine import environment_line
from tailrank.bench.report import markdown_table, write_json, write_text

__all__ = [
    "DEFAULT_DATA", "DEFAULT_OUT", "REPO_ROOT", "environment", "environment_line", "latency_stats", "markdown_table",
    "write_json", "write_text",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(REPO_ROOT.parent / "shared" / "data" / "scifact")
DEFAULT_OUT = str(REPO_ROOT / "benchmarks" / "results")


def environment() -> dict[str, Any]:
    """Machine, versions and load, with the git commit of this checkout (see tailrank.bench.machine)."""
    return _environment(REPO_ROOT)


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
