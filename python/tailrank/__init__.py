"""tailrank: fast, tail-latency-predictable two-stage retrieval (HNSW + cross-encoder reranking)."""

from __future__ import annotations

from . import errors
from ._core import distance_isa
from .cross_encoder import CrossEncoder
from .docstore import DocStore
from .index import VectorIndex
from .pairs import Assembly, Batch, PairBatcher, PairTemplate, retrieve_and_assemble

__version__ = "0.1.0"

__all__ = [
    "Assembly",
    "Batch",
    "CrossEncoder",
    "DocStore",
    "PairBatcher",
    "PairTemplate",
    "VectorIndex",
    "distance_isa",
    "errors",
    "retrieve_and_assemble",
]
