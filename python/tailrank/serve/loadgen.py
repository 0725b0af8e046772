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
import gc
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RawHttpClient", "Record", "arrival_times", "run_open_loop", "run_open_loop_async", "summarize"]


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
        late_s: How late the client sent it after its scheduled time (timer granularity and the
            client's own scheduling; counted in ``latency_s``, as open-loop latency must be).
    """

    n: int
    scheduled_s: float
    latency_s: float
    status: int
    degraded: bool = False
    error: str | None = None
    server_s: float | None = None
    late_s: float = 0.0


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


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams, for the load generator.

    httpx spends about a millisecond of CPU per request on its own machinery (measured here: an
    idle server answers in 1.2 ms to a raw socket, 2.2 ms through httpx); on a machine whose CPUs
    the server saturates, that client time shows up as server latency. This client writes
    pre-encoded bytes and reads the status, the headers and a Content-Length or chunked body,
    nothing more (no redirects, no TLS, no compression). Connections idle longer than
    ``max_idle_s`` are not reused (servers close idle keep-alive connections: uvicorn after 5 s).
    """

    def __init__(self, url: str, *, timeout_s: float = 120.0, max_idle_s: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"RawHttpClient speaks plain http://host:port/path URLs, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        self.max_idle_s = max_idle_s
        self._idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []

    def _head(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        """Sends one POST; returns (status, lower-cased headers, body)."""
        return await asyncio.wait_for(self._post(self._head(body, headers) + body), self.timeout_s)

    async def _post(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        loop = asyncio.get_running_loop()
        while self._idle:
            used, reader, writer = self._idle.pop()
            if loop.time() - used <= self.max_idle_s and not reader.at_eof():
                try:
                    return await self._exchange(reader, writer, request)
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()  # the server closed it meanwhile: a fresh one below
            else:
                writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, request)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        request: bytes) -> tuple[int, dict[str, str], bytes]:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection before answering")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                chunks.append(await reader.readexactly(size + 2))  # the chunk and its CRLF
                if size == 0:
                    break
            payload = b"".join(c[:-2] for c in chunks)
        else:
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((asyncio.get_running_loop().time(), reader, writer))
        return status, headers, payload

    async def aclose(self) -> None:
        for _, _, writer in self._idle:
            writer.close()
        self._idle.clear()


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
            else a :class:`RawHttpClient` is made for the run (``url`` then is http://host:port/path).

    Returns:
        One :class:`Record` per scheduled arrival, in schedule order.
    """
    times = arrival_times(rate, duration_s, seed)
    # Built and encoded before the clock starts: the latency measured is the server's, not the
    # client's JSON encoder (~0.4 ms for a 100-document body, more when the client is starved).
    bodies = [json.dumps(make_body(n)).encode() for n in range(len(times))]
    sent_headers = {"content-type": "application/json", **dict(headers or {})}
    raw = RawHttpClient(url, timeout_s=timeout_s) if client is None else None
    records: list[Record | None] = [None] * len(times)
    in_flight = 0
    loop = asyncio.get_running_loop()

    async def one(n: int, due: float) -> None:
        nonlocal in_flight
        late = max(0.0, loop.time() - due)
        try:
            if raw is not None:
                status, got, _ = await raw.post(bodies[n], sent_headers)
            else:
                resp = await client.post(url, content=bodies[n], headers=sent_headers)
                await resp.aread()
                status, got = resp.status_code, {k.lower(): v for k, v in resp.headers.items()}
            degraded = got.get("x-tailrank-degraded", "false").lower() == "true"
            records[n] = Record(n, float(times[n]), loop.time() - due, status, degraded,
                                server_s=_server_seconds(got.get("server-timing")), late_s=late)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            records[n] = Record(n, float(times[n]), loop.time() - due, 0, False, f"{type(e).__name__}: {e}",
                                late_s=late)
        finally:
            in_flight -= 1

    tasks = []
    # The client's own garbage collections are not the server's latency: a full collection of this
    # process (a benchmark holding a corpus) was seen taking 17-24 ms. Objects that exist now are
    # moved out of the collector's view for the run; what the run itself allocates is still collected.
    gc.collect()
    gc.freeze()
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
        gc.unfreeze()
        if raw is not None:
            await raw.aclose()
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
    rej_sent = [(r.latency_s - r.late_s) * 1000 for r in rejected]
    rej_server = [r.server_s * 1000 for r in rejected if r.server_s is not None]
    late = [r.late_s * 1000 for r in records if r.status]
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
        "reject_max_ms": max(rej) if rej else None,
        # The same 429s timed from when the client actually sent them (without its own lateness).
        "reject_sent_p50_ms": _pct(rej_sent, 50),
        "reject_sent_p99_ms": _pct(rej_sent, 99),
        # How late the client itself sent (included in every latency above).
        "send_late_p50_ms": _pct(late, 50),
        "send_late_p99_ms": _pct(late, 99),
    }
