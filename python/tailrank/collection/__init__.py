"""Collection: a search pipeline in one folder (ingest -> embed -> HNSW -> rerank).

Layout of a collection folder::

    manifest.json           format version, metric, dim, chunking, model fingerprints (checksummed)
    meta.sqlite             the log and source of truth (WAL): texts, metadata fields, chunk spans,
                            each chunk's vector and reranker token ids, recent deletions, state
    index-<s>.bin           checkpoint: the HNSW index as of write s (the newest two are kept)
    docstore-<s>.bin        checkpoint: the reranker's pre-tokenized chunks as of write s
    .writer.lock            flock: one writing process at a time
    .checkpoint.lock        flock: one process creating or removing checkpoint files at a time

Writes cost O(change). A write is one SQLite transaction holding everything it changes (new
documents with their chunks' vectors and tokens, their metadata fields, the keys of chunks it
deletes) and the new write number ``seq``: that commit is the commit point. The in-memory index
and DocStore are then changed by exactly those chunks. Their files are checkpoints, written off
the write path: a background thread saves them when the chunks changed since the last checkpoint
pass ``max(CHECKPOINT_MIN_CHUNKS, CHECKPOINT_FRACTION x chunks)`` (2,048 and 2%), and
:meth:`Collection.close` / :meth:`Collection.checkpoint` save one on request. While it saves,
this process's writes wait and searches go on. ``open`` loads the newest checkpoint and replays
the writes after it from the database, so a replay is at most about that threshold.

Crash safety: nothing but the SQLite commit makes a write durable, so ``kill -9`` at any moment
leaves the last committed write; checkpoint files are written whole (temp, fsync, rename) before
the database points at them, and only the holder of ``.checkpoint.lock`` creates or deletes them,
after the pointer moved past them (see ``_checkpoints``).

Consistency: a search holds the collection's read lock and one SQLite read snapshot from the
allow-set to the result texts, copies the candidates' tokens, and scores after releasing it. A
write adds its new chunks to the index under keys searches skip, then takes the lock exclusively
only to commit, delete replaced chunks and publish the new keys.

Other processes: every search first compares the committed ``seq`` (one indexed row) with its
own and applies the writes it lacks (O(their change)), unless a thread of this process is
writing or checkpointing right then, in which case the next search does; :meth:`refresh` does
it on request. A search therefore sees every write committed before it started, except while
this process itself is busy writing or checkpointing.
"""

from ._collection import CHECKPOINT_FRACTION, CHECKPOINT_MIN_CHUNKS, Collection
from ._inputs import DocId
from ._results import Hit, SearchResult

__all__ = ["Collection", "SearchResult", "Hit", "DocId", "CHECKPOINT_MIN_CHUNKS", "CHECKPOINT_FRACTION"]
