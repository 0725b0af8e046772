"""The Collection class: ties the log, the checkpoints, the filters and the search together."""

from __future__ import annotations

import atexit
import functools
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import numpy.typing as npt

from .._fileio import fsync_dir, write_json_checked
from .._validate import positive_int
from ..cross_encoder import CrossEncoder
from ..docstore import DocStore
from ..embedder import Embedder
from ..errors import (
    ClosedError,
    ConcurrentUseError,
    CorruptFileError,
    DuplicateIdError,
    FusionError,
    ModelError,
    ModelMismatchError,
    UnknownIdError,
)
from ..index import VectorIndex
from ..pairs import retrieve_and_assemble
from . import _checkpoints, _filters, _location, _log
from ._chunking import Chunker
from ._fresh import Fresh
from ._fusion import Fusion, FusionMethod, fuse_scored
from ._fusion import resolve as resolve_fusion
from ._inputs import (
    DocId,
    check_ids,
    check_metadata,
    check_query,
    check_texts,
    check_vectors,
    metadata_json,
    vector_problem,
)
from ._locks import FileLock, RWLock
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST,
    as_embedder,
    as_reranker,
    check_model,
    model_entry,
    read_manifest,
    recorded_dir,
    stored_fusion,
)
from ._results import Candidates, SearchPlan, SearchResult, build_result, ms, score_by_deadline

_WRITER_LOCK = ".writer.lock"
_EMBED_CHUNK = 256  # texts per embedding call during ingest (progress granularity)
CHECKPOINT_MIN_CHUNKS = 2048  # changed chunks before a background checkpoint ...
CHECKPOINT_FRACTION = 0.02  # ... or this fraction of the collection, whichever is larger
FRESH_INDEX_AT = 1024  # fresh chunks that start a background pass into the graph
FRESH_MAX = 16384  # beyond this many, a write waits for the pass (exact search stays cheap)

_live_checkpoints: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _finish_checkpoints() -> None:
    # A checkpoint thread cut off by interpreter shutdown leaves only a temp file, but letting it
    # finish keeps the next open's replay short.
    for t in list(_live_checkpoints):
        t.join()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


F = TypeVar("F", bound=Callable[..., Any])


def _while_open(fn: F) -> F:
    """Runs a method as one use of an open collection: ClosedError after close(), and close()
    waits for the uses in flight before it closes the connections."""

    @functools.wraps(fn)
    def method(self: Collection, *args: Any, **kwargs: Any) -> Any:
        with self._in_use():
            return fn(self, *args, **kwargs)

    return method  # type: ignore[return-value]


class Collection:
    """Documents with their embeddings (HNSW), reranker tokens (DocStore), texts and metadata
    (SQLite) in one folder. Create with :meth:`create`, reopen with :meth:`open`.

    Searches may run from many threads at once, each on one committed state; writes (add,
    upsert, delete) are serialized within a process and, through a lock file, across processes.
    Another process's commits are picked up by :meth:`refresh` or by the next search.
    """

    path: Path
    embedder: Embedder
    reranker: CrossEncoder | None
    metric: str
    dim: int
    chunk_tokens: int | None
    chunk_overlap: int
    checkpoint_min_chunks: int
    checkpoint_fraction: float
    fresh_index_at: int
    checkpoint_error: BaseException | None
    _manifest: dict[str, Any]
    _fusion_default: Fusion | None
    _threads: int | None
    _has_store: bool
    _chunker: Chunker | None
    _rw: RWLock
    _write_lock: threading.Lock
    _maint_lock: threading.Lock
    _local: threading.local
    _readers: list[sqlite3.Connection]
    _readers_lock: threading.Lock
    _broken: bool
    _ckpt_thread: threading.Thread | None
    _db: sqlite3.Connection
    _index: VectorIndex
    _store: DocStore | None
    _fresh: Fresh
    _applied: int
    _next_key: int
    _chunks: int
    _since_checkpoint: int
    _closed: bool
    _users: int
    _users_cond: threading.Condition
    _use_depth: threading.local

    def __init__(self, *_: Any, **__: Any) -> None:
        raise TypeError("use Collection.create(path, ...) or Collection.open(path, ...)")

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        embedder: str | os.PathLike[str] | Embedder,
        reranker: str | os.PathLike[str] | CrossEncoder | None = None,
        metric: str = "cosine",
        chunk_tokens: int | None = None,
        chunk_overlap: int = 0,
        M: int = 16,
        ef_construction: int = 200,
        threads: int | None = None,
    ) -> Collection:
        """Creates an empty collection in ``path`` (a new or empty folder).

        Args:
            embedder: A bi-encoder model directory or an :class:`Embedder`.
            reranker: A cross-encoder model directory or a :class:`CrossEncoder` (optional).
            metric: ``"cosine"``, ``"ip"`` or ``"l2"``.
            chunk_tokens: Split texts into chunks of this many embedder tokens (default: one
                chunk per text; the embedder truncates at its max_length).
            chunk_overlap: Tokens shared by consecutive chunks (< chunk_tokens).
            M: HNSW graph degree.
            ef_construction: HNSW build beam width.
            threads: Threads for models and index builds (default: all cores).

        ``path`` may also be a Milvus URI, ``milvus://HOST:PORT/NAME`` (see
        :mod:`tailrank.collection._location`): the same collection with its chunks in Milvus.

        Raises:
            FileExistsError: ``path`` already holds files (a Milvus collection of that name exists).
            StoreURIError: ``path`` is a URI of an unknown scheme or a malformed Milvus URI.
            BackendError: The Milvus server cannot be reached or fails.
        """
        where = _location.parse(path)
        if metric not in ("cosine", "ip", "l2"):
            raise ValueError(f'metric must be "cosine", "ip" or "l2", got {metric!r}')
        if chunk_tokens is not None:
            positive_int(chunk_tokens, "chunk_tokens", minimum=2)
        overlap = positive_int(chunk_overlap, "chunk_overlap", minimum=0)
        if overlap and (chunk_tokens is None or overlap >= chunk_tokens):
            raise ValueError(f"chunk_overlap ({overlap}) must be smaller than chunk_tokens ({chunk_tokens})")
        if isinstance(where, _location.MilvusURI):
            from ._milvus import MilvusCollection

            return MilvusCollection.create_at(where, embedder=embedder, reranker=reranker, metric=metric,
                                              chunk_tokens=chunk_tokens, chunk_overlap=overlap, M=int(M),
                                              ef_construction=int(ef_construction), threads=threads)
        root = where
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root} exists and is not an empty folder; use Collection.open")
        emb = as_embedder(embedder, threads)
        rr = as_reranker(reranker, threads)
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": "tailrank.collection",
            "format_version": FORMAT_VERSION,
            "metric": metric,
            "dim": int(emb.dim),
            "chunk_tokens": chunk_tokens,
            "chunk_overlap": overlap,
            "M": int(M),
            "ef_construction": int(ef_construction),
            "embedder": model_entry(emb),
            "reranker": model_entry(rr) if rr is not None else None,
        }
        _log.create(root)
        index = VectorIndex(int(emb.dim), metric, M=int(M), ef_construction=int(ef_construction))  # type: ignore[arg-type]
        _checkpoints.save(root, 0, index, DocStore(rr.vocab_size) if rr is not None else None)
        write_json_checked(root / MANIFEST, manifest)  # last: its presence marks a whole collection
        fsync_dir(root)
        return cls._load(root, emb, rr, threads)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        embedder: str | os.PathLike[str] | Embedder | None = None,
        reranker: str | os.PathLike[str] | CrossEncoder | None = None,
        threads: int | None = None,
    ) -> Collection:
        """Opens a collection at its last committed state: the newest checkpoint, then the
        writes committed after it, replayed from the database.

        Models default to the directories recorded at creation. A model whose fingerprint differs
        from the recorded one raises :class:`ModelMismatchError`: embeddings or tokens made by
        one model are garbage to another.

        Raises:
            FileNotFoundError: No collection at ``path``.
            CorruptFileError: A damaged manifest, index, DocStore or database.
            ModelMismatchError: A model other than the collection's.
            StoreURIError / BackendError: As for :meth:`create`.
        """
        where = _location.parse(path)
        if isinstance(where, _location.MilvusURI):
            from ._milvus import MilvusCollection

            return MilvusCollection.open_at(where, embedder=embedder, reranker=reranker, threads=threads)
        root = where
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"no collection at {root} (no {MANIFEST})")
        manifest = read_manifest(root)
        emb = as_embedder(embedder if embedder is not None else recorded_dir(manifest, "embedder"), threads)
        rr_src = reranker
        if rr_src is None and manifest["reranker"] is not None:
            rec = Path(manifest["reranker"]["path"])
            rr_src = rec if rec.is_dir() else None
        rr = as_reranker(rr_src, threads)
        return cls._load(root, emb, rr, threads)

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """Whether a collection is at ``path`` (a folder or a Milvus URI)."""
        where = _location.parse(path)
        if isinstance(where, _location.MilvusURI):
            from ._milvus import read_manifest as read_remote

            try:
                read_remote(where)
            except FileNotFoundError:
                return False
            return True
        return (where / MANIFEST).is_file()

    @classmethod
    def _load(cls, root: Path, emb: Embedder, rr: CrossEncoder | None, threads: int | None) -> Collection:
        self = object.__new__(cls)
        self.path = root
        self._manifest = read_manifest(root)
        m = self._manifest
        check_model(m["embedder"], emb, "embedder", root)
        if rr is not None:
            if m["reranker"] is None:
                raise ModelMismatchError(
                    f"the collection at {root} was created without a reranker; create it with one to rerank"
                )
            check_model(m["reranker"], rr, "reranker", root)
        if int(emb.dim) != int(m["dim"]):
            raise ModelMismatchError(f"the embedder gives {emb.dim}-d vectors; the collection holds {m['dim']}-d")
        self._fusion_default = stored_fusion(m, root)
        self.embedder = emb
        self.reranker = rr
        self.metric = str(m["metric"])
        self.dim = int(m["dim"])
        self.chunk_tokens = m["chunk_tokens"]
        self.chunk_overlap = int(m["chunk_overlap"])
        self._threads = threads
        self._has_store = m["reranker"] is not None
        self._chunker = Chunker(emb, int(self.chunk_tokens), self.chunk_overlap) if self.chunk_tokens else None
        self._rw = RWLock()  # shared: a search's reads; exclusive: a commit's switch of state
        self._write_lock = threading.Lock()  # one thread changes the in-memory state at a time
        self._local = threading.local()
        self._readers = []
        self._readers_lock = threading.Lock()
        self._broken = False
        self._maint_lock = threading.Lock()  # one pass of fresh chunks into the graph at a time
        self.checkpoint_min_chunks = CHECKPOINT_MIN_CHUNKS
        self.checkpoint_fraction = CHECKPOINT_FRACTION
        self.fresh_index_at = FRESH_INDEX_AT
        self._ckpt_thread = None
        self.checkpoint_error = None
        self._closed, self._users, self._users_cond = False, 0, threading.Condition()
        self._use_depth = threading.local()
        self._db = _log.connect(root)
        try:
            _log.check_schema(self._db)
            with self._write_lock:
                self._reload()
            self._remove_leftovers()
        except BaseException as e:
            self._db.close()  # a failed open keeps no file open
            if isinstance(e, sqlite3.DatabaseError):
                raise CorruptFileError(f"the database of {root} is damaged: {e}") from e
            raise
        self._maybe_maintain()
        return self

    # --- the in-memory state: checkpoint + replay (all under self._write_lock) ----------------

    def _reload(self) -> None:
        """Loads the newest checkpoint and replays the log after it (a new object each time)."""
        for _ in range(20):
            index, store, seq, next_key = _checkpoints.load_latest(self.path, self._db, self._has_store, self.dim, self.metric, self.reranker)
            delta = _log.read_delta(self._db, seq, self.dim, self._has_store, store.vocab_size if store is not None else None,
                                    first_key=next_key, metric=self.metric)
            if delta.pruned_to <= seq:
                break
        else:
            raise ConcurrentUseError(f"checkpoints of {self.path} kept changing while it was being opened")
        dead = delta.deleted[delta.deleted < next_key]
        try:
            if dead.size:
                index.delete(dead)
                if store is not None:
                    store.delete(dead)
        except UnknownIdError as e:  # a deletion of a key the checkpoint lacks: they disagree
            raise CorruptFileError(f"the checkpoint and the database of {self.path} disagree: {e}") from e
        if store is not None and delta.add_keys.size:
            store.add(delta.add_keys, delta.add_tokens)
        fresh = Fresh(self.dim, self.metric)  # the replayed chunks: searched exactly until indexed
        fresh.append(delta.add_keys, fresh.prepare(delta.add_vectors))
        if len(index) + fresh.live != delta.chunks or (store is not None and len(store) != delta.chunks):
            raise CorruptFileError(
                f"the collection at {self.path} disagrees with itself: {delta.chunks} chunks in the database, "
                f"{len(index)} + {fresh.live} in the index, {len(store) if store is not None else '-'} in the DocStore"
            )
        with self._rw.write():
            self._index, self._store, self._fresh = index, store, fresh
            self._applied, self._next_key, self._chunks = delta.seq, delta.next_key, delta.chunks
            self._broken = False
        self._since_checkpoint = int(delta.add_keys.size + dead.size)

    def _catch_up(self) -> None:
        """Applies the writes other processes committed since this state (O(their change))."""
        if self._broken:
            self._reload()
            return
        if _log.read_seq(self._db) == self._applied:
            return
        delta = _log.read_delta(
            self._db, self._applied, self.dim, self._has_store, self._store.vocab_size if self._store is not None else None,
            first_key=self._next_key, metric=self.metric,
        )
        if delta.pruned_to > self._applied:  # its deletions are forgotten: start from a checkpoint
            self._reload()
            return
        dead = delta.deleted[delta.deleted < self._next_key]  # larger keys came and went after this state
        self._check_delta(delta, dead)
        try:
            prepared = self._fresh.prepare(delta.add_vectors)
            if self._store is not None and delta.add_keys.size:
                self._store.add(delta.add_keys, delta.add_tokens)  # keys >= _next_key: no search asks
            with self._rw.write():
                self._drop(dead)
                self._fresh.append(delta.add_keys, prepared)
                self._applied, self._next_key, self._chunks = delta.seq, delta.next_key, delta.chunks
        except BaseException:
            self._broken = True
            raise
        self._since_checkpoint += int(delta.add_keys.size + dead.size)

    def _check_delta(self, delta: _log.Delta, dead: npt.NDArray[np.int64]) -> None:
        """Another process's writes fit this state (O(their change), before anything changes):
        each deletion names a chunk live here, and the live count adds up."""
        fresh, index = self._fresh, self._index
        for k in dead.tolist():
            i = fresh.slot.get(k)
            if not (bool(fresh.alive[i]) if i is not None else k in index):
                raise CorruptFileError(f"the database of {self.path} deletes chunk {k}, which is not live (write {delta.seq})")
        if self._chunks + delta.add_keys.size - dead.size != delta.chunks:
            raise CorruptFileError(
                f"the database of {self.path} counts {delta.chunks} chunks after write {delta.seq}; its writes since "
                f"write {self._applied} leave {self._chunks + delta.add_keys.size - dead.size}"
            )

    def _drop(self, keys: npt.NDArray[np.int64] | Sequence[int]) -> None:
        """Deletes live chunks (exclusive lock held): from the fresh part or the graph."""
        if len(keys):
            k = np.asarray(keys, dtype=np.int64)
            graph = [x for x in k.tolist() if not self._fresh.kill(x)]
            if graph:
                self._index.delete(np.asarray(graph, dtype=np.int64))
            if self._store is not None:
                self._store.delete(k)

    @_while_open
    def refresh(self) -> bool:
        """Picks up writes committed by other processes (searches also do this on their own).

        Returns:
            Whether anything changed.
        """
        with self._write_lock:
            before, fz = self._applied, self._fusion_default
            self._manifest = read_manifest(self.path)  # a default fusion stored by another process
            self._fusion_default = stored_fusion(self._manifest, self.path)
            self._catch_up()
            return self._applied != before or self._fusion_default != fz

    def _maybe_refresh(self) -> None:
        # The cheap check: one indexed row. A thread of this process busy writing or
        # checkpointing holds the lock; the next search picks the commit up then.
        if not self._broken and _log.read_seq(self._reader()) == self._applied:
            return
        if self._write_lock.acquire(blocking=False):
            try:
                self._catch_up()
            finally:
                self._write_lock.release()

    # --- checkpoints -------------------------------------------------------------------------

    @_while_open
    def checkpoint(self) -> bool:
        """Saves the index and DocStore of the current state as the newest checkpoint, so that
        an open replays nothing before it. Runs in the background on its own after enough
        writes; call it (or :meth:`close`) after a bulk ingest to make the next open fast.

        Returns:
            False when another process or thread is checkpointing, or nothing changed.
        """
        lock = FileLock(self.path / _checkpoints.LOCK)
        if not lock.try_acquire():
            return False
        try:
            with self._maint_lock:
                self._move_fresh(write_locked=False)  # the bulk of it while writes go on
            with self._maint_lock, self._write_lock:  # writes of this process wait; searches go on
                self._catch_up()
                seq, next_key, done = self._applied, self._next_key, self._since_checkpoint
                if seq <= _log.read_state(self._db)["checkpoint"]:
                    return False
                self._move_fresh(write_locked=True)  # a checkpoint is the graph alone
                _checkpoints.save(self.path, seq, self._index, self._store)
            db = _log.connect(self.path)
            try:
                _checkpoints.publish(db, seq, next_key)
                st = _log.read_state(db)
            finally:
                db.close()
            _checkpoints.remove_unreferenced(self.path, {st["checkpoint"], st["pruned_to"]})
            self._since_checkpoint -= done
            return True
        finally:
            lock.release()

    def _move_fresh(self, *, write_locked: bool) -> None:
        """Inserts the fresh chunks into the graph, then drops them from the fresh part (the
        maintenance lock held). Searches meanwhile find a moving chunk twice and keep one."""
        with self._rw.read():
            fresh, index = self._fresh, self._index
            m = fresh.count
            alive = fresh.alive[:m].copy()
            keys, vecs = fresh.keys[:m][alive].copy(), fresh.vecs[:m][alive].copy()
        if not m:
            return
        if keys.size:
            index.add(vecs, keys, threads=self._threads)
        with self._write_lock if not write_locked else _nothing(), self._rw.write():
            if self._fresh is not fresh or self._index is not index:
                return  # reloaded meanwhile: that state starts from its checkpoint
            died = [k for k in keys[~fresh.alive[:m][alive]].tolist() if k in index]  # deleted while moving
            if died:
                index.delete(np.asarray(died, dtype=np.int64))
            fresh.drop_first(m)

    def _maybe_maintain(self) -> None:
        """Starts the background pass (fresh chunks into the graph, a checkpoint when due); a
        write that finds the fresh part past FRESH_MAX waits for it."""
        due = max(self.checkpoint_min_chunks, self.checkpoint_fraction * self._chunks)
        ckpt = self._since_checkpoint >= due
        running = self._ckpt_thread is not None and self._ckpt_thread.is_alive()
        if not running and (ckpt or self._fresh.live >= self.fresh_index_at):
            t = threading.Thread(target=self._background, args=(ckpt,), name="tailrank-maintenance", daemon=True)
            self._ckpt_thread = t
            _live_checkpoints.add(t)
            t.start()
        if self._fresh.count >= FRESH_MAX:
            with self._maint_lock:
                self._move_fresh(write_locked=False)

    def _background(self, ckpt: bool) -> None:
        try:
            with self._in_use():
                if ckpt:
                    self.checkpoint()
                else:
                    with self._maint_lock:
                        self._move_fresh(write_locked=False)
        except ClosedError:
            pass  # started by a write just before close(): the log holds everything
        except BaseException as e:  # noqa: BLE001 - kept for the caller; the log still holds everything
            self.checkpoint_error = e

    def _remove_leftovers(self) -> None:
        lock = FileLock(self.path / _checkpoints.LOCK)
        if lock.try_acquire():
            try:
                st = _log.read_state(self._db)
                _checkpoints.remove_unreferenced(self.path, {st["checkpoint"], st["pruned_to"]})
            finally:
                lock.release()

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        depth = getattr(self._use_depth, "n", 0)
        if depth:  # a method called by a method of this thread: one use, whatever close() began
            self._use_depth.n = depth + 1
            try:
                yield
            finally:
                self._use_depth.n = depth
            return
        with self._users_cond:
            if self._closed:
                raise ClosedError(f"the collection at {self.path} is closed; open it again to use it")
            self._users += 1
        self._use_depth.n = 1
        try:
            yield
        finally:
            self._use_depth.n = 0
            with self._users_cond:
                self._users -= 1
                if not self._users:
                    self._users_cond.notify_all()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (every other method then raises ClosedError)."""
        return self._closed

    def close(self, *, checkpoint: bool = True) -> None:
        """Waits for a background checkpoint, writes one if writes are not covered yet
        (``checkpoint=True``), waits for the calls in flight on other threads, and closes the
        database connections. Every method but close then raises :class:`ClosedError`; a second
        close does nothing."""
        if self._closed:
            return
        t = self._ckpt_thread
        if t is not None:
            t.join()
        if checkpoint and self._since_checkpoint > 0:
            self.checkpoint()
        with self._users_cond:
            if self._closed:
                return  # closed by another thread meanwhile
            self._closed = True  # no new use from here on ...
            self._users_cond.wait_for(lambda: self._users == 0)  # ... and none still running
        t = self._ckpt_thread  # one a write started meanwhile ran as a use, or stops at once
        if t is not None:
            t.join()
        with self._write_lock:
            try:
                # Folds the WAL into the database file so the next open need not index it; with a
                # reader elsewhere SQLite does what it can and returns (busy is not an error here).
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass  # a damaged file: the connection still closes
            finally:
                self._db.close()
        with self._readers_lock:
            for c in self._readers:
                c.close()
            self._readers.clear()
        self._local = threading.local()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "db", None)
        if c is None:
            c = _log.connect(self.path)
            with self._readers_lock:
                if self._closed:  # (uses are waited for: only a helper thread can get here)
                    c.close()
                    raise ClosedError(f"the collection at {self.path} is closed; open it again to use it")
                self._readers.append(c)
            self._local.db = c
        return c

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        db = self._reader()
        with _log.damage_is_corrupt():
            db.execute("BEGIN")
            try:
                yield db
            finally:
                _log.end_read(db)

    @_while_open
    def __len__(self) -> int:
        """Number of documents (not chunks)."""
        with _log.damage_is_corrupt():
            return int(self._reader().execute("SELECT count(*) FROM docs").fetchone()[0])

    @_while_open
    def __contains__(self, id: object) -> bool:
        if not isinstance(id, (int, str)) or isinstance(id, bool):
            return False
        try:
            with _log.damage_is_corrupt():
                return self._reader().execute("SELECT 1 FROM docs WHERE doc_id = ?", (id,)).fetchone() is not None
        except (UnicodeEncodeError, OverflowError):
            return False

    @property
    @_while_open
    def chunk_count(self) -> int:
        """Chunks in this process's state."""
        return self._chunks

    @_while_open
    def get(self, ids: Sequence[DocId]) -> list[dict[str, Any]]:
        """``{"id", "text", "metadata"}`` of each id, in the order given.

        Raises:
            UnknownIdError: An id is not in the collection.
        """
        want = check_ids(ids, len(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else -1)
        with self._snapshot() as db:
            rows = _log.get_docs(db, want)
        missing = [i for i in want if (type(i), i) not in rows]
        if missing:
            raise UnknownIdError(f"{len(missing)} unknown id(s), e.g. {missing[0]!r}")
        return [rows[(type(i), i)] for i in want]

    # --- writing -----------------------------------------------------------------------------

    @_while_open
    def add(
        self,
        texts: Sequence[str],
        *,
        ids: Sequence[DocId] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        vectors: npt.ArrayLike | None = None,
        show_progress: bool | None = None,
    ) -> list[DocId]:
        """Adds documents; all or nothing.

        Args:
            texts: Document texts (str).
            ids: One id per text (int >= 0 or str); default: new integer ids.
            metadata: One JSON-able dict (or None) per text, for filters and results.
            vectors: Precomputed embeddings [len(texts), dim] instead of the embedder's (one chunk
                per text: not with chunking).
            show_progress: A progress bar on stderr (default: for 1,000 texts or more on a TTY).

        Returns:
            The documents' ids.

        Raises:
            DuplicateIdError: An id given twice or already present (see :meth:`upsert`).
            ConcurrentUseError: Another process is writing to the collection.
            TypeError / ValueError: Malformed texts, ids, metadata or vectors; nothing changes.
        """
        return self._write(texts, ids, metadata, vectors, show_progress, replace=False)

    @_while_open
    def upsert(
        self,
        texts: Sequence[str],
        *,
        ids: Sequence[DocId],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        vectors: npt.ArrayLike | None = None,
        show_progress: bool | None = None,
    ) -> list[DocId]:
        """Adds documents, replacing those whose id exists (text, metadata, chunks, vectors)."""
        if ids is None:
            raise TypeError("upsert needs ids")
        return self._write(texts, ids, metadata, vectors, show_progress, replace=True)

    @_while_open
    def delete(self, ids: Sequence[DocId]) -> None:
        """Deletes documents and their chunks; all or nothing.

        Raises:
            UnknownIdError: An id is not in the collection (nothing is deleted).
        """
        want = check_ids(ids, -1)
        if not want:
            return

        def change(db: sqlite3.Connection, st: dict[str, int]) -> tuple[list[int], int]:
            have = {(type(i), i) for i in _log.existing(db, want)}
            missing = [i for i in want if (type(i), i) not in have]
            if missing:
                raise UnknownIdError(f"{len(missing)} unknown id(s), e.g. {missing[0]!r}")
            return _log.remove_docs(db, want, st["seq"] + 1), 0

        self._commit(change, None, None)

    def _check_write(
        self,
        texts: Sequence[str],
        ids: Sequence[DocId] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        vectors: npt.ArrayLike | None,
    ) -> tuple[list[str], list[DocId] | None, list[Any], npt.NDArray[np.float32] | None]:
        """A write's inputs, checked the same way by every backend before anything is stored."""
        docs = check_texts(texts)
        n = len(docs)
        given_ids = check_ids(ids, n) if ids is not None else None
        metas = check_metadata(metadata, n)
        vecs = None
        if vectors is not None:
            if self._chunker is not None:
                raise ValueError("vectors cannot be given for a chunking collection (one vector per chunk is unknown)")
            vecs = check_vectors(vectors, self.dim, n, self.metric)
        return docs, given_ids, metas, vecs

    def _write(
        self,
        texts: Sequence[str],
        ids: Sequence[DocId] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        vectors: npt.ArrayLike | None,
        show_progress: bool | None,
        *,
        replace: bool,
    ) -> list[DocId]:
        # Every check, the chunking, embedding and tokenizing come before any lock.
        docs, given_ids, metas, vecs = self._check_write(texts, ids, metadata, vectors)
        n = len(docs)
        if n == 0:
            return []
        if self._has_store and self.reranker is None:
            raise ModelError("this collection pre-tokenizes for its reranker; open it with the reranker to write")
        spans = self._chunker.spans(docs) if self._chunker is not None else [[(0, len(t))] for t in docs]
        chunk_texts = [docs[i][a:b] for i, sp in enumerate(spans) for a, b in sp]
        owner = [i for i, sp in enumerate(spans) for _ in sp]
        emb = vecs if vecs is not None else self._embed(chunk_texts, show_progress)
        problem = vector_problem(emb, self.metric) if vecs is None else None
        if problem is not None:
            raise ModelError(f"the embedder's vectors are unusable with the {self.metric} metric: {problem}")
        # The reranker's document ids (an LLM reranker's: its template's document segment).
        tokens = self.reranker.tokenize_documents(chunk_texts) if self._has_store and self.reranker is not None else None
        metas_json = [metadata_json(m) for m in metas]
        flat_spans = [ab for sp in spans for ab in sp]
        out: list[DocId] = []

        def change(db: sqlite3.Connection, st: dict[str, int]) -> tuple[list[int], int]:
            seq = st["seq"] + 1
            if given_ids is None:
                start = _log.next_auto_id(db)
                doc_ids: list[DocId] = list(range(start, start + n))
            else:
                doc_ids = list(given_ids)
            if replace:
                drop = _log.remove_docs(db, doc_ids, seq)
            else:
                drop = []
                taken = _log.existing(db, doc_ids)
                if taken:
                    raise DuplicateIdError(f"{len(taken)} id(s) already exist, e.g. {taken[0]!r}; use upsert to replace")
            first = st["next_key"]
            rows = [(doc_ids[i], docs[i], metas_json[i]) for i in range(n)]
            fields = [r for i in range(n) for r in _filters.field_rows(doc_ids[i], metas[i])]
            chunk_rows = [
                (first + j, doc_ids[owner[j]], a, b, seq, _log.vector_blob(emb[j]),
                 _log.tokens_blob(tokens[j]) if tokens is not None else None)
                for j, (a, b) in enumerate(flat_spans)
            ]
            _log.insert_docs(db, rows, fields, chunk_rows)
            out[:] = doc_ids
            return drop, len(chunk_rows)

        self._commit(change, emb, tokens)
        return out

    def _embed(self, texts: list[str], show_progress: bool | None) -> npt.NDArray[np.float32]:
        if show_progress is None:
            show_progress = len(texts) >= 1000 and bool(getattr(__import__("sys").stderr, "isatty", lambda: False)())
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        from tqdm import tqdm

        with tqdm(total=len(texts), desc="embedding", unit="chunk", disable=not show_progress) as bar:
            for s in range(0, len(texts), _EMBED_CHUNK):
                part = texts[s : s + _EMBED_CHUNK]
                out[s : s + len(part)] = self.embedder.encode(part)
                bar.update(len(part))
        return out

    def _commit(self, change: Any, emb: npt.NDArray[np.float32] | None, tokens: list[Any] | None) -> None:
        """One write: the SQL of ``change`` in one transaction, the new chunks put into the index
        and DocStore under keys searches do not see yet, then (exclusively) the commit, the
        deletion of replaced chunks and the switch of state. Nothing changes if anything before
        the commit fails; a failure after it leaves the state to be reloaded."""
        lock = FileLock(self.path / _WRITER_LOCK)
        with self._write_lock:
            if not lock.try_acquire():
                raise ConcurrentUseError(f"another process is writing to the collection at {self.path}")
            try:
                self._catch_up()  # under the lock file no other commit can come in between
                self._commit_locked(change, emb, tokens)
            finally:
                lock.release()
        self._maybe_maintain()

    def _commit_locked(self, change: Any, emb: npt.NDArray[np.float32] | None, tokens: list[Any] | None) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        seq = -1
        added: list[str] = []
        keys = np.zeros(0, dtype=np.int64)
        try:
            st = _log.read_state(db)
            if st["seq"] != self._applied:
                raise ConcurrentUseError(f"the collection at {self.path} changed during a write")
            seq = st["seq"] + 1
            drop, m = change(db, st)
            chunks = st["chunks"] - len(drop) + m
            _log.set_state(db, seq=seq, next_key=st["next_key"] + m, chunks=chunks)
            prepared = None
            if m:
                assert emb is not None
                keys = np.arange(st["next_key"], st["next_key"] + m, dtype=np.int64)
                prepared = self._fresh.prepare(emb)
                if self._store is not None:
                    assert tokens is not None
                    self._store.add(keys, tokens)  # keys >= _next_key: no search asks for them yet
                    added.append("store")
            with self._rw.write():
                db.execute("COMMIT")
                self._applied = seq  # from here on the write is committed
                self._drop(drop)
                if prepared is not None:
                    self._fresh.append(keys, prepared)
                self._next_key, self._chunks = st["next_key"] + m, chunks
            self._since_checkpoint += m + len(drop)
        except BaseException:
            self._undo(seq, keys, added)
            raise

    def _undo(self, seq: int, keys: npt.NDArray[np.int64], added: list[str]) -> None:
        db = self._db
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if seq >= 0 and _log.read_seq(db) >= seq:
                self._broken = True  # committed, in-memory state half switched: reload on next use
                return
            if "store" in added and self._store is not None:
                self._store.delete(keys)
        except BaseException:
            self._broken = True
            raise

    # --- searching ---------------------------------------------------------------------------

    @_while_open
    def search(
        self,
        query: str,
        *,
        k: int = 10,
        candidates: int = 100,
        filter: Mapping[str, Any] | None = None,
        rerank: bool = True,
        deadline_ms: float | None = None,
        ef: int | None = None,
        fusion: FusionMethod | None = None,
        fusion_weight: float | None = None,
        rrf_k: int | None = None,
        instruction: str | None = None,
    ) -> SearchResult:
        """Embeds the query, takes ``candidates`` chunks from the HNSW index (inside ``filter``),
        reranks them with the cross-encoder, fuses the two scores if asked, and returns the best
        ``k`` documents.

        The whole search (allow-set, ANN, token gather, texts) reads one committed state; writes
        committed by other processes are applied first when this process is not writing. It is
        the three stages a scheduler runs one by one (:meth:`plan_search`, :meth:`first_stage`,
        :meth:`finish_search`), with the embedding and the scoring in between.

        Args:
            filter: Metadata conditions (see :mod:`tailrank.collection._filters`):
                ``{"field": value}``, operators ``$eq $ne $in $nin $gt $gte $lt $lte $exists``,
                combined with ``$and`` / ``$or``; e.g. ``{"year": {"$gte": 2020}, "lang":
                {"$in": ["en", "de"]}}``.
            rerank: False: first-stage order only.
            deadline_ms: Budget for the whole call from its start. Reranking goes through the
                candidates best first-stage first, one batch at a time, and starts no batch after
                the deadline; candidates left unscored keep first-stage order after the scored
                ones, and ``degraded`` is set.
            ef: HNSW search breadth for this call (default: the index's).
            instruction: With an LLM reranker, the task instruction of its prompt (default: the
                template's); its prompt before the document runs once for all candidates.
            fusion: How reranked candidates are ranked: ``"none"`` by the reranker's score,
                ``"rrf"`` by reciprocal-rank fusion of both ranks, ``"linear"`` by
                ``w * rerank + (1 - w) * first stage``, each min-max normalized over the
                candidates (see :mod:`tailrank.collection._fusion`). Default: the collection's
                stored default (:attr:`default_fusion`, set by ``tailrank tune``), else "none".
            fusion_weight: ``w`` in [0, 1], the reranker's weight (linear only; default: the
                stored default's weight, else 0.5).
            rrf_k: RRF's k (default: the stored default's, else 60).

        Raises:
            FilterError: A malformed filter (nothing is searched).
            FusionError: Malformed fusion arguments, or a fusion asked for with ``rerank=False``.
        """
        t0 = time.perf_counter()
        plan = self.plan_search(query, k=k, candidates=candidates, filter=filter, rerank=rerank, ef=ef,
                                fusion=fusion, fusion_weight=fusion_weight, rrf_k=rrf_k)
        if deadline_ms is not None and (
            isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0
        ):
            raise ValueError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        deadline = None if deadline_ms is None else time.monotonic() + float(deadline_ms) / 1000.0
        rr = self.reranker
        llm = rr is not None and rr.kind == "llm"
        if instruction is not None and not (plan.rerank and llm):
            raise ValueError("instruction= is for searches reranked by an LLM reranker")
        t = time.perf_counter()
        qvec = self.embedder.encode([query])[0]
        embed_ms = ms(t)
        q_tok = rr.tokenize([query])[0] if plan.rerank and rr is not None else None
        # The fused call assembles every candidate; a score cache wants the tokens first.
        fused = deadline is None and (rr is None or rr.score_cache is None) and not llm
        cands = self.first_stage(plan, qvec, q_tok, assemble=fused)
        cands.timings["embed"] = embed_ms
        if not plan.rerank or cands.keys.size == 0:
            return self.finish_search(plan, cands, t0=t0)
        assert rr is not None and q_tok is not None
        timings = cands.timings
        if llm:
            assert cands.docs is not None
            t = time.perf_counter()
            # Candidates best first-stage first: a deadline leaves the rest in first-stage order.
            logits, truncated, scored = rr.score_prompts(query, cands.docs, instruction=instruction, deadline=deadline)
            timings["score"] = ms(t)
        elif cands.assembly is not None or deadline is None:
            assembly = cands.assembly
            if assembly is None and rr.score_cache is not None:
                assert cands.docs is not None
                t = time.perf_counter()
                logits, truncated = rr.score_tokens(q_tok, cands.docs)  # hits from the cache, misses scored
                timings["score"] = ms(t)
                scored = np.ones(len(cands.docs), dtype=bool)
            else:
                if assembly is None:
                    assert cands.docs is not None
                    t = time.perf_counter()
                    assembly = rr.batcher().assemble(q_tok, cands.docs)
                    timings["assemble"] = ms(t)
                t = time.perf_counter()
                logits, scored = rr.score_assembly(assembly)
                timings["score"] = ms(t)
                truncated = assembly.truncated
        else:
            assert cands.docs is not None
            logits, scored, truncated = score_by_deadline(rr, q_tok, cands.docs, deadline, timings)
        scores = rr.scores_from_logits(np.nan_to_num(logits))
        return self.finish_search(plan, cands, scores, scored, truncated, t0=t0)

    @_while_open
    def plan_search(
        self,
        query: str,
        *,
        k: int = 10,
        candidates: int = 100,
        filter: Mapping[str, Any] | None = None,
        rerank: bool = True,
        ef: int | None = None,
        fusion: FusionMethod | None = None,
        fusion_weight: float | None = None,
        rrf_k: int | None = None,
    ) -> SearchPlan:
        """Stage 0 of :meth:`search`: checks its arguments and compiles the filter (no I/O).

        Raises:
            FilterError: A malformed filter. ModelError: ``rerank`` without a reranker.
            FusionError: Malformed fusion arguments, or a fusion asked for with ``rerank=False``.
        """
        fz = resolve_fusion(self._fusion_default, fusion, fusion_weight, rrf_k)
        if not rerank and fusion not in (None, "none"):
            raise FusionError(f'fusion="{fusion}" combines the reranker\'s and the first stage\'s scores; it needs rerank=True')
        check_query(query)
        k = positive_int(k, "k")
        candidates = max(positive_int(candidates, "candidates"), k)
        if ef is not None:
            ef = positive_int(ef, "ef")
        node = _filters.parse(filter) if filter is not None else None
        where = self._where(node) if node is not None else None
        do_rerank = bool(rerank) and self.reranker is not None and self._has_store
        if rerank and not do_rerank:
            raise ModelError("this collection has no reranker loaded; pass rerank=False or open it with one")
        reads = _filters.fields_read(node) if where is not None and node is not None else ()
        return SearchPlan(query, k, candidates, where, do_rerank, ef, fz, reads)

    def _where(self, node: _filters.Node) -> tuple[str, list[Any]] | None:
        """A parsed filter in the store's query language (here SQL and its parameters; None: all)."""
        docs_sql, params = _filters.to_sql(node)
        return (docs_sql, params) if docs_sql is not None else None

    @_while_open
    def first_stage(
        self,
        plan: SearchPlan,
        query_vector: npt.NDArray[np.float32],
        query_tokens: npt.NDArray[np.int32] | None = None,
        *,
        assemble: bool = False,
    ) -> Candidates:
        """Stage 1 of :meth:`search`: allow-set, ANN walk, the candidates' texts and (to rerank)
        copies of their reranker tokens, all from one committed state.

        Args:
            plan: From :meth:`plan_search`.
            query_vector: The query's embedding (``self.embedder``).
            query_tokens: The query's reranker token ids (to rerank).
            assemble: Also assemble the pairs during the walk (one native call; no deadline
                then, the scorer takes the whole assembly).
        """
        self._maybe_refresh()
        empty = np.zeros(0, dtype=np.int64)
        assembly = None
        docs: list[npt.NDArray[np.int32]] | None = None
        timings = {"embed": 0.0, "ann": 0.0, "assemble": 0.0, "score": 0.0}
        with self._rw.read(), self._snapshot() as db:
            if plan.where is not None:
                _log.check_fields(db, plan.fields)
            allow = _log.allowed_keys(db, *plan.where) if plan.where is not None else None
            if allow is not None and allow.size == 0:
                keys, first = empty, np.zeros(0, np.float32)
            else:
                index, store, fresh = self._index, self._store, self._fresh
                t = time.perf_counter()
                rr = self.reranker
                if plan.rerank and assemble and fresh.count == 0 and query_tokens is not None:
                    assert rr is not None and store is not None
                    keys, first, assembly = retrieve_and_assemble(
                        index, store, rr.batcher(), query_vector, query_tokens, k=plan.candidates, ef=plan.ef,
                        allow=allow,
                    )
                else:
                    keys, first = self._first_stage(index, fresh, query_vector, plan.candidates, plan.ef, allow)
                    if plan.rerank:
                        assert store is not None
                        docs = [store.get(int(x)) for x in keys]  # copies: scored after the lock
                timings["ann"] = ms(t)
            info = self._texts(db, keys, None if plan.rerank else plan.k) if keys.size else {}
        return Candidates(keys, first, info, docs, assembly, timings)

    @_while_open
    def finish_search(
        self,
        plan: SearchPlan,
        cands: Candidates,
        scores: npt.ArrayLike | None = None,
        scored: npt.NDArray[np.bool_] | None = None,
        truncated: npt.NDArray[np.bool_] | None = None,
        *,
        t0: float | None = None,
    ) -> SearchResult:
        """Stage 2 of :meth:`search`: the hits from the candidates and their rerank scores (None:
        not reranked; ``scored`` marks the candidates scored before a deadline). The one place
        the final order is computed from first-stage and rerank scores.

        Args:
            t0: ``time.perf_counter()`` at the search's start (``timings["total"]``).
        """
        t0 = time.perf_counter() if t0 is None else t0
        if truncated is not None and cands.cut is not None:
            truncated = np.asarray(truncated, dtype=bool) | cands.cut
        if scores is None or cands.keys.size == 0:
            return build_result(cands.keys, cands.first, cands.info, [], None, None, False, cands.timings, t0, plan.k)
        mask = np.ones(cands.keys.size, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
        fz = plan.fusion
        if fz is None or fz.method == "none":
            return build_result(cands.keys, cands.first, cands.info, scores, mask, truncated, bool(not mask.all()),
                                cands.timings, t0, plan.k, fusion=fz)
        rerank_scores = np.asarray(scores, dtype=np.float32)
        fused = fuse_scored(fz, cands.first, rerank_scores, mask, lower_first=self.metric == "l2")
        return build_result(cands.keys, cands.first, cands.info, fused, mask, truncated, bool(not mask.all()),
                            cands.timings, t0, plan.k, rerank_scores=rerank_scores, fusion=fz)

    def _texts(
        self, db: sqlite3.Connection, keys: npt.NDArray[np.int64], k: int | None
    ) -> dict[int, tuple[DocId, str, dict[str, Any]]]:
        """Texts and metadata of the candidates; in first-stage order only as many as give
        ``k`` documents (``None``: all, for reranking)."""
        chunked = self._chunker is not None
        if k is None or keys.size <= 2 * k:
            return _log.chunk_info(db, keys.tolist(), chunked)
        info = _log.chunk_info(db, keys[: 2 * k].tolist(), chunked)
        if len({(type(v[0]), v[0]) for v in info.values()}) < k:  # chunks of few documents
            info.update(_log.chunk_info(db, keys[2 * k :].tolist(), chunked))
        return info

    def _first_stage(
        self,
        index: VectorIndex,
        fresh: Fresh,
        qvec: npt.NDArray[np.float32],
        candidates: int,
        ef: int | None,
        allow: npt.NDArray[np.int64] | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """HNSW walk plus exact search of the fresh chunks, merged (read lock held)."""
        ids, sc = index.search(qvec, candidates + fresh.dead, ef=ef, allow=allow)
        ok = ids >= 0
        ids, sc = ids[ok], sc[ok]
        if not fresh.count:
            return ids[:candidates], sc[:candidates]
        # A fresh key found in the graph is moving (its exact score comes from the fresh part)
        # or was deleted while moving.
        keep = np.fromiter((int(x) not in fresh.slot for x in ids), dtype=bool, count=ids.size)
        fk, fs = fresh.search(qvec, candidates, allow)
        keys = np.concatenate([ids[keep], fk])
        scores = np.concatenate([sc[keep], fs])
        order = np.argsort(scores if self.metric == "l2" else -scores, kind="stable")[:candidates]
        return keys[order], scores[order]

    @_while_open
    def search_batch(self, queries: Sequence[str], **kwargs: Any) -> list[SearchResult]:
        """:meth:`search` for each query (same keyword arguments, ``fusion`` included), in order.
        The fusion arguments are checked once, before any query runs."""
        if isinstance(queries, str):
            raise TypeError("search_batch takes a sequence of queries; use search for one")
        resolve_fusion(self._fusion_default, kwargs.get("fusion"), kwargs.get("fusion_weight"), kwargs.get("rrf_k"))
        return [self.search(q, **kwargs) for q in queries]

    # --- the default fusion ----------------------------------------------------------------

    @property
    def default_fusion(self) -> Fusion | None:
        """The fusion searches use when given none (stored in the manifest; None: "none")."""
        return self._fusion_default

    @property
    def default_fusion_tuning(self) -> dict[str, Any] | None:
        """How the stored default was chosen (e.g. ``tailrank tune``'s nDCG@10), if recorded."""
        entry = self._manifest.get("fusion")
        tuned = entry.get("tuned") if isinstance(entry, dict) else None
        return dict(tuned) if isinstance(tuned, dict) else None

    @_while_open
    def set_default_fusion(
        self,
        fusion: FusionMethod | None,
        *,
        fusion_weight: float | None = None,
        rrf_k: int | None = None,
        tuned: Mapping[str, Any] | None = None,
    ) -> Fusion | None:
        """Stores the default fusion of this collection in its manifest (``None``: remove it).

        The manifest is rewritten atomically under the writer lock; this object uses the new
        default at once, other processes when they open the collection or call :meth:`refresh`.

        Args:
            tuned: A JSON-able note on how the default was chosen (``tailrank tune`` stores the
                nDCG@10 it measured), kept beside it.

        Returns:
            The stored default.

        Raises:
            FusionError: Malformed arguments (nothing changes).
            ConcurrentUseError: Another process is writing to the collection.
        """
        fz = None if fusion is None else resolve_fusion(None, fusion, fusion_weight, rrf_k)
        if fusion is None and (fusion_weight is not None or rrf_k is not None):
            raise FusionError("fusion_weight and rrf_k need a fusion")
        entry = None
        if fz is not None:
            entry = fz.to_json()
            try:
                entry["tuned"] = json.loads(json.dumps(dict(tuned), allow_nan=False)) if tuned is not None else None
            except (TypeError, ValueError) as e:
                raise FusionError(f"tuned must be a JSON-able dict of finite numbers and strings: {e}") from None
        lock = FileLock(self.path / _WRITER_LOCK)
        with self._write_lock:
            if not lock.try_acquire():
                raise ConcurrentUseError(f"another process is writing to the collection at {self.path}")
            try:
                manifest = read_manifest(self.path)
                manifest["fusion"] = entry
                write_json_checked(self.path / MANIFEST, manifest)
                self._manifest = manifest
                self._fusion_default = fz
            finally:
                lock.release()
        return fz

    def __repr__(self) -> str:
        if self._closed:
            return f"Collection({str(self.path)!r}, closed)"
        return (
            f"Collection({str(self.path)!r}, documents={len(self)}, chunks={self.chunk_count}, metric={self.metric!r}, "
            f"reranker={'yes' if self.reranker is not None else 'no'})"
        )
