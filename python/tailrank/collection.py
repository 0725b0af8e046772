"""Collection: a search pipeline in one folder (ingest -> embed -> HNSW -> rerank).

Layout of a collection folder::

    manifest.json        format version, metric, dim, chunking, model fingerprints (checksummed)
    meta.sqlite          texts, metadata, chunk spans and the committed generation (WAL mode)
    index-<g>.bin        the HNSW index of generation g (atomic, checksummed)
    docstore-<g>.bin     the reranker's pre-tokenized chunks of generation g (atomic, checksummed)

Crash safety: a write builds generation g+1 in memory, saves its index and DocStore files
(temp, fsync, rename), then commits the SQLite transaction that holds the new rows *and* the
new generation number. The commit is the single commit point: a crash before it leaves
generation g (whose files are still there), a crash after it leaves g+1 (whose files were
synced before). ``open`` loads the committed generation and removes leftovers of others.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from ._fileio import fsync_dir, read_json_checked, write_json_checked
from ._validate import as_float_matrix, positive_int
from .cross_encoder import CrossEncoder
from .docstore import DocStore
from .embedder import Embedder
from .errors import (
    ConcurrentUseError,
    CorruptFileError,
    DuplicateIdError,
    FilterError,
    ModelError,
    ModelMismatchError,
    UnknownIdError,
)
from .index import VectorIndex
from .pairs import retrieve_and_assemble

__all__ = ["Collection", "SearchResult", "Hit", "DocId"]

DocId = Union[int, str]
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_DB = "meta.sqlite"
_LOCK = ".writer.lock"
_FILE_RE = re.compile(r"^(index|docstore)-(\d+)\.bin$")
_TEMP_RE = re.compile(r"^((index|docstore)-\d+\.bin\..*tmp.*|\..*\.tmp)$")  # unfinished saves
_EMBED_CHUNK = 256  # texts per embedding call during ingest (progress granularity)
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is the reranker's score when the hit was reranked, else the
    first-stage score; ``first_stage_score`` is the ANN similarity (squared distance for l2)."""

    id: DocId
    score: float
    first_stage_score: float
    text: str
    metadata: dict[str, Any]
    truncated: bool
    reranked: bool


@dataclass
class SearchResult:
    """Hits best first, whether the deadline cut reranking short, and per-stage times in ms:
    ``embed``, ``ann`` (HNSW walk; with the fused call it includes gather and assembly),
    ``assemble``, ``score``, ``total``."""

    hits: list[Hit]
    degraded: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    reranked: int = 0

    def ids(self) -> list[DocId]:
        return [h.id for h in self.hits]


class Collection:
    """Documents with their embeddings (HNSW), reranker tokens (DocStore), texts and metadata
    (SQLite) in one folder. Create with :meth:`create`, reopen with :meth:`open`.

    Searches may run from many threads at once; writes (add, upsert, delete) are serialized
    within a process and, through a lock file, across processes.
    """

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

        Raises:
            FileExistsError: ``path`` already holds files.
        """
        root = Path(path)
        if metric not in ("cosine", "ip", "l2"):
            raise ValueError(f'metric must be "cosine", "ip" or "l2", got {metric!r}')
        if chunk_tokens is not None:
            positive_int(chunk_tokens, "chunk_tokens", minimum=2)
        overlap = positive_int(chunk_overlap, "chunk_overlap", minimum=0)
        if overlap and (chunk_tokens is None or overlap >= chunk_tokens):
            raise ValueError(f"chunk_overlap ({overlap}) must be smaller than chunk_tokens ({chunk_tokens})")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root} exists and is not an empty folder; use Collection.open")
        emb = _as_embedder(embedder, threads)
        rr = _as_reranker(reranker, threads)
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
            "embedder": _model_entry(emb),
            "reranker": _model_entry(rr) if rr is not None else None,
        }
        db = _connect(root / _DB)
        with db:
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO state(key, value) VALUES (?, ?)", [("generation", 0), ("next_key", 0)])
        db.close()
        index = VectorIndex(int(emb.dim), metric, M=int(M), ef_construction=int(ef_construction))
        index.save(root / "index-0.bin")
        if rr is not None:
            DocStore(rr.vocab_size).save(root / "docstore-0.bin")
        write_json_checked(root / _MANIFEST, manifest)  # last: its presence marks a whole collection
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
        """Opens a collection at its last committed state.

        Models default to the directories recorded at creation. A model whose fingerprint differs
        from the recorded one raises :class:`ModelMismatchError`: embeddings or tokens made by
        one model are garbage to another.

        Raises:
            FileNotFoundError: No collection at ``path``.
            CorruptFileError: A damaged manifest, index, DocStore or database.
            ModelMismatchError: A model other than the collection's.
        """
        root = Path(path)
        if not (root / _MANIFEST).is_file():
            raise FileNotFoundError(f"no collection at {root} (no {_MANIFEST})")
        manifest = _read_manifest(root)
        emb = _as_embedder(embedder if embedder is not None else _recorded_dir(manifest, "embedder"), threads)
        rr_src = reranker
        if rr_src is None and manifest["reranker"] is not None:
            rec = Path(manifest["reranker"]["path"])
            rr_src = rec if rec.is_dir() else None
        rr = _as_reranker(rr_src, threads)
        return cls._load(root, emb, rr, threads)

    @classmethod
    def _load(cls, root: Path, emb: Embedder, rr: CrossEncoder | None, threads: int | None) -> Collection:
        self = object.__new__(cls)
        self.path = root
        self._manifest = _read_manifest(root)
        m = self._manifest
        _check_model(m["embedder"], emb, "embedder", root)
        if rr is not None:
            if m["reranker"] is None:
                raise ModelMismatchError(
                    f"the collection at {root} was created without a reranker; create it with one to rerank"
                )
            _check_model(m["reranker"], rr, "reranker", root)
        if int(emb.dim) != int(m["dim"]):
            raise ModelMismatchError(f"the embedder gives {emb.dim}-d vectors; the collection holds {m['dim']}-d")
        self.embedder = emb
        self.reranker = rr
        self.metric = str(m["metric"])
        self.dim = int(m["dim"])
        self.chunk_tokens = m["chunk_tokens"]
        self.chunk_overlap = int(m["chunk_overlap"])
        self._threads = threads
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._chunker = _Chunker(emb).configure(int(self.chunk_tokens), self.chunk_overlap) if self.chunk_tokens else None
        try:
            self._db = _connect(root / _DB)
            self._generation = self._db_state(self._db, "generation")
        except sqlite3.DatabaseError as e:
            raise CorruptFileError(f"the database of {root} is damaged: {e}") from e
        self._index, self._store = self._read_generation(self._generation)
        self._check_agreement()
        self._remove_leftovers()
        return self

    def _read_generation(self, g: int) -> tuple[VectorIndex, DocStore | None]:
        index = VectorIndex.load(self.path / f"index-{g}.bin")
        store = DocStore.load(self.path / f"docstore-{g}.bin") if self._manifest["reranker"] is not None else None
        return index, store

    def _check_agreement(self) -> None:
        n = self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        if len(self._index) != n or (self._store is not None and len(self._store) != n):
            raise CorruptFileError(
                f"the collection at {self.path} disagrees with itself: {n} chunks in the database, "
                f"{len(self._index)} in the index, {len(self._store) if self._store is not None else '-'} in the DocStore"
            )

    def _remove_leftovers(self) -> None:
        for p in self.path.iterdir():
            m = _FILE_RE.match(p.name)
            if (m and int(m.group(2)) != self._generation) or _TEMP_RE.match(p.name):
                p.unlink(missing_ok=True)

    # --- reading -----------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "db", None)
        if c is None:
            c = _connect(self.path / _DB)
            self._local.db = c
        return c

    def __len__(self) -> int:
        """Number of documents (not chunks)."""
        return int(self._reader().execute("SELECT count(*) FROM docs").fetchone()[0])

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, (int, str)) or isinstance(id, bool):
            return False
        return self._reader().execute("SELECT 1 FROM docs WHERE doc_id = ?", (id,)).fetchone() is not None

    @property
    def chunk_count(self) -> int:
        return len(self._index)

    def get(self, ids: Sequence[DocId]) -> list[dict[str, Any]]:
        """``{"id", "text", "metadata"}`` of each id, in the order given.

        Raises:
            UnknownIdError: An id is not in the collection.
        """
        want = _check_ids(ids, len(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else -1)
        db = self._reader()
        rows = {}
        for part in _chunks_of(want, 500):
            q = f"SELECT doc_id, text, metadata FROM docs WHERE doc_id IN ({','.join('?' * len(part))})"
            for doc_id, text, meta in db.execute(q, part):
                rows[doc_id] = {"id": doc_id, "text": text, "metadata": json.loads(meta)}
        missing = [i for i in want if i not in rows]
        if missing:
            raise UnknownIdError(f"{len(missing)} unknown id(s), e.g. {missing[0]!r}")
        return [rows[i] for i in want]

    # --- writing -----------------------------------------------------------------------------

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
            TypeError / ValueError: Malformed texts, ids, metadata or vectors; nothing changes.
        """
        return self._write(texts, ids, metadata, vectors, show_progress, replace=False)

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

    def delete(self, ids: Sequence[DocId]) -> None:
        """Deletes documents and their chunks; all or nothing.

        Raises:
            UnknownIdError: An id is not in the collection (nothing is deleted).
        """
        want = _check_ids(ids, -1)
        if not want:
            return
        with self._writing():
            keys = self._keys_of(want, must_exist=True)
            self._commit(lambda db: _delete_rows(db, want), drop_keys=keys, new=None)

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
        # Every check comes before the first change.
        docs = _check_texts(texts)
        n = len(docs)
        given_ids = _check_ids(ids, n) if ids is not None else None
        metas = _check_metadata(metadata, n)
        vecs = None
        if vectors is not None:
            if self._chunker is not None:
                raise ValueError("vectors cannot be given for a chunking collection (one vector per chunk is unknown)")
            vecs, _ = as_float_matrix(vectors, self.dim, "vectors")
            if vecs.shape[0] != n:
                raise ValueError(f"vectors has {vecs.shape[0]} rows for {n} texts")
        if n == 0:
            return []
        with self._writing():
            if given_ids is None:
                start = self._next_auto_id()
                doc_ids: list[DocId] = list(range(start, start + n))
            else:
                doc_ids = list(given_ids)
            drop = self._keys_of(doc_ids, must_exist=False) if replace else []
            if not replace:
                taken = self._existing(doc_ids)
                if taken:
                    raise DuplicateIdError(f"{len(taken)} id(s) already exist, e.g. {taken[0]!r}; use upsert to replace")
            spans = self._chunker.spans(docs) if self._chunker is not None else [[(0, len(t))] for t in docs]
            chunk_texts = [docs[i][a:b] for i, sp in enumerate(spans) for a, b in sp]
            owner = [i for i, sp in enumerate(spans) for _ in sp]
            emb = vecs if vecs is not None else self._embed(chunk_texts, show_progress)
            tokens = self.reranker.tokenize(chunk_texts) if self._store is not None and self.reranker is not None else None
            if self._store is not None and tokens is None:
                raise ModelError("this collection pre-tokenizes for its reranker; open it with the reranker to write")
            first_key = self._db_state(self._db, "next_key")
            keys = np.arange(first_key, first_key + len(chunk_texts), dtype=np.int64)
            rows = [(doc_ids[i], docs[i], json.dumps(metas[i], sort_keys=True, ensure_ascii=False)) for i in range(n)]
            chunk_rows = [
                (int(keys[j]), doc_ids[owner[j]], a, b)
                for j, (a, b) in enumerate((a, b) for sp in spans for a, b in sp)
            ]

            def apply(db: sqlite3.Connection) -> None:
                if replace:
                    _delete_rows(db, doc_ids)
                db.executemany("INSERT INTO docs(doc_id, text, metadata) VALUES (?, ?, ?)", rows)
                db.executemany("INSERT INTO chunks(key, doc_id, start, end) VALUES (?, ?, ?, ?)", chunk_rows)
                db.execute("UPDATE state SET value = ? WHERE key = 'next_key'", (int(first_key + len(chunk_rows)),))

            self._commit(apply, drop_keys=drop, new=(keys, emb, tokens))
        return doc_ids

    def _embed(self, texts: list[str], show_progress: bool | None) -> npt.NDArray[np.float32]:
        if show_progress is None:
            show_progress = len(texts) >= 1000 and _stderr_is_tty()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        from tqdm import tqdm

        with tqdm(total=len(texts), desc="embedding", unit="chunk", disable=not show_progress) as bar:
            for s in range(0, len(texts), _EMBED_CHUNK):
                part = texts[s : s + _EMBED_CHUNK]
                out[s : s + len(part)] = self.embedder.encode(part)
                bar.update(len(part))
        return out

    def _commit(
        self,
        apply: Any,
        *,
        drop_keys: Sequence[int],
        new: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], list[Any] | None] | None,
    ) -> None:
        """Builds generation g+1 (files first, then the SQLite commit); on any failure reloads g."""
        g = self._generation + 1
        try:
            # Order matters to concurrent searches: a key is in the DocStore whenever the index
            # can return it (added to the store first, deleted from the index first).
            if len(drop_keys):
                k = np.asarray(drop_keys, dtype=np.int64)
                self._index.delete(k)
                if self._store is not None:
                    self._store.delete(k)
            if new is not None:
                keys, emb, tokens = new
                if self._store is not None and tokens is not None:
                    self._store.add(keys, tokens)
                self._index.add(emb, keys, threads=self._threads)
            self._index.save(self.path / f"index-{g}.bin")
            if self._store is not None:
                self._store.save(self.path / f"docstore-{g}.bin")
            with self._db:
                apply(self._db)
                self._db.execute("UPDATE state SET value = ? WHERE key = 'generation'", (g,))
        except BaseException:
            # In-memory state may be half changed: go back to the committed generation.
            self._index, self._store = self._read_generation(self._generation)
            for name in (f"index-{g}.bin", f"docstore-{g}.bin"):
                (self.path / name).unlink(missing_ok=True)
            raise
        old = self._generation
        self._generation = g
        for name in (f"index-{old}.bin", f"docstore-{old}.bin"):
            (self.path / name).unlink(missing_ok=True)

    class _Writing:
        def __init__(self, c: Collection) -> None:
            self.c = c
            self.fd = -1

        def __enter__(self) -> None:
            import fcntl

            if not self.c._write_lock.acquire(blocking=False):
                self.c._write_lock.acquire()
            self.fd = os.open(self.c.path / _LOCK, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self.fd)
                self.c._write_lock.release()
                raise ConcurrentUseError(f"another process is writing to the collection at {self.c.path}") from None
            # Another process may have committed since we loaded: writing over it would lose data.
            if self.c._db_state(self.c._db, "generation") != self.c._generation:
                self.__exit__()
                raise ConcurrentUseError(f"the collection at {self.c.path} changed on disk; open it again to write")

        def __exit__(self, *exc: Any) -> None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.c._write_lock.release()

    def _writing(self) -> Collection._Writing:
        return Collection._Writing(self)

    @staticmethod
    def _db_state(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise CorruptFileError(f"the database has no {key!r} entry")
        return int(row[0])

    def _next_auto_id(self) -> int:
        row = self._db.execute("SELECT max(doc_id) FROM docs WHERE typeof(doc_id) = 'integer'").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def _existing(self, ids: Sequence[DocId]) -> list[DocId]:
        found: list[DocId] = []
        for part in _chunks_of(list(ids), 500):
            q = f"SELECT doc_id FROM docs WHERE doc_id IN ({','.join('?' * len(part))})"
            found += [r[0] for r in self._db.execute(q, part)]
        return found

    def _keys_of(self, ids: Sequence[DocId], *, must_exist: bool) -> list[int]:
        if must_exist:
            have = set(self._existing(ids))
            missing = [i for i in ids if i not in have]
            if missing:
                raise UnknownIdError(f"{len(missing)} unknown id(s), e.g. {missing[0]!r}")
        keys: list[int] = []
        for part in _chunks_of(list(ids), 500):
            q = f"SELECT key FROM chunks WHERE doc_id IN ({','.join('?' * len(part))})"
            keys += [int(r[0]) for r in self._db.execute(q, part)]
        return keys

    # --- searching ---------------------------------------------------------------------------

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
    ) -> SearchResult:
        """Embeds the query, takes ``candidates`` chunks from the HNSW index (inside ``filter``),
        reranks them with the cross-encoder and returns the best ``k`` documents.

        Args:
            filter: Metadata conditions, all of which must hold: ``{"field": value}`` (equality),
                ``{"field": {"$eq": v}}``, ``{"field": {"$in": [v, ...]}}``.
            rerank: False: first-stage order only.
            deadline_ms: Budget for the whole call from its start. Reranking goes through the
                candidates best first-stage first, one batch at a time, and starts no batch after
                the deadline; candidates left unscored keep first-stage order after the scored
                ones, and ``degraded`` is set.
            ef: HNSW search breadth for this call (default: the index's).
        """
        t0 = time.perf_counter()
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        _check_utf8(query, "query")
        k = positive_int(k, "k")
        candidates = max(positive_int(candidates, "candidates"), k)
        if deadline_ms is not None and (not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0):
            raise ValueError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        deadline = None if deadline_ms is None else time.monotonic() + float(deadline_ms) / 1000.0
        allow = self._allow_set(filter) if filter else None
        timings = {"embed": 0.0, "ann": 0.0, "assemble": 0.0, "score": 0.0}
        if allow is not None and allow.size == 0:
            return self._result([], [], [], None, None, False, timings, t0)

        index, store = self._index, self._store  # one generation for the whole call (see _commit)
        t = time.perf_counter()
        qvec = self.embedder.encode([query])[0]
        timings["embed"] = _ms(t)
        do_rerank = rerank and self.reranker is not None and store is not None
        if rerank and not do_rerank:
            raise ModelError("this collection has no reranker loaded; pass rerank=False or open it with one")
        if not do_rerank:
            t = time.perf_counter()
            ids, scores = index.search(qvec, candidates, ef=ef, allow=allow)
            timings["ann"] = _ms(t)
            keys = ids[ids >= 0]
            return self._result(keys, scores[: keys.size], [], None, None, False, timings, t0, k=k)

        rr = self.reranker
        assert rr is not None and store is not None
        (q_tok,) = rr.tokenize([query])
        if deadline is None:
            t = time.perf_counter()
            keys, first, assembly = retrieve_and_assemble(
                index, store, rr.batcher(), qvec, q_tok, k=candidates, ef=ef, allow=allow
            )
            timings["ann"] = _ms(t)
            t = time.perf_counter()
            logits, scored = rr.score_assembly(assembly)
            timings["score"] = _ms(t)
            truncated = assembly.truncated
        else:
            t = time.perf_counter()
            ids, sc = index.search(qvec, candidates, ef=ef, allow=allow)
            keys = ids[ids >= 0]
            first = sc[: keys.size]
            timings["ann"] = _ms(t)
            logits, scored, truncated = self._score_by_deadline(rr, store, q_tok, keys, deadline, timings)
        scores = rr.scores_from_logits(np.nan_to_num(logits))
        degraded = bool(not scored.all())
        return self._result(keys, first, scores, scored, truncated, degraded, timings, t0, k=k)

    def _score_by_deadline(
        self,
        rr: CrossEncoder,
        store: DocStore,
        q_tok: npt.NDArray[np.int32],
        keys: npt.NDArray[np.int64],
        deadline: float,
        timings: dict[str, float],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Scores candidates best first-stage first, one batch per assembly, until the deadline."""
        n = keys.size
        logits = np.full((n, rr.n_labels), np.nan, dtype=np.float32)
        scored = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        batcher = rr.batcher()
        lengths = [sum(batcher.truncate_lengths(q_tok.size, len(store.get(int(x))))) + rr._template.n_special
                   for x in keys]
        start = 0
        while start < n and time.monotonic() < deadline:
            # The longest prefix whose padded batch fits the token budget and the row cap.
            end, longest = start, 0
            while end < n and end - start < rr.max_batch_size:
                longest2 = max(longest, lengths[end])
                if longest2 * (end - start + 1) > rr.batch_tokens and end > start:
                    break
                longest, end = longest2, end + 1
            t = time.perf_counter()
            assembly = batcher.assemble_from_store(q_tok, store, keys[start:end])
            timings["assemble"] += _ms(t)
            t = time.perf_counter()
            got, done = rr.score_assembly(assembly, deadline=deadline)
            timings["score"] += _ms(t)
            logits[start:end] = got
            scored[start:end] = done
            truncated[start:end] = assembly.truncated
            start = end
        return logits, scored, truncated

    def _result(
        self,
        keys: Any,
        first: Any,
        scores: Any,
        scored: npt.NDArray[np.bool_] | None,
        truncated: npt.NDArray[np.bool_] | None,
        degraded: bool,
        timings: dict[str, float],
        t0: float,
        *,
        k: int | None = None,
    ) -> SearchResult:
        keys = np.asarray(keys, dtype=np.int64)
        n = keys.size
        if scored is not None:
            # Scored candidates by score, then the rest in first-stage order.
            sc = np.asarray(scores, dtype=np.float64)
            order = sorted(range(n), key=lambda i: (0, -sc[i], i) if scored[i] else (1, 0.0, i))
        else:
            order = list(range(n))
        info = self._chunk_info([int(keys[i]) for i in order])
        hits: list[Hit] = []
        seen: set[Any] = set()
        for i in order:
            row = info.get(int(keys[i]))
            if row is None:  # written by an add that has not committed yet
                continue
            doc_id, text, meta = row
            if (type(doc_id), doc_id) in seen:  # chunks of one document: keep its best
                continue
            seen.add((type(doc_id), doc_id))
            was = scored is not None and bool(scored[i])
            hits.append(
                Hit(
                    id=doc_id,
                    score=float(scores[i]) if was else float(first[i]),
                    first_stage_score=float(first[i]),
                    text=text,
                    metadata=meta,
                    truncated=bool(truncated[i]) if truncated is not None else False,
                    reranked=was,
                )
            )
            if k is not None and len(hits) >= k:
                break
        timings["total"] = _ms(t0)
        return SearchResult(
            hits=hits if k is None else hits[:k],
            degraded=degraded,
            timings=timings,
            candidates=n,
            reranked=int(scored.sum()) if scored is not None else 0,
        )

    def _chunk_info(self, keys: list[int]) -> dict[int, tuple[DocId, str, dict[str, Any]]]:
        out: dict[int, tuple[DocId, str, dict[str, Any]]] = {}
        db = self._reader()
        for part in _chunks_of(keys, 500):
            q = (
                "SELECT c.key, c.doc_id, c.start, c.end, d.text, d.metadata FROM chunks c "
                f"JOIN docs d ON d.doc_id = c.doc_id WHERE c.key IN ({','.join('?' * len(part))})"
            )
            for key, doc_id, a, b, text, meta in db.execute(q, part):
                out[int(key)] = (doc_id, text[a:b] if self._chunker is not None else text, json.loads(meta))
        return out

    def search_batch(self, queries: Sequence[str], **kwargs: Any) -> list[SearchResult]:
        """:meth:`search` for each query (same keyword arguments), in order."""
        if isinstance(queries, str):
            raise TypeError("search_batch takes a sequence of queries; use search for one")
        return [self.search(q, **kwargs) for q in queries]

    def _allow_set(self, flt: Mapping[str, Any]) -> npt.NDArray[np.int64]:
        where, params = _compile_filter(flt)
        q = f"SELECT c.key FROM chunks c JOIN docs d ON d.doc_id = c.doc_id WHERE {where}"
        return np.fromiter((r[0] for r in self._reader().execute(q, params)), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"Collection({str(self.path)!r}, documents={len(self)}, chunks={self.chunk_count}, metric={self.metric!r}, "
            f"reranker={'yes' if self.reranker is not None else 'no'})"
        )


# --- helpers ---------------------------------------------------------------------------------

_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE state(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE docs(doc_id PRIMARY KEY, text TEXT NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE chunks(key INTEGER PRIMARY KEY, doc_id NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL);
CREATE INDEX chunks_by_doc ON chunks(doc_id);
"""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False, timeout=30.0)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")  # the commit is the collection's commit point
    return db


def _delete_rows(db: sqlite3.Connection, ids: Sequence[DocId]) -> None:
    for part in _chunks_of(list(ids), 500):
        marks = ",".join("?" * len(part))
        db.execute(f"DELETE FROM chunks WHERE doc_id IN ({marks})", part)
        db.execute(f"DELETE FROM docs WHERE doc_id IN ({marks})", part)


def _chunks_of(items: list[Any], n: int) -> Iterable[list[Any]]:
    for s in range(0, len(items), n):
        yield items[s : s + n]


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0


def _stderr_is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate at {e.start}); decode bytes as UTF-8 first") from e


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    docs = list(texts)
    for i, t in enumerate(docs):
        if not isinstance(t, str):
            hint = " (decode bytes as UTF-8 first)" if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"text {i} must be a str, got {type(t).__name__}{hint}")
        _check_utf8(t, f"text {i}")
    return docs


def _check_ids(ids: Any, n: int) -> list[DocId]:
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a sequence of ids, not a single string")
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    out = list(ids)
    if n >= 0 and len(out) != n:
        raise ValueError(f"got {len(out)} ids for {n} texts")
    for i, x in enumerate(out):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, str, np.integer)):
            raise TypeError(f"id {i} must be an int or a str, got {type(x).__name__}")
        if isinstance(x, (int, np.integer)) and not 0 <= int(x) < 2**63:
            raise ValueError(f"id {i} must be in [0, 2**63), got {x}")
        if isinstance(x, str):
            _check_utf8(x, f"id {i}")
    out = [int(x) if isinstance(x, np.integer) else x for x in out]
    seen: set[tuple[type, Any]] = set()
    for x in out:
        key = (type(x), x)
        if key in seen:
            raise DuplicateIdError(f"id {x!r} is given twice")
        seen.add(key)
    return out


def _check_metadata(metadata: Any, n: int) -> list[dict[str, Any]]:
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, Mapping):
        raise TypeError("metadata must be a sequence with one dict per text")
    metas = list(metadata)
    if len(metas) != n:
        raise ValueError(f"got {len(metas)} metadata entries for {n} texts")
    out = []
    for i, m in enumerate(metas):
        if m is None:
            out.append({})
            continue
        if not isinstance(m, Mapping):
            raise TypeError(f"metadata {i} must be a dict or None, got {type(m).__name__}")
        for key in m:
            if not isinstance(key, str) or not key:
                raise TypeError(f"metadata {i}: keys must be non-empty strings, got {key!r}")
            _check_utf8(key, f"metadata {i} key")
        try:
            json.dumps(m, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata {i} is not JSON-serializable: {e}") from e
        out.append(dict(m))
    return out


def _compile_filter(flt: Any) -> tuple[str, list[Any]]:
    """``{"field": v | {"$eq": v} | {"$in": [v, ...]}}`` -> SQL over docs.metadata (all must hold)."""
    if not isinstance(flt, Mapping):
        raise FilterError(f"filter must be a dict, got {type(flt).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for fld, cond in flt.items():
        if not isinstance(fld, str) or not fld or fld.startswith("$"):
            raise FilterError(f"filter keys must be metadata field names, got {fld!r}")
        path = '$."' + fld.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(cond, Mapping):
            if len(cond) != 1:
                raise FilterError(f"filter on {fld!r} must have exactly one operator, got {list(cond)}")
            ((op, arg),) = cond.items()
            if op == "$eq":
                values = [arg]
            elif op == "$in":
                if not isinstance(arg, (list, tuple)):
                    raise FilterError(f"$in on {fld!r} takes a list, got {type(arg).__name__}")
                values = list(arg)
            else:
                raise FilterError(f"unknown filter operator {op!r} on {fld!r}; known: $eq, $in")
        else:
            values = [cond]
        for v in values:
            if not isinstance(v, _SCALARS) or (isinstance(v, float) and not math.isfinite(v)):
                raise FilterError(f"filter values must be str, int, float, bool or None; got {v!r} for {fld!r}")
        ors = []
        for v in values:
            if v is None:
                ors.append("json_type(d.metadata, ?) = 'null'")
                params.append(path)
            elif isinstance(v, bool):
                ors.append("json_type(d.metadata, ?) = ?")
                params += [path, "true" if v else "false"]
            else:
                ors.append("(json_type(d.metadata, ?) IN ('integer', 'real', 'text') AND json_extract(d.metadata, ?) = ?)")
                params += [path, path, v]
        clauses.append("(" + (" OR ".join(ors) if ors else "0") + ")")
    if not clauses:
        return "1", []
    return " AND ".join(clauses), params


class _Chunker:
    """Splits texts into spans of ``chunk_tokens`` embedder tokens with overlap (by offsets)."""

    def __init__(self, emb: Embedder) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(Path(emb.model_dir) / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()

    def configure(self, size: int, overlap: int) -> _Chunker:
        self.size, self.overlap = size, overlap
        return self

    def spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        out = []
        for enc, text in zip(self._tok.encode_batch(texts, add_special_tokens=False), texts):
            offs = enc.offsets
            if len(offs) <= self.size:
                out.append([(0, len(text))])
                continue
            spans = []
            step = self.size - self.overlap
            for s in range(0, len(offs), step):
                e = min(s + self.size, len(offs))
                a = 0 if s == 0 else offs[s][0]
                b = len(text) if e == len(offs) else offs[e - 1][1]
                spans.append((a, b))
                if e == len(offs):
                    break
            out.append(spans)
        return out


def _as_embedder(src: Any, threads: int | None) -> Embedder:
    if isinstance(src, Embedder):
        return src
    if isinstance(src, (str, os.PathLike)):
        return Embedder(src, threads=threads)
    raise TypeError(f"embedder must be a model directory or an Embedder, got {type(src).__name__}")


def _as_reranker(src: Any, threads: int | None) -> CrossEncoder | None:
    if src is None or isinstance(src, CrossEncoder):
        return src
    if isinstance(src, (str, os.PathLike)):
        return CrossEncoder(src, threads=threads)
    raise TypeError(f"reranker must be a model directory or a CrossEncoder, got {type(src).__name__}")


def _model_entry(model: Any) -> dict[str, Any]:
    return {"fingerprint": model.fingerprint, "path": str(Path(model.model_dir).resolve())}


def _recorded_dir(manifest: dict[str, Any], what: str) -> Path:
    rec = Path(manifest[what]["path"])
    if not rec.is_dir():
        raise ModelError(f"the collection's {what} {rec} is gone; pass {what}= explicitly")
    return rec


def _check_model(entry: dict[str, Any], model: Any, what: str, root: Path) -> None:
    if entry["fingerprint"] != model.fingerprint:
        raise ModelMismatchError(
            f"the {what} {model.model_dir} is not the one the collection at {root} was built with "
            f"(fingerprint {model.fingerprint[:12]} != {entry['fingerprint'][:12]}, recorded from {entry['path']})"
        )


def _read_manifest(root: Path) -> dict[str, Any]:
    m = read_json_checked(root / _MANIFEST, "collection manifest")
    if m.get("format") != "tailrank.collection":
        raise CorruptFileError(f"{root / _MANIFEST} is not a tailrank collection manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(
            f"{root / _MANIFEST} has format version {m.get('format_version')}; this tailrank reads {FORMAT_VERSION}"
        )
    return m

