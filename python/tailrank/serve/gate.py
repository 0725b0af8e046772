"""The ASGI gate in front of every route: API key, body cap, response counts, Server-Timing, and
the request's arrival time (every deadline counts from it)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import ServeError, send_error
from .metrics import ServeMetrics

__all__ = ["Gate", "ARRIVAL", "arrival_of"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health"})
# Scope key holding the request's arrival (time.monotonic()) as the gate saw it.
ARRIVAL = "tailrank.arrival"


def arrival_of(scope: Scope) -> float:
    """When the request reached the server (now, for a scope that did not pass the gate)."""
    return float(scope.get(ARRIVAL, time.monotonic()))


class Gate:
    """Checks the API key (every path but /health), caps the request body (Content-Length first,
    then the bytes actually streamed, refusing as soon as the cap is passed) and counts responses."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServeMetrics,
                 paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL] = time.monotonic()
        path = scope["path"] if scope["path"] in self.paths else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                # Server-Timing: the server's own time (from the request's arrival at the app to
                # its response), so clients can tell it from the network and their own queueing.
                timing = (b"server-timing", f"app;dur={(time.perf_counter() - t0) * 1000:.3f}".encode())
                message = {**message, "headers": [*message.get("headers", []), timing]}
            await send(message)

        try:
            await self._handle(scope, receive, counted_send)
        finally:
            self.metrics.responses.labels(path, str(status["code"])).inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            self.metrics.rejections.labels("unauthorized").inc()
            await send_error(send, ServeError(
                401, "missing or wrong API key: send the header Authorization: Bearer <key>", "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            ))
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(send, ServeError(400, "Content-Length is not a number", "bad_request"))
                return
            if declared > self.max_body:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the connection's own events (http.disconnect)

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        assert self.key is not None
        got = headers.get("authorization", b"")
        scheme, _, token = got.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def _too_large(self, send: Send) -> None:
        self.metrics.rejections.labels("limit").inc()
        await send_error(send, ServeError(
            413, f"the request body exceeds the limit of {self.max_body} bytes (--max-body-bytes)", "limit"
        ))
