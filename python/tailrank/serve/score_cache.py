"""The server's use of the score cache: look a prepared request's pairs up before they become a
queue job (hits never queue), and store the job's logits when its result comes back.

Two hook points, independent of how the server is split into stages:
:meth:`RequestCache.lookup` where a request's pairs are final (token ids and which cut pairs keep
their ends), and :meth:`RequestCache.finish` where the job's result arrives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .._score_cache import CacheLookup, ScoreCache, pair_keys
from .queue import JobResult
from .validate import Pairs

__all__ = ["RequestCache", "DEFAULT_SCORE_CACHE_BYTES"]

#: Default size of the server's score cache (about 330k one-logit pairs).
DEFAULT_SCORE_CACHE_BYTES = 64 << 20


class RequestCache:
    """The cache and the fingerprint of the model whose logits it holds."""

    def __init__(self, cache: ScoreCache, fingerprint: bytes) -> None:
        self.cache = cache
        self.fingerprint = fingerprint

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
                     ends if ends is not None and ends.any() else None)

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
