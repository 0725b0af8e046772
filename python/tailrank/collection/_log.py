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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptFileError
from ._inputs import DocId, vector_problem

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


def _text(raw: bytes) -> str:
    # Every TEXT value read (we only store valid UTF-8): damaged bytes are a damaged file.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFileError(f"the collection's database is damaged: a text is not UTF-8 ({raw[:40]!r})") from None


def connect(root: Path) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are explicit (BEGIN / COMMIT)."""
    db = sqlite3.connect(root / DB, isolation_level=None, check_same_thread=False, timeout=60.0)
    db.text_factory = _text
    try:
        with damage_is_corrupt():
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # the commit is the collection's commit point
            db.execute("PRAGMA journal_size_limit = 67108864")  # a bulk write's WAL shrinks back after it
    except BaseException:
        db.close()
        raise
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


_COLUMNS = {
    "state": {"key", "value"},
    "docs": {"doc_id", "text", "metadata"},
    "chunks": {"key", "doc_id", "start", "end", "seq", "vector", "tokens"},
    "deleted": {"key", "seq"},
    "fields": {"doc_id", "name", "kind", "value"},
}


def _damaged(what: str) -> CorruptFileError:
    return CorruptFileError(f"the collection's database is damaged: {what}")


# SQLite's primary result codes for damage (our SQL is fixed: a plain SQL error is a changed schema);
# busy, locked, I/O and disk-full errors stay what they are.
_DAMAGE_CODES = {1, 11, 26}  # SQLITE_ERROR, SQLITE_CORRUPT, SQLITE_NOTADB


def is_damage(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is None or (code & 0xFF) in _DAMAGE_CODES


@contextmanager
def damage_is_corrupt() -> Iterator[None]:
    """Reads of pages that open did not touch: a malformed page found then is CorruptFileError."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if is_damage(e):
            raise _damaged(str(e)) from e
        raise
    except UnicodeDecodeError as e:  # SQLite's message quoted bytes of the damaged file
        raise _damaged(f"unreadable ({e})") from e


def end_read(db: sqlite3.Connection) -> None:
    """Ends a read transaction. A damaged file can fail even the COMMIT (found by atheris: was a
    bare DatabaseError): CorruptFileError then, and the connection is left out of the transaction."""
    try:
        with damage_is_corrupt():
            db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the close of the connection ends it
        raise


def check_schema(db: sqlite3.Connection) -> None:
    """Every table and column the collection reads exists (once, at open: a few catalog rows)."""
    with damage_is_corrupt():
        for table, want in _COLUMNS.items():
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if not want <= have:
                raise _damaged(f"table {table} lacks {sorted(want - have)}")


def _state_value(key: str, v: Any) -> int:
    if type(v) is not int or v < 0:
        raise _damaged(f"state {key!r} is {v!r}, not a count")
    return v


def read_state(db: sqlite3.Connection) -> dict[str, int]:
    """The state row, each value a count and the write numbers in order (the one validator of
    ``state``): a checkpoint never newer than the last write nor its key counter ahead."""
    try:
        rows = db.execute("SELECT key, value FROM state").fetchall()
    except sqlite3.DatabaseError as e:
        raise _damaged(str(e)) from e
    got = {k: _state_value(k, v) for k, v in rows if k in STATE_KEYS}
    missing = [k for k in STATE_KEYS if k not in got]
    if missing:
        raise CorruptFileError(f"the collection's database has no {missing[0]!r} entry")
    if not (got["pruned_to"] <= got["checkpoint"] <= got["seq"]) or not (
        got["checkpoint_next_key"] <= got["next_key"] and got["chunks"] <= got["next_key"]
    ):
        raise _damaged(f"its state is out of order: {got}")
    return got


def read_seq(db: sqlite3.Connection) -> int:
    with damage_is_corrupt():
        row = db.execute("SELECT value FROM state WHERE key = 'seq'").fetchone()
    if row is None:
        raise CorruptFileError("the collection's database has no 'seq' entry")
    return _state_value("seq", row[0])


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


def _doc_row(doc_id: Any, text: Any, meta: Any) -> dict[str, Any]:
    """A document row as read (the one validator of ``docs``; rows are read per result): its
    metadata as a dict."""
    if not (type(doc_id) is str or (type(doc_id) is int and doc_id >= 0)) or type(text) is not str:
        raise _damaged(f"document {doc_id!r} has a {type(text).__name__} text or a malformed id")
    try:
        md = json.loads(meta) if isinstance(meta, str) else None
    except ValueError:
        md = None
    if not isinstance(md, dict):
        raise _damaged(f"document {doc_id!r} has malformed metadata {meta!r:.80}")
    return md


def get_docs(db: sqlite3.Connection, ids: Sequence[DocId]) -> dict[Any, dict[str, Any]]:
    rows: dict[Any, dict[str, Any]] = {}
    for part in parts(ids):
        q = f"SELECT doc_id, text, metadata FROM docs WHERE doc_id IN ({_marks(len(part))})"
        for doc_id, text, meta in db.execute(q, part):
            rows[(type(doc_id), doc_id)] = {"id": doc_id, "text": text, "metadata": _doc_row(doc_id, text, meta)}
    return rows


def chunk_info(db: sqlite3.Connection, keys: Sequence[int], chunked: bool) -> dict[int, tuple[DocId, str, dict[str, Any]]]:
    out: dict[int, tuple[DocId, str, dict[str, Any]]] = {}
    for part in parts(keys):
        q = (
            "SELECT c.key, c.doc_id, c.start, c.end, d.text, d.metadata FROM chunks c "
            f"JOIN docs d ON d.doc_id = c.doc_id WHERE c.key IN ({_marks(len(part))})"
        )
        for key, doc_id, a, b, text, meta in db.execute(q, part):
            md = _doc_row(doc_id, text, meta)
            if type(a) is not int or type(b) is not int or not 0 <= a <= b <= len(text):
                raise _damaged(f"chunk {key!r} spans [{a!r}, {b!r}) of a {len(text)}-character text")
            out[int(key)] = (doc_id, text[a:b] if chunked else text, md)
    return out


def allowed_keys(db: sqlite3.Connection, docs_sql: str, params: list[Any]) -> npt.NDArray[np.int64]:
    # A key that is no integer >= 0 (a damaged row) reads as NULL, which fromiter refuses.
    q = f"SELECT CASE WHEN typeof(key) = 'integer' AND key >= 0 THEN key END FROM chunks WHERE doc_id IN ({docs_sql})"
    try:
        return np.fromiter((r[0] for r in db.execute(q, params)), dtype=np.int64)
    except TypeError:
        raise _damaged("a chunk's key is not an integer >= 0") from None


# Per kind of a stored field value (_filters.NULL ... OTHER): the SQLite types its value may have.
_KIND_TYPES = {0: ("null",), 1: ("integer", "real"), 2: ("integer", "real"), 3: ("text",), 4: ("null",)}
_KIND_MAX = 4
# The bounds of one field's rows in the (name, kind, value) index: O(log n) each, whatever the
# table's size. SQLite sorts NULL < numbers < text < blob, so a value of the wrong type for its
# kind is at one end of that kind's range (or, for a bool, strictly between 0 and 1).
_FIELD_ENDS = (
    "SELECT (SELECT CASE typeof(kind) WHEN 'integer' THEN kind ELSE -1 END FROM fields WHERE name = ?1 ORDER BY kind LIMIT 1), "
    "(SELECT CASE typeof(kind) WHEN 'integer' THEN kind ELSE -1 END FROM fields WHERE name = ?1 ORDER BY kind DESC LIMIT 1), "
    "coalesce((SELECT 1 FROM fields WHERE name = ?1 AND kind > 0 AND kind < 1 LIMIT 1), "
    "(SELECT 1 FROM fields WHERE name = ?1 AND kind > 1 AND kind < 2 LIMIT 1), "
    "(SELECT 1 FROM fields WHERE name = ?1 AND kind > 2 AND kind < 3 LIMIT 1), "
    "(SELECT 1 FROM fields WHERE name = ?1 AND kind > 3 AND kind < 4 LIMIT 1))"
)  # (one range per seek: SQLite scans the whole field for an OR of ranges)
_VALUE_ENDS = (
    "SELECT (SELECT typeof(value) FROM fields WHERE name = ?1 AND kind = ?2 ORDER BY value LIMIT 1), "
    "(SELECT typeof(value) FROM fields WHERE name = ?1 AND kind = ?2 ORDER BY value DESC LIMIT 1), "
    "(SELECT value FROM fields WHERE name = ?1 AND kind = ?2 ORDER BY value LIMIT 1), "
    "(SELECT value FROM fields WHERE name = ?1 AND kind = ?2 ORDER BY value DESC LIMIT 1), "
    "(SELECT 1 FROM fields WHERE name = ?1 AND kind = ?2 AND value > 0 AND value < 1 LIMIT 1)"
)


def check_fields(db: sqlite3.Connection, reads: Sequence[tuple[str, Sequence[int]]]) -> None:
    """The ``fields`` rows a filter reads hold the type their kind says (the one validator of
    ``fields``; a few index seeks per field, none per row): else a range or ``$ne`` would
    silently match a damaged row (text sorts above every number)."""
    for name, kinds in reads:
        lo, hi, between = db.execute(_FIELD_ENDS, (name,)).fetchone()
        if lo is None:
            continue  # no document has the field
        if not (0 <= lo <= hi <= _KIND_MAX) or between is not None:  # -1: a kind that is no integer
            raise _damaged(f"metadata field {name!r} has rows of unknown kind (kinds {lo} to {hi}, -1: not an integer)")
        for kind in kinds:
            t_lo, t_hi, v_lo, v_hi, half = db.execute(_VALUE_ENDS, (name, kind)).fetchone()
            if t_lo is None:
                continue
            want = _KIND_TYPES[kind]
            bad = t_lo not in want or t_hi not in want
            if kind == 1 and not bad:  # a bool is stored as 0 or 1
                bad = v_lo not in (0, 1) or v_hi not in (0, 1) or half is not None
            if bad:
                raise _damaged(f"metadata field {name!r} has rows of kind {kind} holding {t_lo} to {t_hi} values")


@dataclass
class Delta:
    """What the writes after some ``seq`` changed: chunks added (still live) and keys deleted."""

    seq: int
    next_key: int
    chunks: int
    pruned_to: int
    add_keys: npt.NDArray[np.int64]
    add_vectors: npt.NDArray[np.float32]
    add_tokens: tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]] | None  # DocStore (flat, offsets)
    deleted: npt.NDArray[np.int64]


def read_delta(
    db: sqlite3.Connection,
    after: int,
    dim: int,
    with_tokens: bool,
    vocab: int | None = None,
    *,
    first_key: int | None = None,
    metric: str = "cosine",
) -> Delta:
    """Everything committed after write ``after``, from one snapshot of the database.

    The one validator of ``chunks`` and ``deleted`` rows, at C speed or vectorized (an open
    replays up to every row): types and blob lengths in SQL, keys, token ids and vectors with
    numpy. ``first_key``: the key counter after write ``after`` (the writes since took keys from
    it on); default: the checkpoint's when ``after`` is the checkpoint, else 0.
    """
    ok = "typeof(key) = 'integer' AND typeof(seq) = 'integer' AND typeof(vector) = 'blob' AND length(vector) = ?"
    if with_tokens:
        ok += " AND typeof(tokens) = 'blob' AND length(tokens) % 4 = 0"
    db.execute("BEGIN")
    try:
        st = read_state(db)
        top_seq, top_key = db.execute("SELECT max(seq), max(key) FROM chunks").fetchone()
        del_seq = db.execute("SELECT max(seq) FROM deleted").fetchone()[0]
        keys, vecs, toks = [], [], []
        for key, vec, tok, good in db.execute(
            f"SELECT key, vector, tokens, {ok} FROM chunks WHERE seq > ? ORDER BY key", (4 * dim, after)
        ):
            if not good:
                raise _damaged(f"chunk {key!r} has a malformed key, write number, vector or reranker tokens")
            keys.append(key)
            vecs.append(vec)
            if with_tokens:
                toks.append(tok)
        deleted = []
        for key, good in db.execute(
            "SELECT key, typeof(key) = 'integer' AND typeof(seq) = 'integer' FROM deleted WHERE seq > ?", (after,)
        ):
            if not good:
                raise _damaged(f"deletion {key!r} is malformed")
            deleted.append(key)
    except sqlite3.DatabaseError as e:
        if is_damage(e):
            raise _damaged(str(e)) from e
        raise
    finally:
        end_read(db)
    for top in (top_seq, del_seq):  # O(1) through the indexes: no row from a write not yet made
        if top is not None and not (type(top) is int and top <= st["seq"]):
            raise _damaged(f"a row of write {top!r} is past the last write {st['seq']}")
    if top_key is not None and not (type(top_key) is int and top_key < st["next_key"]):
        raise _damaged(f"chunk key {top_key!r} is not below the next key {st['next_key']}")
    add_keys = np.asarray(keys, dtype=np.int64)
    # Chunks written after the checkpoint took keys from its counter on.
    lo = first_key if first_key is not None else st["checkpoint_next_key"] if after == st["checkpoint"] else 0
    if add_keys.size and (add_keys[0] < lo or (np.diff(add_keys) <= 0).any()):
        raise _damaged(f"the chunks written after write {after} have keys out of order or below {lo}")
    dead = np.asarray(deleted, dtype=np.int64)
    if dead.size and (dead.min() < 0 or dead.max() >= st["next_key"] or np.unique(dead).size != dead.size):
        raise _damaged(f"the deletions after write {after} name keys never given or twice")
    if dead.size and add_keys.size and np.isin(add_keys, dead).any():
        raise _damaged(f"a chunk written after write {after} is both live and deleted")
    add_tokens = _split_tokens(toks, vocab) if with_tokens else None
    mat = np.frombuffer(b"".join(vecs), dtype="<f4").astype(np.float32).reshape(len(vecs), dim)
    problem = vector_problem(mat, metric)
    if problem is not None:
        raise _damaged(f"a chunk written after write {after} has an unusable vector ({problem})")
    return Delta(
        seq=st["seq"],
        next_key=st["next_key"],
        chunks=st["chunks"],
        pruned_to=st["pruned_to"],
        add_keys=add_keys,
        add_vectors=mat,
        add_tokens=add_tokens,
        deleted=dead,
    )


def _split_tokens(blobs: list[bytes], vocab: int | None) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Token-id blobs (lengths checked in SQL) as one DocStore ``(flat, offsets)`` pair, every
    id checked in one pass."""
    flat = np.frombuffer(b"".join(blobs), dtype="<i4").astype(np.int32)
    if flat.size and (flat.min() < 0 or (vocab is not None and flat.max() >= vocab)):
        raise _damaged(f"a chunk's reranker tokens are outside the vocabulary [0, {vocab})")
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)) // 4, out=offsets[1:])
    return flat, offsets


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
