"""Atomic, verified small files (JSON manifests): temp file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import CorruptFileError

_CHECK = "sha256"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _digest(obj: dict[str, Any]) -> str:
    body = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def write_json_checked(path: Path, obj: dict[str, Any]) -> None:
    """Atomically writes ``obj`` as JSON with a sha256 of its canonical form."""
    doc = dict(obj)
    doc[_CHECK] = _digest(obj)
    atomic_write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def read_json_checked(path: Path, what: str) -> dict[str, Any]:
    """Reads a file written by :func:`write_json_checked`; any damage is a CorruptFileError."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get(_CHECK), str):
        raise CorruptFileError(f"{what} {path} has no checksum; not written by tailrank")
    check = doc.pop(_CHECK)
    if _digest(doc) != check:
        raise CorruptFileError(f"{what} {path} fails its checksum (damaged or edited)")
    return doc
