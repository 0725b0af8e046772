"""Fresh chunks: committed, not yet in the HNSW graph, searched exactly (brute force).

A write appends its vectors here (O(change)); a background pass inserts them into the graph
and then drops them from here, so an HNSW insertion (whose cost grows with the collection)
never sits on the write path. Every change happens under the collection's exclusive lock;
searches read under the shared lock.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_TINY = 1e-30  # norms normalized in float64


class Fresh:
    """Keys, vectors (normalized for cosine) and liveness of the chunks not yet in the graph."""

    def __init__(self, dim: int, metric: str) -> None:
        self.dim, self.metric = dim, metric
        self.keys = np.zeros(0, dtype=np.int64)
        self.vecs = np.zeros((0, dim), dtype=np.float32)
        self.alive = np.zeros(0, dtype=bool)
        self.count = 0
        self.dead = 0
        self.slot: dict[int, int] = {}

    @property
    def live(self) -> int:
        return self.count - self.dead

    def prepare(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Vectors as the graph scores them (outside any lock)."""
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.metric != "cosine" or not v.size:
            return v
        # Squares summed in float64: a float32 sum overflows from |x| ~ 1e19 (a zero row after).
        norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))
        out = v * (1.0 / np.where(norms >= _TINY, norms, 1.0)).astype(np.float32)[:, None]  # zero rows stay zero
        tiny = (norms > 0) & (norms < _TINY)
        if tiny.any():  # 1 / norm overflows float32 below ~3e-39: those rows divide in float64
            out[tiny] = v[tiny].astype(np.float64) / norms[tiny, None]
        return out

    def append(self, keys: npt.NDArray[np.int64], prepared: npt.NDArray[np.float32]) -> None:
        m = int(keys.size)
        if not m:
            return
        need = self.count + m
        if need > self.keys.size:  # geometric growth: amortized O(change)
            cap = max(need, 2 * self.keys.size, 256)
            for name, shape, dtype in (("keys", (cap,), np.int64), ("vecs", (cap, self.dim), np.float32),
                                       ("alive", (cap,), bool)):
                old = getattr(self, name)
                new = np.zeros(shape, dtype=dtype)
                new[: self.count] = old[: self.count]
                setattr(self, name, new)
        self.keys[self.count : need] = keys
        self.vecs[self.count : need] = prepared
        self.alive[self.count : need] = True
        for i, k in enumerate(keys.tolist()):
            self.slot[k] = self.count + i
        self.count = need

    def kill(self, key: int) -> bool:
        """Marks a fresh key deleted; False if the key is not fresh (it is in the graph)."""
        i = self.slot.get(key)
        if i is None:
            return False
        if self.alive[i]:
            self.alive[i] = False
            self.dead += 1
        return True

    def is_dead(self, key: int) -> bool:
        i = self.slot.get(key)
        return i is not None and not bool(self.alive[i])

    def drop_first(self, m: int) -> None:
        """Forgets the first ``m`` entries (moved into the graph), keeping later appends."""
        rest = slice(m, self.count)
        keys, vecs, alive = self.keys[rest].copy(), self.vecs[rest].copy(), self.alive[rest].copy()
        self.keys, self.vecs, self.alive = keys, vecs, alive
        self.count = int(keys.size)
        self.dead = int(self.count - alive.sum())
        self.slot = {k: i for i, k in enumerate(keys.tolist())}

    def search(
        self, q: npt.NDArray[np.float32], k: int, allow: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The exact top-k of the live fresh chunks (inside ``allow``), best first."""
        n = self.count
        if not n or not k:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        mask = self.alive[:n].copy()
        if allow is not None:
            mask &= np.isin(self.keys[:n], allow)
        idx = np.flatnonzero(mask)
        if not idx.size:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        v = self.vecs[idx]
        if self.metric == "l2":
            d = v - q[None, :]
            sc = np.einsum("ij,ij->i", d, d).astype(np.float32)
            order = np.argsort(sc, kind="stable")[:k]
        else:
            qq = self.prepare(q[None, :])[0]
            sc = (v @ qq).astype(np.float32)
            order = np.argsort(-sc, kind="stable")[:k]
        return self.keys[idx[order]], sc[order]
