"""The serving path's errors and the one table that maps every exception to its HTTP answer."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import BackendError, LimitError, ModelError

__all__ = ["ServeError", "Rejected", "BatchFailed", "error_of", "error_response", "send_error"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class ServeError(Exception):
    """An error answered as ``{"detail", "error_type"}`` with ``status`` (see :func:`error_of`)."""

    def __init__(self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = headers or {}


class Rejected(Exception):
    """Refused at admission: ``reason`` is a metrics label, ``retry_after_s`` a hint for clients."""

    def __init__(self, reason: str, message: str, retry_after_s: float, status: int = 429) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status


class BatchFailed(Exception):
    """The model raised on a round holding this request's pairs."""


def error_of(e: BaseException) -> ServeError:
    """The one table: an exception of the serving path -> its HTTP answer."""
    if isinstance(e, ServeError):
        return e
    if isinstance(e, Rejected):
        retry = max(1, math.ceil(e.retry_after_s))
        return ServeError(e.status, str(e), e.reason, {"Retry-After": str(retry)})
    if isinstance(e, RequestValidationError):  # the body or a header does not fit the schema
        where = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors()[:5]
        )
        return ServeError(422, f"invalid request: {where}", "validation")
    if isinstance(e, LimitError):
        return ServeError(413, str(e), "limit")
    if isinstance(e, BackendError):  # the collection's store (Milvus) is down or failing: retry elsewhere
        return ServeError(503, str(e), "backend_unavailable", {"Retry-After": "1"})
    if isinstance(e, ModelError):  # at request time: asked for a model the server does not hold
        return ServeError(422, str(e), "validation")
    if isinstance(e, BatchFailed):
        return ServeError(500, f"the model failed on a batch holding this request: {e}", "model_error")
    if isinstance(e, (ValueError, TypeError)):  # bad input caught below the routes (e.g. a filter)
        return ServeError(422, f"{type(e).__name__}: {e}", "validation")
    return ServeError(500, f"internal error: {type(e).__name__}: {e}", "internal")


def error_response(err: ServeError) -> JSONResponse:
    return JSONResponse({"detail": str(err), "error_type": err.error_type}, err.status, headers=err.headers)


async def send_error(send: Send, err: ServeError) -> None:
    """The same answer as :func:`error_response`, sent on a raw ASGI channel (the gate)."""
    body = json.dumps({"detail": str(err), "error_type": err.error_type}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
