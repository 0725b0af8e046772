"""Where a collection lives: a folder (the embedded store) or a Milvus URI. The one parser of
collection locations, so that a URI is never taken for a path.

URI form::

    milvus://[USER:PASSWORD@]HOST:PORT/NAME[?db=DB&timeout=S&consistency=LEVEL&server_name=CN&ca_pem_path=FILE]
    milvus+https://...        the same over TLS (Zilliz Cloud, a cluster behind TLS)

``NAME`` is the Milvus collection (letters, digits, ``_``; it also names the side collection
``NAME__tailrank`` that holds the manifest). The token is ``USER:PASSWORD`` from the URI, else the
environment variable ``TAILRANK_MILVUS_TOKEN`` (an API key or ``user:password``), which keeps
secrets out of command lines and logs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import StoreURIError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")  # Milvus allows 255; the side collection adds 10
_CONSISTENCY = ("Strong", "Session", "Bounded", "Eventually")
_OPTIONS = ("db", "timeout", "consistency", "server_name", "ca_pem_path")
TOKEN_ENV = "TAILRANK_MILVUS_TOKEN"


@dataclass(frozen=True)
class MilvusURI:
    """A parsed ``milvus://`` location (``token`` is never part of its text)."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    name: str
    db: str = "default"
    timeout: float = 10.0
    consistency: str = "Strong"
    server_name: str | None = None
    ca_pem_path: str | None = None
    token: str = field(default="", repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def __str__(self) -> str:  # what messages and repr show: no credentials
        s = "milvus+https" if self.scheme == "https" else "milvus"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{s}://{host}:{self.port}/{self.name}"

    def client_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"uri": self.endpoint, "db_name": self.db, "timeout": self.timeout}
        if self.token:
            kw["token"] = self.token
        if self.server_name:
            kw["server_name"] = self.server_name
        if self.ca_pem_path:
            kw["ca_pem_path"] = self.ca_pem_path
        return kw


def parse(path: str | os.PathLike[str]) -> Path | MilvusURI:
    """A folder or a Milvus URI. Any other ``scheme://`` and any malformed Milvus URI raise
    :class:`StoreURIError` (never a folder named ``milvus:``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a collection location must be a path or a URI string, got {type(path).__name__}")
    text = os.fspath(path)
    if isinstance(text, bytes):
        raise TypeError("a collection location must be a str path or URI, not bytes")
    m = _SCHEME.match(text)
    if m is None:
        if re.match(r"^milvus(\+https?)?:", text, re.IGNORECASE):  # e.g. Path("milvus://h/x") -> "milvus:/h/x"
            raise StoreURIError(f"{text!r} looks like a Milvus URI but is malformed; write milvus://HOST:PORT/NAME "
                                "(pass it as a string: a Path folds the //)")
        return Path(text)
    scheme = m.group(1).lower()
    if scheme not in ("milvus", "milvus+http", "milvus+https"):
        raise StoreURIError(f"unknown collection URI scheme {scheme!r} in {text!r}; use a folder path, "
                            "milvus://HOST:PORT/NAME or milvus+https://HOST:PORT/NAME")
    return _milvus(text, "https" if scheme == "milvus+https" else "http")


def _milvus(text: str, scheme: str) -> MilvusURI:
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise StoreURIError(f"malformed Milvus URI {_redact(text)!r}: {e}") from None
    host = u.hostname
    if not host:
        raise StoreURIError(f"the Milvus URI {_redact(text)!r} has no host; write milvus://HOST:PORT/NAME")
    if port is None:
        raise StoreURIError(f"the Milvus URI {_redact(text)!r} has no port (Milvus listens on 19530 by default)")
    name = u.path[1:] if u.path.startswith("/") else u.path
    if not _NAME.match(name):
        raise StoreURIError(f"the Milvus URI {_redact(text)!r} needs a collection name after the port: letters, "
                            f"digits and _, not starting with a digit, at most 200 characters (got {name!r})")
    if u.fragment:
        raise StoreURIError(f"the Milvus URI {_redact(text)!r} has a #fragment; options go in ?key=value")
    opts: dict[str, Any] = {}
    try:
        query = parse_qs(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError as e:
        raise StoreURIError(f"malformed options in the Milvus URI {_redact(text)!r}: {e}") from None
    for key, vals in query.items():
        if key not in _OPTIONS:
            raise StoreURIError(f"unknown Milvus URI option {key!r}; known: {', '.join(_OPTIONS)}")
        if len(vals) != 1 or not vals[0]:
            raise StoreURIError(f"the Milvus URI option {key!r} takes one non-empty value")
        opts[key] = vals[0]
    if "timeout" in opts:
        try:
            t = float(opts["timeout"])
        except ValueError:
            t = float("nan")
        if not 0 < t <= 3600:
            raise StoreURIError(f"the Milvus URI option timeout must be seconds in (0, 3600], got {opts['timeout']!r}")
        opts["timeout"] = t
    if "consistency" in opts and opts["consistency"] not in _CONSISTENCY:
        raise StoreURIError(f"consistency must be one of {', '.join(_CONSISTENCY)}, got {opts['consistency']!r}")
    token = ""
    if u.username is not None or u.password is not None:
        token = f"{unquote(u.username or '')}:{unquote(u.password or '')}"
    token = token or os.environ.get(TOKEN_ENV, "")
    return MilvusURI(scheme, host, port, name, token=token, **opts)


def _redact(text: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", text)
