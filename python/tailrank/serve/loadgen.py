"""An open-loop Poisson load generator (no coordinated omission).

Arrival times are drawn up front from a seeded RNG (exponential gaps at ``rate`` per second) and
each request is sent at its scheduled absolute time whatever happened to earlier ones; latency is
measured from the *scheduled* send time, so a stalled client or server shows up as latency
instead of silently thinning the load. A request that finds ``concurrency_limit`` requests still
in flight is not sent and is recorded with status 0 (``error="client concurrency limit"``), so the
limit never delays the schedule either.

    records = run_open_loop("http://127.0.0.1:8080/rerank", lambda n: body_for(n), rate=20,
                            duration_s=60, seed=0)
    print(summarize(records, duration_s=60))
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Record", "arrival_times", "run_open_loop", "run_open_loop_async", "summarize"]


@dataclass(frozen=True)
class Record:
    """One scheduled request.

    Attributes:
        n: Its number (the argument ``make_body`` got).
        scheduled_s: Scheduled send time, seconds after the run's start.
        latency_s: From the scheduled send time to the end of the response (or of the failure).
        status: HTTP status, 0 when no response came (transport error, timeout, not sent).
        degraded: The server said it ranked only part of the documents (X-Tailrank-Degraded).
        error: Why there is no response, else None.
        server_s: The server's own time for it (its ``Server-Timing`` header), when it says.
    """

    n: int
    scheduled_s: float
    latency_s: float
    status: int
    degraded: bool = False
    error: str | None = None
    server_s: float | None = None


def _server_seconds(header: str | None) -> float | None:
    """The summed ``dur`` (ms) of a ``Server-Timing`` header, in seconds."""
    if not header:
        return None
    total, found = 0.0, False
    for metric in header.split(","):
        for param in metric.split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    total += float(value)
                    found = True
                except ValueError:
                    pass
    return total / 1000 if found else None


def arrival_times(rate: float, duration_s: float, seed: int) -> np.ndarray:
    """Poisson arrivals in [0, duration_s): cumulative exponential gaps of mean 1/rate."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s must be > 0, got {rate} and {duration_s}")
    rng = np.random.default_rng(seed)
    expected = int(rate * duration_s)
    times = np.cumsum(rng.exponential(1.0 / rate, size=expected + 10 * int(np.sqrt(expected) + 10)))
    while times[-1] < duration_s:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=expected + 10))])
    return times[times < duration_s]


async def run_open_loop_async(
    url: str,
    make_body: Callable[[int], Any],
    rate: float,
    duration_s: float,
    seed: int = 0,
    *,
    headers: Mapping[str, str] | None = None,
    concurrency_limit: int = 1024,
    timeout_s: float = 120.0,
    client: Any = None,
) -> list[Record]:
    """Offers ``rate`` requests per second (Poisson) for ``duration_s`` seconds to ``url``; the
    coroutine behind :func:`run_open_loop`.

    Args:
        url: Where to POST each body as JSON.
        make_body: Request number -> JSON body (called for every request before the run).
        rate: Mean arrivals per second.
        duration_s: Length of the arrival schedule; the call returns when every sent request
            has been answered (or has failed or timed out).
        seed: Seeds the arrival times.
        headers: Sent with every request (e.g. Authorization, X-Request-Timeout-Ms).
        concurrency_limit: Requests in flight at most; an arrival beyond it is recorded unsent.
        timeout_s: Per-request client timeout.
        client: An ``httpx.AsyncClient`` to send with (e.g. over an in-process ASGI transport),
            else one is made for the run.

    Returns:
        One :class:`Record` per scheduled arrival, in schedule order.
    """
    import httpx

    times = arrival_times(rate, duration_s, seed)
    # Built and encoded before the clock starts: the latency measured is the server's, not the
    # client's JSON encoder (~0.4 ms for a 100-document body, more when the client is starved).
    bodies = [json.dumps(make_body(n)).encode() for n in range(len(times))]
    sent_headers = {"content-type": "application/json", **dict(headers or {})}
    own = client is None
    if own:
        limits = httpx.Limits(max_connections=concurrency_limit, max_keepalive_connections=concurrency_limit)
        client = httpx.AsyncClient(limits=limits, timeout=timeout_s)
    records: list[Record | None] = [None] * len(times)
    in_flight = 0
    loop = asyncio.get_running_loop()

    async def one(n: int, due: float) -> None:
        nonlocal in_flight
        try:
            resp = await client.post(url, content=bodies[n], headers=sent_headers)
            await resp.aread()
            degraded = resp.headers.get("x-tailrank-degraded", "false").lower() == "true"
            records[n] = Record(n, float(times[n]), loop.time() - due, resp.status_code, degraded,
                                server_s=_server_seconds(resp.headers.get("server-timing")))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            records[n] = Record(n, float(times[n]), loop.time() - due, 0, False, f"{type(e).__name__}: {e}")
        finally:
            in_flight -= 1

    tasks = []
    try:
        start = loop.time() + 0.05  # a moment to schedule the first
        for n, t in enumerate(times):
            due = start + float(t)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= concurrency_limit:
                records[n] = Record(n, float(t), 0.0, 0, False, "client concurrency limit")
                continue
            in_flight += 1
            tasks.append(asyncio.ensure_future(one(n, due)))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        if own:
            await client.aclose()
    return [r for r in records if r is not None]


def run_open_loop(*args: Any, **kwargs: Any) -> list[Record]:
    """Offers ``rate`` requests per second (Poisson) for ``duration_s`` seconds to ``url``:
    :func:`run_open_loop_async`, with the same arguments, run to completion in a fresh event loop.

    Returns:
        One :class:`Record` per scheduled arrival, in schedule order.
    """
    return asyncio.run(run_open_loop_async(*args, **kwargs))


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def summarize(records: Sequence[Record], *, duration_s: float, deadline_ms: float | None = None) -> dict[str, Any]:
    """Latency percentiles (ms) of the successful responses and of the 429s, goodput (full,
    non-degraded 200s within the deadline, per second) and status counts."""
    ok = [r for r in records if r.status == 200]
    good = [r for r in ok if not r.degraded and (deadline_ms is None or r.latency_s * 1000 <= deadline_ms)]
    rejected = [r for r in records if r.status == 429]
    lat = [r.latency_s * 1000 for r in ok]
    rej = [r.latency_s * 1000 for r in rejected]
    rej_server = [r.server_s * 1000 for r in rejected if r.server_s is not None]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "offered": len(records),
        "offered_rps": len(records) / duration_s,
        "ok": len(ok),
        "degraded": sum(r.degraded for r in ok),
        "rejected": len(rejected),
        "status_counts": statuses,
        "goodput_rps": len(good) / duration_s,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "p999_ms": _pct(lat, 99.9),
        "max_ms": max(lat) if lat else None,
        "reject_p50_ms": _pct(rej, 50),
        "reject_p99_ms": _pct(rej, 99),
        # The same 429s as the server timed them (Server-Timing): the rest is network, the
        # client's own scheduling and waiting for the server's event loop to read the request.
        "reject_server_p50_ms": _pct(rej_server, 50),
        "reject_server_p99_ms": _pct(rej_server, 99),
    }
