"""tailrank: fast, tail-latency-predictable two-stage retrieval (HNSW + cross-encoder reranking)."""

from __future__ import annotations

from . import errors
from ._core import distance_isa
from ._score_cache import CacheStats, ScoreCache
from .collection import Collection, Hit, SearchResult
from .cross_encoder import CrossEncoder
from .docstore import DocStore
from .embedder import Embedder
from .index import VectorIndex
from .pairs import Assembly, Batch, PairBatcher, PairTemplate, retrieve_and_assemble

__version__ = "0.1.0"

__all__ = [
    "Assembly",
    "Batch",
    "CacheStats",
    "Collection",
    "Hit",
    "SearchResult",
    "CrossEncoder",
    "DocStore",
    "Embedder",
    "PairBatcher",
    "PairTemplate",
    "ScoreCache",
    "VectorIndex",
    "distance_isa",
    "errors",
    "retrieve_and_assemble",
]
