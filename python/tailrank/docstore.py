"""DocStore: documents' token ids in one compact arena, keyed by the index's ids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._validate import existing_file, as_ids, positive_int

__all__ = ["DocStore"]


def flatten_tokens(docs: Any) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Turns token-id lists, or a ``(flat, offsets)`` pair, into int64 (flat, offsets) arrays."""
    if isinstance(docs, tuple) and len(docs) == 2 and not isinstance(docs[0], (list, tuple)):
        flat = np.ascontiguousarray(docs[0])
        offsets = np.ascontiguousarray(docs[1])
        for name, arr in (("flat", flat), ("offsets", offsets)):
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise ValueError(f"{name} must be a 1-D integer array")
        return flat.astype(np.int64, copy=False), offsets.astype(np.int64, copy=False)
    if not isinstance(docs, Sequence) and not isinstance(docs, np.ndarray):
        raise TypeError("documents must be a list of token-id sequences or a (flat, offsets) pair")
    arrays = [np.asarray(d) for d in docs]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"document {i} must be a 1-D sequence of integer token ids")
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    return flat, offsets


class DocStore:
    """Pre-tokenized documents, stored as uint16 when the vocabulary fits, else int32.

    Thread-safe; heavy work releases the GIL.

    Args:
        vocab_size: Every token id must be in ``[0, vocab_size)``.
    """

    def __init__(self, vocab_size: int) -> None:
        self._compiled = _core.DocStore(positive_int(vocab_size, "vocab_size"))

    @classmethod
    def _wrap(cls, compiled: _core.DocStore) -> DocStore:
        obj = cls.__new__(cls)
        obj._compiled = compiled
        return obj

    @property
    def vocab_size(self) -> int:
        return self._compiled.vocab_size

    @property
    def dtype(self) -> np.dtype[Any]:
        """Storage dtype: uint16 or int32."""
        return np.dtype(np.int32 if self._compiled.wide else np.uint16)

    def add(self, ids: npt.ArrayLike, documents: Any) -> None:
        """Adds or replaces documents.

        Args:
            ids: One id per document.
            documents: A list of token-id sequences, or a ``(flat, offsets)`` pair where document
                i is ``flat[offsets[i]:offsets[i+1]]``.
        """
        id_arr = as_ids(ids)
        flat, offsets = flatten_tokens(documents)
        if offsets.shape[0] != id_arr.shape[0] + 1:
            raise ValueError(f"got {id_arr.shape[0]} ids but {offsets.shape[0] - 1} documents; pass one id per document")
        self._compiled.add(id_arr, flat, offsets)

    def get(self, id: int) -> npt.NDArray[np.int32]:
        """Token ids of one document; raises UnknownIdError if absent."""
        return self._compiled.get(int(as_ids(id)[0]))

    def delete(self, ids: npt.ArrayLike) -> None:
        """Deletes documents; raises UnknownIdError (and deletes nothing) if one is absent."""
        self._compiled.remove(as_ids(ids))

    def ids(self) -> npt.NDArray[np.int64]:
        return self._compiled.ids()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the store atomically (temp file, fsync, rename) with a checksummed header."""
        self._compiled.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DocStore:
        """Loads and verifies a saved store; raises CorruptFileError on any damage."""
        return cls._wrap(_core.DocStore.load(existing_file(path)))

    def __len__(self) -> int:
        return len(self._compiled)

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or int(id) < 0 or int(id) >= 2**63:
            return False
        return int(id) in self._compiled

    def __repr__(self) -> str:
        return f"DocStore(size={len(self)}, vocab_size={self.vocab_size}, dtype={self.dtype})"
