"""Timing of scoring systems over a workload, and latency percentiles."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Scorer", "Request", "PERCENTILES", "MIN_SAMPLES", "percentiles_ms", "insufficient", "time_requests"]

# A system under test: (query, documents) -> scores in input order.
Scorer = Callable[[str, list[str]], npt.NDArray[np.float32]]
Request = tuple[str, list[str]]  # (query, documents)

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
# Samples a percentile needs before it is more than the largest sample or two: about 10 beyond it.
MIN_SAMPLES = {"p50": 1, "p90": 10, "p99": 100, "p99.9": 1000}


def percentiles_ms(ns: Sequence[int] | npt.NDArray[Any]) -> dict[str, float]:
    """min, p50, p90, p99, p99.9 and max in milliseconds of timings given in nanoseconds."""
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    return {"min": float(ms.min()), **{k: float(np.percentile(ms, v)) for k, v in PERCENTILES.items()}, "max": float(ms.max())}


def insufficient(n: int) -> list[str]:
    """The percentiles that ``n`` samples cannot estimate (see ``MIN_SAMPLES``)."""
    return [k for k, need in MIN_SAMPLES.items() if n < need]


def time_requests(
    fn: Scorer,
    requests: Sequence[Request],
    *,
    warmup: int = 2,
    repeats: int = 1,
    progress: Callable[[int], Any] | None = None,
) -> tuple[list[int], list[npt.NDArray[np.float32]]]:
    """Serves every request ``repeats`` times, one at a time, after ``warmup`` untimed requests.

    A garbage collection runs before each timed request so that none pays for another's garbage.

    Returns:
        Per-request latencies in nanoseconds (request order, pass after pass) and the scores of
        the first pass.
    """
    for q, docs in list(requests)[:warmup]:
        fn(q, docs)
        if progress:
            progress(1)
    lat_ns: list[int] = []
    scores: list[npt.NDArray[np.float32]] = []
    for rep in range(repeats):
        for q, docs in requests:
            gc.collect()
            t = time.perf_counter_ns()
            s = fn(q, docs)
            lat_ns.append(time.perf_counter_ns() - t)
            if rep == 0:
                scores.append(np.asarray(s, dtype=np.float32))
            if progress:
                progress(1)
    return lat_ns, scores
