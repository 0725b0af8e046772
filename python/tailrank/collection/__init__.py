"""Collection: a search pipeline in one folder (ingest -> embed -> HNSW -> rerank).

Layout of a collection folder::

    manifest.json           format version, metric, dim, chunking, model fingerprints, the default
                            score fusion (checksummed; see ``_fusion``)
    meta.sqlite             the log and source of truth (WAL): texts, metadata fields, chunk spans,
                            each chunk's vector and reranker token ids, recent deletions, state
    index-<s>.bin           checkpoint: the HNSW index as of write s (the newest two are kept)
    docstore-<s>.bin        checkpoint: the reranker's pre-tokenized chunks as of write s
    .writer.lock            flock: one writing process at a time
    .checkpoint.lock        flock: one process creating or removing checkpoint files at a time

Writes cost O(change). A write is one SQLite transaction holding everything it changes (new
documents with their chunks' vectors and tokens, their metadata fields, the keys of chunks it
deletes) and the new write number ``seq``: that commit is the commit point. In memory, the new
chunks' tokens go into the DocStore and their vectors into the *fresh part* (``_fresh``), which
searches scan exactly; deletions mark graph or fresh entries. No HNSW insertion (whose cost grows
with the graph) happens on the write path: a background pass moves the fresh part into the graph
once it holds ``FRESH_INDEX_AT`` (1,024) chunks, and a write that finds more than ``FRESH_MAX``
(16,384) waits for it, which bounds the exact scan. The index and DocStore files are
checkpoints: the background pass also saves one when the chunks changed since the last pass
``max(CHECKPOINT_MIN_CHUNKS, CHECKPOINT_FRACTION x chunks)`` (2,048 and 2%), and
:meth:`Collection.close` / :meth:`Collection.checkpoint` save one on request. While a checkpoint
saves, this process's writes wait and searches go on. ``open`` loads the newest checkpoint and
replays the writes after it from the database into the fresh part (no graph insertion either).

Crash safety: nothing but the SQLite commit makes a write durable, so ``kill -9`` at any moment
leaves the last committed write; checkpoint files are written whole (temp, fsync, rename) before
the database points at them, and only the holder of ``.checkpoint.lock`` creates or deletes them,
after the pointer moved past them (see ``_checkpoints``).

Consistency: a search holds the collection's read lock and one SQLite read snapshot from the
allow-set to the result texts, copies the candidates' tokens, and scores after releasing it. A
write stores its new chunks' tokens under keys no search asks for yet, then takes the lock exclusively
only to commit, delete replaced chunks and append the new ones to the fresh part.

Other processes: every search first compares the committed ``seq`` (one indexed row) with its
own and applies the writes it lacks (O(their change)), unless a thread of this process is
writing or checkpointing right then, in which case the next search does; :meth:`refresh` does
it on request. A search therefore sees every write committed before it started, except while
this process itself is busy writing or checkpointing.

The Milvus backend (``milvus://HOST:PORT/NAME``; ``_location``, ``_milvus``, ``_milvus_expr``)
is the same class over a Milvus collection: one row per chunk with its vector, reranker tokens,
text and metadata, the manifest in the side collection ``NAME__tailrank``; no files, locks or
checkpoints here (Milvus persists and indexes), consistency from the URI (default Strong).
"""

from ._collection import CHECKPOINT_FRACTION, CHECKPOINT_MIN_CHUNKS, Collection
from ._fusion import Fusion
from ._inputs import DocId
from ._results import Hit, SearchResult

__all__ = ["Collection", "SearchResult", "Hit", "DocId", "Fusion", "CHECKPOINT_MIN_CHUNKS", "CHECKPOINT_FRACTION"]
