"""The log and source of truth: one SQLite database (WAL) holding every document, its chunks'
vectors and token ids, its metadata fields, and the keys deleted since the last checkpoints.

A write is one transaction: its commit is the collection's commit point. ``state`` holds
``seq`` (the number of the last committed write), ``next_key`` (chunk keys are never reused),
``chunks`` (the live chunk count), ``checkpoint`` / ``checkpoint_next_key`` (the write the
newest index and DocStore files cover) and ``pruned_to`` (deletions up to this write have been
forgotten: a replay must start at or after it).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptFileError
from ._inputs import DocId

DB = "meta.sqlite"
_PART = 500  # ids per IN (...) list

SCHEMA = """
CREATE TABLE state(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE docs(doc_id PRIMARY KEY, text TEXT NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE chunks(key INTEGER PRIMARY KEY, doc_id NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
                    seq INTEGER NOT NULL, vector BLOB NOT NULL, tokens BLOB);
CREATE INDEX chunks_by_doc ON chunks(doc_id);
CREATE INDEX chunks_by_seq ON chunks(seq);
CREATE TABLE deleted(key INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX deleted_by_seq ON deleted(seq);
CREATE TABLE fields(doc_id NOT NULL, name TEXT NOT NULL, kind INTEGER NOT NULL, value);
CREATE INDEX fields_by_value ON fields(name, kind, value);
CREATE INDEX fields_by_doc ON fields(doc_id);
"""
STATE_KEYS = ("seq", "next_key", "chunks", "checkpoint", "checkpoint_next_key", "pruned_to")


def connect(root: Path) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are explicit (BEGIN / COMMIT)."""
    db = sqlite3.connect(root / DB, isolation_level=None, check_same_thread=False, timeout=60.0)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")  # the commit is the collection's commit point
    db.execute("PRAGMA journal_size_limit = 67108864")  # a bulk write's WAL shrinks back after it
    return db


def create(root: Path) -> None:
    db = connect(root)
    try:
        db.execute("BEGIN IMMEDIATE")
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        db.executemany("INSERT INTO state(key, value) VALUES (?, 0)", [(k,) for k in STATE_KEYS])
        db.execute("COMMIT")
    finally:
        db.close()


def read_state(db: sqlite3.Connection) -> dict[str, int]:
    try:
        got = {k: int(v) for k, v in db.execute("SELECT key, value FROM state")}
    except sqlite3.DatabaseError as e:
        raise CorruptFileError(f"the collection's database is damaged: {e}") from e
    missing = [k for k in STATE_KEYS if k not in got]
    if missing:
        raise CorruptFileError(f"the collection's database has no {missing[0]!r} entry")
    return got


def read_seq(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM state WHERE key = 'seq'").fetchone()
    if row is None:
        raise CorruptFileError("the collection's database has no 'seq' entry")
    return int(row[0])


def parts(items: Sequence[Any], n: int = _PART) -> Iterable[Sequence[Any]]:
    for s in range(0, len(items), n):
        yield items[s : s + n]


def _marks(n: int) -> str:
    return ",".join("?" * n)


# --- reading -------------------------------------------------------------------------------------


def existing(db: sqlite3.Connection, ids: Sequence[DocId]) -> list[DocId]:
    found: list[DocId] = []
    for part in parts(ids):
        found += [r[0] for r in db.execute(f"SELECT doc_id FROM docs WHERE doc_id IN ({_marks(len(part))})", part)]
    return found


def keys_of(db: sqlite3.Connection, ids: Sequence[DocId]) -> list[int]:
    keys: list[int] = []
    for part in parts(ids):
        keys += [int(r[0]) for r in db.execute(f"SELECT key FROM chunks WHERE doc_id IN ({_marks(len(part))})", part)]
    return keys


def next_auto_id(db: sqlite3.Connection) -> int:
    # Integers sort before text in SQLite: the largest integer id is one index step away.
    row = db.execute("SELECT doc_id FROM docs WHERE doc_id < '' ORDER BY doc_id DESC LIMIT 1").fetchone()
    return 0 if row is None else int(row[0]) + 1


def get_docs(db: sqlite3.Connection, ids: Sequence[DocId]) -> dict[Any, dict[str, Any]]:
    rows: dict[Any, dict[str, Any]] = {}
    for part in parts(ids):
        q = f"SELECT doc_id, text, metadata FROM docs WHERE doc_id IN ({_marks(len(part))})"
        for doc_id, text, meta in db.execute(q, part):
            rows[(type(doc_id), doc_id)] = {"id": doc_id, "text": text, "metadata": json.loads(meta)}
    return rows


def chunk_info(db: sqlite3.Connection, keys: Sequence[int], chunked: bool) -> dict[int, tuple[DocId, str, dict[str, Any]]]:
    out: dict[int, tuple[DocId, str, dict[str, Any]]] = {}
    for part in parts(keys):
        q = (
            "SELECT c.key, c.doc_id, c.start, c.end, d.text, d.metadata FROM chunks c "
            f"JOIN docs d ON d.doc_id = c.doc_id WHERE c.key IN ({_marks(len(part))})"
        )
        for key, doc_id, a, b, text, meta in db.execute(q, part):
            out[int(key)] = (doc_id, text[a:b] if chunked else text, json.loads(meta))
    return out


def allowed_keys(db: sqlite3.Connection, docs_sql: str, params: list[Any]) -> npt.NDArray[np.int64]:
    q = f"SELECT key FROM chunks WHERE doc_id IN ({docs_sql})"
    return np.fromiter((r[0] for r in db.execute(q, params)), dtype=np.int64)


@dataclass
class Delta:
    """What the writes after some ``seq`` changed: chunks added (still live) and keys deleted."""

    seq: int
    next_key: int
    chunks: int
    pruned_to: int
    add_keys: npt.NDArray[np.int64]
    add_vectors: npt.NDArray[np.float32]
    add_tokens: list[npt.NDArray[np.int32]] | None
    deleted: npt.NDArray[np.int64]


def read_delta(db: sqlite3.Connection, after: int, dim: int, with_tokens: bool) -> Delta:
    """Everything committed after write ``after``, from one snapshot of the database."""
    db.execute("BEGIN")
    try:
        st = read_state(db)
        keys, vecs, toks = [], [], []
        for key, vec, tok in db.execute("SELECT key, vector, tokens FROM chunks WHERE seq > ? ORDER BY key", (after,)):
            keys.append(key)
            vecs.append(vec)
            if with_tokens:
                if tok is None:
                    raise CorruptFileError(f"chunk {key} has no reranker tokens")
                toks.append(np.frombuffer(tok, dtype="<i4").astype(np.int32))
        deleted = [r[0] for r in db.execute("SELECT key FROM deleted WHERE seq > ?", (after,))]
    finally:
        db.execute("COMMIT")
    mat = np.frombuffer(b"".join(vecs), dtype="<f4").astype(np.float32).reshape(len(vecs), dim)
    return Delta(
        seq=st["seq"],
        next_key=st["next_key"],
        chunks=st["chunks"],
        pruned_to=st["pruned_to"],
        add_keys=np.asarray(keys, dtype=np.int64),
        add_vectors=mat,
        add_tokens=toks if with_tokens else None,
        deleted=np.asarray(deleted, dtype=np.int64),
    )


# --- writing (inside BEGIN IMMEDIATE ... COMMIT, under the writer lock) ---------------------------


def remove_docs(db: sqlite3.Connection, ids: Sequence[DocId], seq: int) -> list[int]:
    """Deletes documents with their chunks and fields; their chunk keys are logged as deleted."""
    keys = keys_of(db, ids)
    db.executemany("INSERT INTO deleted(key, seq) VALUES (?, ?)", [(k, seq) for k in keys])
    for part in parts(keys):
        db.execute(f"DELETE FROM chunks WHERE key IN ({_marks(len(part))})", part)
    for part in parts(ids):
        db.execute(f"DELETE FROM fields WHERE doc_id IN ({_marks(len(part))})", part)
        db.execute(f"DELETE FROM docs WHERE doc_id IN ({_marks(len(part))})", part)
    return keys


def insert_docs(
    db: sqlite3.Connection,
    docs: list[tuple[DocId, str, str]],
    fields: list[tuple[Any, str, int, Any]],
    chunks: list[tuple[int, DocId, int, int, int, bytes, bytes | None]],
) -> None:
    db.executemany("INSERT INTO docs(doc_id, text, metadata) VALUES (?, ?, ?)", docs)
    db.executemany("INSERT INTO fields(doc_id, name, kind, value) VALUES (?, ?, ?, ?)", fields)
    db.executemany("INSERT INTO chunks(key, doc_id, start, end, seq, vector, tokens) VALUES (?, ?, ?, ?, ?, ?, ?)", chunks)


def set_state(db: sqlite3.Connection, **values: int) -> None:
    db.executemany("UPDATE state SET value = ? WHERE key = ?", [(int(v), k) for k, v in values.items()])


def tokens_blob(tokens: Any) -> bytes:
    return np.ascontiguousarray(tokens, dtype="<i4").tobytes()


def vector_blob(vec: npt.NDArray[np.float32]) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()
