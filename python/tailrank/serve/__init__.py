"""``tailrank serve``: an HTTP reranking server with cross-request batching, deadlines and
admission control (needs the ``serve`` extra: fastapi, uvicorn, prometheus-client).

Imports are lazy: the command line imports ``tailrank.serve.cli`` to register the command
without loading the web stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "Limits", "ServeError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
