"""VectorIndex: a thread-safe HNSW index (hnswlib) with atomic, verified persistence."""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from . import _core
from ._validate import existing_file, as_float_matrix, as_ids, positive_int

Metric = Literal["cosine", "ip", "l2"]

__all__ = ["VectorIndex", "Metric"]


def _allow_list(allow: Any) -> _core.AllowList | None:
    if allow is None:
        return None
    if isinstance(allow, _core.AllowList):
        return allow
    if isinstance(allow, (set, frozenset)):
        allow = np.fromiter(allow, dtype=np.int64, count=len(allow)) if allow else np.zeros(0, np.int64)
    return _core.AllowList(as_ids(allow, "allow"))


class VectorIndex:
    """An HNSW approximate nearest-neighbour index over float32 vectors.

    Every method is safe to call from many threads; heavy work releases the GIL. Searches share a
    lock; ``add``/``delete`` take it exclusively in chunks, so searches interleave with long adds.

    Args:
        dim: Vector dimension.
        metric: ``"cosine"`` (vectors normalized on add and search), ``"ip"`` (inner product) or
            ``"l2"`` (squared Euclidean distance).
        M: HNSW graph degree.
        ef_construction: Beam width while building.
        capacity: Initial capacity; the index grows by itself.
    """

    def __init__(
        self,
        dim: int,
        metric: Metric = "cosine",
        *,
        M: int = 16,
        ef_construction: int = 200,
        capacity: int | None = None,
    ) -> None:
        positive_int(dim, "dim")
        positive_int(M, "M", minimum=2)
        positive_int(ef_construction, "ef_construction")
        cap = 0 if capacity is None else positive_int(capacity, "capacity", minimum=0)
        self._compiled = _core.VectorIndex(int(dim), str(metric), int(M), int(ef_construction), cap)

    @classmethod
    def _wrap(cls, compiled: _core.VectorIndex) -> VectorIndex:
        obj = cls.__new__(cls)
        obj._compiled = compiled
        return obj

    @property
    def dim(self) -> int:
        return self._compiled.dim

    @property
    def metric(self) -> str:
        return self._compiled.metric

    @property
    def capacity(self) -> int:
        return self._compiled.capacity

    @property
    def ef(self) -> int:
        """The default search beam width (``ef``) used when a search passes none."""
        return self._compiled.default_ef

    @ef.setter
    def ef(self, value: int) -> None:
        self._compiled.default_ef = positive_int(value, "ef")

    def add(self, vectors: npt.ArrayLike, ids: npt.ArrayLike, *, threads: int | None = None) -> None:
        """Adds vectors under ids; an id already present has its vector replaced.

        Args:
            vectors: float array [n, dim] (or [dim] for one vector); other dtypes are converted.
            ids: n non-negative integer ids (int64 or uint64).
            threads: Build threads (default: all cores).
        """
        mat, _ = as_float_matrix(vectors, self.dim, "vectors")
        id_arr = as_ids(ids)
        if id_arr.shape[0] != mat.shape[0]:
            raise ValueError(f"got {mat.shape[0]} vectors but {id_arr.shape[0]} ids; pass one id per vector")
        self._compiled.add(mat, id_arr, 0 if threads is None else positive_int(threads, "threads"))

    def delete(self, ids: npt.ArrayLike) -> None:
        """Deletes ids; raises UnknownIdError (and deletes nothing) if one is absent."""
        self._compiled.remove(as_ids(ids))

    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        *,
        ef: int | None = None,
        allow: Any = None,
        threads: int | None = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Finds the k nearest vectors of each query.

        Args:
            queries: One vector [dim] or a batch [n, dim].
            k: Results per query.
            ef: Beam width for this call (default: ``self.ef``); at least k is used.
            allow: Optional allow-list of ids (array, list, set or ``AllowList``), applied inside
                the HNSW walk; small lists are searched exactly.
            threads: Threads for a batch (default: all cores).

        Returns:
            ``(ids, scores)``: int64 and float32 arrays of shape [n, k] ([k] for one vector), best
            first, id -1 where fewer than k exist. Scores are similarities for cosine and ip
            (higher is better) and squared distances for l2 (lower is better).
        """
        compiled = self._compiled
        if (
            type(queries) is np.ndarray
            and queries.dtype == np.float32
            and queries.shape == (compiled.dim,)
            and queries.flags.c_contiguous
            and type(k) is int
            and k >= 0
            and allow is None
            and (ef is None or (type(ef) is int and ef > 0))
        ):
            # Service hot path: one contiguous float32 query, checked in the core (GIL released).
            return compiled.search_one(queries, k, ef or 0)
        mat, single = as_float_matrix(queries, self.dim, "queries")
        k = positive_int(k, "k", minimum=0)
        ids, scores = compiled.search(
            mat,
            k,
            0 if ef is None else positive_int(ef, "ef"),
            _allow_list(allow),
            0 if threads is None else positive_int(threads, "threads"),
        )
        if single:
            return ids[0], scores[0]
        return ids, scores

    def ids(self) -> npt.NDArray[np.int64]:
        """The live ids, ascending."""
        return self._compiled.ids()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index atomically (temp file, fsync, rename) with a checksummed header."""
        self._compiled.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VectorIndex:
        """Loads and verifies a saved index; raises CorruptFileError on any damage."""
        return cls._wrap(_core.VectorIndex.load(existing_file(path)))

    def __len__(self) -> int:
        return len(self._compiled)

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or int(id) < 0 or int(id) >= 2**63:
            return False
        return int(id) in self._compiled

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, metric={self.metric!r}, size={len(self)}, ef={self.ef})"
