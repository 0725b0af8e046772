"""A bounded, thread-safe cache of cross-encoder logits keyed by exact token ids.

A key is a 16-byte blake2b digest of (model fingerprint, query token ids, document token ids),
each array framed by its length, so no two distinct (query, document) pairs share a key unless
blake2b collides (2**-64 at a billion entries). The value is the raw logit row (float32 bytes):
raw and normalized scores are both derived from it, so a hit is bit-identical to the miss that
stored it. Eviction is least-recently-used, by bytes.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._validate import positive_int

__all__ = ["ScoreCache", "CacheStats", "CacheLookup", "pair_keys"]

# OrderedDict bookkeeping per entry beyond the key and value objects (hash slot, linked-list
# node); tracemalloc measured 70-140 bytes depending on where the table is in its resize cycle.
_SLOT_BYTES = 112
_KEY_BYTES = 16


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`ScoreCache` (a consistent snapshot: taken under its lock).

    ``hits + misses`` is the number of pairs looked up; ``bytes`` is the memory charged for the
    ``entries`` held (key, value and container overhead), never above ``capacity_bytes``.
    """

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass(frozen=True)
class CacheLookup:
    """One request's lookup: its keys, the logits of its hits (other rows undefined) and the
    positions of its misses, in request order."""

    keys: list[bytes]
    logits: npt.NDArray[np.float32]  # [n, n_labels]
    miss: npt.NDArray[np.int64]

    @property
    def all_hit(self) -> bool:
        return self.miss.size == 0


# Appended to the fingerprint of a pair cut keeping its ends: its logits differ from the same
# token ids cut keeping the starts (the fingerprint's "truncation" describes the latter).
_LEFT_SIDE = b"|truncation_side=left"


def pair_keys(
    fingerprint: bytes,
    queries: Sequence[npt.NDArray[np.int32]],
    query_index: npt.ArrayLike | None,
    docs: Sequence[npt.NDArray[np.int32]],
    keep_ends: npt.ArrayLike | None = None,
) -> list[bytes]:
    """Cache keys of the pairs (``queries[query_index[i]]``, ``docs[i]``); ``query_index`` None
    pairs every document with ``queries[0]``. Token ids are hashed as int32, length-framed.
    ``keep_ends`` marks pairs the assembly cuts keeping the ends (left truncation): they are
    keyed apart from the same ids cut keeping the starts."""

    def bases(fp: bytes) -> list[hashlib.blake2b]:
        out = []
        for q in queries:
            h = hashlib.blake2b(digest_size=_KEY_BYTES)
            h.update(len(fp).to_bytes(4, "little"))
            h.update(fp)
            q32 = np.ascontiguousarray(q, dtype=np.int32)
            h.update(q32.size.to_bytes(8, "little"))
            h.update(q32.data)
            out.append(h)
        return out

    right = bases(fingerprint)
    index = [0] * len(docs) if query_index is None else np.asarray(query_index, dtype=np.int64).tolist()
    ends = [False] * len(docs) if keep_ends is None else np.asarray(keep_ends, dtype=bool).tolist()
    left = bases(fingerprint + _LEFT_SIDE) if any(ends) else right
    out = []
    for qi, d, e in zip(index, docs, ends):
        h = (left if e else right)[qi].copy()
        d32 = np.ascontiguousarray(d, dtype=np.int32)
        h.update(d32.size.to_bytes(8, "little"))
        h.update(d32.data)
        out.append(h.digest())
    return out


class ScoreCache:
    """A thread-safe LRU map of pair key -> raw logits, bounded in bytes.

    Args:
        capacity_bytes: Memory the entries may hold (0 keeps nothing: every lookup misses).
        n_labels: Logits per pair (1 or 2), fixed for the cache's life.
    """

    def __init__(self, capacity_bytes: int, n_labels: int = 1) -> None:
        self.capacity_bytes = positive_int(capacity_bytes, "cache_bytes", minimum=0)
        self.n_labels = positive_int(n_labels, "n_labels")
        self._value_bytes = 4 * self.n_labels
        # Every entry has the same size: one 16-byte key and one float32 row, as bytes objects.
        self.entry_bytes = sys.getsizeof(b"\0" * _KEY_BYTES) + sys.getsizeof(b"\0" * self._value_bytes) + _SLOT_BYTES
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def lookup(self, keys: Sequence[bytes]) -> CacheLookup:
        """The logits of the keys found (marked recently used) and the positions of the others."""
        found: list[bytes | None] = []
        with self._lock:
            get, touch = self._items.get, self._items.move_to_end
            for k in keys:
                v = get(k)
                if v is not None:
                    touch(k)
                found.append(v)
            n_hit = len(keys) - found.count(None)
            self._hits += n_hit
            self._misses += len(keys) - n_hit
        logits = np.empty((len(keys), self.n_labels), dtype=np.float32)
        hit = np.fromiter((v is not None for v in found), dtype=bool, count=len(found))
        if n_hit:
            joined = b"".join(v for v in found if v is not None)
            logits[hit] = np.frombuffer(joined, dtype=np.float32).reshape(n_hit, self.n_labels)
        return CacheLookup(list(keys), logits, np.flatnonzero(~hit).astype(np.int64))

    def holds(self, keys: Sequence[bytes]) -> npt.NDArray[np.bool_]:
        """Whether each key is held now, without counting a lookup or marking it used (a hint:
        an entry may be evicted right after)."""
        with self._lock:
            items = self._items
            return np.fromiter((k in items for k in keys), dtype=bool, count=len(keys))

    def store(self, keys: Sequence[bytes], logits: npt.ArrayLike) -> None:
        """Stores the logits rows ([len(keys), n_labels], float32) of ``keys``, evicting the least
        recently used entries beyond the capacity."""
        rows = np.ascontiguousarray(logits, dtype=np.float32).reshape(len(keys), self.n_labels)
        buf = rows.tobytes()
        w = self._value_bytes
        values = [buf[i * w : (i + 1) * w] for i in range(len(keys))]
        cap = self.capacity_bytes // self.entry_bytes
        if cap == 0:
            return
        with self._lock:
            items = self._items
            for k, v in zip(keys, values):
                items[k] = v
                items.move_to_end(k)
            over = len(items) - cap
            for _ in range(max(0, over)):
                items.popitem(last=False)
            self._evictions += max(0, over)

    def store_misses(self, found: CacheLookup, logits: npt.ArrayLike, scored: npt.ArrayLike | None = None) -> None:
        """Stores the logits of ``found``'s misses (rows in miss order); with ``scored`` (a mask
        over those rows) only the scored ones: an unscored row holds no logit."""
        rows = np.asarray(logits, dtype=np.float32).reshape(found.miss.size, self.n_labels)
        keys = [found.keys[i] for i in found.miss.tolist()]
        if scored is not None:
            mask = np.asarray(scored, dtype=bool)
            keys = [k for k, m in zip(keys, mask.tolist()) if m]
            rows = rows[mask]
        self.store(keys, rows)

    def stats(self) -> CacheStats:
        with self._lock:
            n = len(self._items)
            return CacheStats(self._hits, self._misses, self._evictions, n, n * self.entry_bytes, self.capacity_bytes)

    def clear(self) -> None:
        """Drops every entry (the counters stay)."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"ScoreCache(capacity_bytes={s.capacity_bytes}, entries={s.entries}, hits={s.hits}, "
                f"misses={s.misses}, evictions={s.evictions})")
