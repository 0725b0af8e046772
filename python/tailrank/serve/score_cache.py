"""The server's use of the score cache: look a prepared request's pairs up before they become a
queue job (hits never queue), and store the job's logits when its result comes back.

Admission asks it too: a request the full estimate would refuse is admitted on the pairs the
cache does not hold, when an earlier request had the same texts (:meth:`RequestCache.uncached`),
so a cached request is never refused for queue time it would not use.

Two hook points, independent of how the server is split into stages:
:meth:`RequestCache.lookup` where a request's pairs are final (token ids and which cut pairs keep
their ends), and :meth:`RequestCache.finish` where the job's result arrives.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from .._score_cache import _KEY_BYTES, CacheLookup, ScoreCache, pair_keys
from .queue import JobResult
from .validate import Pairs, RerankSpec

__all__ = ["RequestCache", "DEFAULT_SCORE_CACHE_BYTES"]

#: Default size of the server's score cache (about 330k one-logit pairs).
DEFAULT_SCORE_CACHE_BYTES = 64 << 20
# The requests' pair keys remembered for admission, as a share of the score cache's size.
_REQUESTS_SHARE = 8
# Memory charged per remembered request beyond its 16 bytes per pair (key, bytes objects, slot).
_REQUEST_OVERHEAD_BYTES = 200


class RequestCache:
    """The cache and the fingerprint of the model whose logits it holds."""

    def __init__(self, cache: ScoreCache, fingerprint: bytes) -> None:
        self.cache = cache
        self.fingerprint = fingerprint
        # Request digest -> its pair keys (LRU, bounded in bytes): which texts' pairs to probe
        # before a request is tokenized (its pair keys need token ids).
        self._requests: OrderedDict[bytes, bytes] = OrderedDict()
        self._requests_bytes = 0
        self.requests_capacity_bytes = cache.capacity_bytes // _REQUESTS_SHARE
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: Any, capacity_bytes: int) -> RequestCache | None:
        """The model's own cache when it has one (shared with library calls on it), else a new
        one of ``capacity_bytes``; None when that is 0 or the model has no ``score_fingerprint``
        (without an identity for its scores nothing could be keyed safely)."""
        fingerprint = getattr(model, "score_fingerprint", None)
        if not isinstance(fingerprint, bytes):
            return None
        own = getattr(model, "score_cache", None)
        if isinstance(own, ScoreCache):
            return cls(own, fingerprint)
        if capacity_bytes == 0:
            return None
        return cls(ScoreCache(capacity_bytes, int(model.n_labels)), fingerprint)

    @staticmethod
    def request_digest(spec: RerankSpec) -> bytes:
        """A digest of what decides a request's token ids: its texts (validated Unicode) and how
        they are cut (side, per-document cap) and, for an LLM reranker, its instruction."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{int(spec.left)}|{spec.max_tokens_per_doc}|{len(spec.texts)}|{int(spec.instruction is None)}|".encode())
        for t in (spec.query, *([] if spec.instruction is None else [spec.instruction]), *spec.texts):
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.digest()

    def remember(self, digest: bytes, found: CacheLookup) -> None:
        """Keeps a request's pair keys under its digest, for :meth:`uncached` (on the
        tokenizing thread)."""
        keys = b"".join(found.keys)
        size = len(keys) + _REQUEST_OVERHEAD_BYTES
        if size > self.requests_capacity_bytes:
            return
        with self._lock:
            old = self._requests.pop(digest, None)
            if old is not None:
                self._requests_bytes -= len(old) + _REQUEST_OVERHEAD_BYTES
            self._requests[digest] = keys
            self._requests_bytes += size
            while self._requests_bytes > self.requests_capacity_bytes:
                _, dropped = self._requests.popitem(last=False)
                self._requests_bytes -= len(dropped) + _REQUEST_OVERHEAD_BYTES

    def uncached(self, digest: bytes) -> npt.NDArray[np.int64] | None:
        """Positions of a request's pairs the cache does not hold now, or None when no request
        with its digest was seen (nothing is known about its pairs)."""
        with self._lock:
            keys = self._requests.get(digest)
            if keys is not None:
                self._requests.move_to_end(digest)
        if keys is None:
            return None
        held = self.cache.holds([keys[i : i + _KEY_BYTES] for i in range(0, len(keys), _KEY_BYTES)])
        return np.flatnonzero(~held).astype(np.int64)

    def lookup(self, pairs: Pairs) -> CacheLookup:
        """Hook (b): the cached logits of a prepared request's pairs and the positions of the
        misses. Hashes on the calling (tokenizing) thread; the cache's lock is held only for the
        dictionary reads."""
        return self.cache.lookup(pair_keys(self.fingerprint, pairs.queries, pairs.query_index, pairs.docs,
                                           pairs.keep_ends))

    @staticmethod
    def misses(found: CacheLookup, pairs: Pairs) -> Pairs:
        """The missed pairs, in request order: what the scheduling job is built from."""
        m = found.miss
        ends = None if pairs.keep_ends is None else pairs.keep_ends[m]
        return Pairs(pairs.queries, pairs.query_index[m], [pairs.docs[i] for i in m.tolist()], pairs.lengths[m],
                     ends if ends is not None and ends.any() else None, pairs.prompt_tokens)

    def finish(self, found: CacheLookup, result: JobResult | None) -> JobResult:
        """Hook (c): stores the scored logits of the misses' job (``result``, in miss order; None
        when every pair hit) and returns the request's whole result in request order."""
        n = len(found.keys)
        logits = found.logits.copy()
        scored = np.ones(n, dtype=bool)
        if result is None:
            return JobResult(logits, scored, 0.0, 0.0)
        self.cache.store_misses(found, result.values, result.scored)
        logits[found.miss] = result.values
        scored[found.miss] = result.scored
        return JobResult(logits, scored, result.queue_s, result.score_s)
