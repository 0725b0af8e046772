"""The data behind the golden index and DocStore files (tests/golden/v*/).

The files were written by the project itself (``python tests/golden/golden_data.py OUT_DIR``
with the build of that format version); the golden-file test regenerates the same data here and
checks that each file still loads and searches to the same results, so a format change is never
silent. numpy's PCG64 stream is stable across numpy releases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DIM = 16
N = 300
DELETED = tuple(range(0, 40, 4))  # positions removed after the build
VOCAB_NARROW = 30522
VOCAB_WIDE = 250002


def index_data() -> tuple[np.ndarray, np.ndarray]:
    """Vectors and ids of the golden index (before the deletions)."""
    rng = np.random.default_rng(1234)
    vecs = rng.standard_normal((N, DIM)).astype(np.float32)
    ids = (np.arange(N, dtype=np.uint64) * 7 + 3).astype(np.uint64)
    return vecs, ids


def queries() -> np.ndarray:
    return np.random.default_rng(99).standard_normal((20, DIM)).astype(np.float32)


def docstore_data(vocab: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ids and token arrays of the golden DocStore for a vocabulary size."""
    rng = np.random.default_rng(vocab)
    ids = (np.arange(50, dtype=np.uint64) * 11 + 5).astype(np.uint64)
    docs = [rng.integers(0, vocab, size=int(rng.integers(0, 40))).astype(np.int64) for _ in range(50)]
    return ids, docs


def write(out: Path) -> None:
    import tailrank

    out.mkdir(parents=True, exist_ok=True)
    for metric in ("cosine", "ip", "l2"):
        index = tailrank.VectorIndex(DIM, metric, M=8, ef_construction=100)
        vecs, ids = index_data()
        index.add(vecs, ids, threads=1)
        index.delete(ids[list(DELETED)])
        index.save(out / f"index-{metric}.bin")
    for name, vocab in (("narrow", VOCAB_NARROW), ("wide", VOCAB_WIDE)):
        store = tailrank.DocStore(vocab)
        ids, docs = docstore_data(vocab)
        store.add(ids, docs)
        store.delete(ids[:3])
        store.save(out / f"docstore-{name}.bin")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
