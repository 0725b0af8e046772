"""Typed errors raised by tailrank. Every error derives from :class:`TailrankError`."""

from __future__ import annotations

__all__ = [
    "TailrankError",
    "CorruptFileError",
    "UnknownIdError",
    "ConcurrentUseError",
    "ModelError",
    "ModelMismatchError",
    "FilterError",
    "DuplicateIdError",
    "LimitError",
    "FusionError",
    "StoreURIError",
    "BackendError",
    "ClosedError",
]


class TailrankError(Exception):
    """Base class of every error tailrank raises on purpose."""


class CorruptFileError(TailrankError):
    """A saved file is truncated, bit-flipped, empty, of another format version, or not ours."""


class UnknownIdError(TailrankError, KeyError):
    """An id that is not present (in an index or a DocStore)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConcurrentUseError(TailrankError, RuntimeError):
    """An object meant for one thread at a time was used by two at once."""


class ModelError(TailrankError):
    """A model directory is missing files, is invalid, or is not a cross-encoder."""


class ModelMismatchError(ModelError):
    """A collection was opened with a model other than the one it was built with."""


class FilterError(TailrankError, ValueError):
    """A metadata filter that is malformed or uses an unknown operator."""


class DuplicateIdError(TailrankError, ValueError):
    """An id given twice in one call, or added when it already exists (use upsert)."""


class LimitError(TailrankError, ValueError):
    """An input larger than a configured limit (characters, documents, tokens, filter size)."""


class FusionError(TailrankError, ValueError):
    """A score-fusion setting that is malformed (unknown method, weight outside [0, 1], bad k)."""


class StoreURIError(TailrankError, ValueError):
    """A collection location that is neither a folder nor a well-formed store URI
    (``milvus://HOST:PORT/NAME``): an unknown scheme, a bad host, port or name."""


class BackendError(TailrankError):
    """The storage server of a collection (Milvus) is down, refused the connection, timed out or
    failed a request. The message names the URI and what to check; a write it interrupted says
    how much of it was stored and that repeating it (upsert) completes it."""


class ClosedError(TailrankError, RuntimeError):
    """An object used after its ``close()`` (a Collection): open it again to use it."""
