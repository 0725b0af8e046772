"""Fuzzing what a Collection loads: the manifest, the SQLite log and the checkpoint files.

Each example starts from one small valid collection (built once per module with the seeded tiny
models), damages or crafts one kind of input, and opens it. The open must either work with a
consistent state (get and search answer from what the database holds) or raise a typed
``tailrank.errors`` error (CorruptFileError for damage) — never another exception or a crash.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailrank.collection import Collection
from tailrank.errors import ConcurrentUseError, CorruptFileError, ModelError, TailrankError
from tailrank._fileio import write_json_checked

from collection_fixtures import ce, ce_dir, emb, emb_dir  # noqa: F401  (pytest fixtures)

EXAMPLES = int(os.environ.get("TAILRANK_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# What a damaged collection may raise on open (documented on Collection.open).
TYPED = (CorruptFileError, ModelError, ConcurrentUseError)
_COPIES = itertools.count()
WORDS = "alpha beta gamma delta protein gene cell binding site river stone light".split()


def _texts(n: int, off: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3 + off) % len(WORDS)] for j in range(5 + i % 9)) for i in range(n)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, emb, ce) -> Path:
    """A collection with a checkpoint (index-0 and index-<s>) and writes after it to replay."""
    root = tmp_path_factory.mktemp("fuzz") / "col"
    col = Collection.create(root, embedder=emb, reranker=ce, chunk_tokens=6, chunk_overlap=1)
    metas = [{"lang": ["en", "de"][i % 2], "year": 2018 + i, "score": i / 3, "flag": i % 2 == 0, "tags": [i]} for i in range(6)]
    col.add(_texts(6, 0), ids=[f"d{i}" for i in range(6)], metadata=metas)
    col.add(_texts(2, 5), ids=[10, 11], metadata=[{"year": 1999}, None])
    col.checkpoint()
    col.add(_texts(3, 9), ids=["e0", "e1", 12], metadata=[{"lang": "fr"}, {"year": 2020.5}, {"flag": True}])
    col.delete(["d1", 10])
    col.upsert(_texts(1, 2), ids=["d2"], metadata=[{"lang": "xx", "year": 3000}])
    col.close(checkpoint=False)
    del col
    gc.collect()  # the last connection closes: no WAL left, every byte in meta.sqlite
    db = _db(root)
    db.execute("PRAGMA journal_mode = DELETE")
    db.close()
    return root


def _copy(pristine: Path, tmp_path: Path) -> Path:
    # A new folder per example: an earlier example's collection may still close (and remove
    # its WAL) when the garbage collector gets to it.
    dst = tmp_path / f"c{next(_COPIES)}"
    shutil.copytree(pristine, dst)
    return dst


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "meta.sqlite", isolation_level=None)


def _exercise(root: Path, emb, ce) -> None:
    """Opens the collection; if it opens, its answers must agree with its database."""
    try:
        col = Collection.open(root, embedder=emb, reranker=ce)
    except TYPED:
        return
    try:
        db = sqlite3.connect(root / "meta.sqlite")
        try:
            rows = db.execute("SELECT doc_id FROM docs").fetchall()
        except sqlite3.DatabaseError:
            rows = []  # a damaged page this harness cannot read either: searches still must answer
        finally:
            db.close()
        # The ids a caller could ask for (a NULL or negative id is unreachable, not asked); a table
        # rebuilt without its key may hold an id twice: asked once.
        ids = list(dict.fromkeys(r[0] for r in rows if type(r[0]) is str or (type(r[0]) is int and r[0] >= 0)))
        try:
            got = col.get(ids)
        except CorruptFileError:
            got = None
        if got is not None:
            assert [g["id"] for g in got] == ids
            for g in got:
                assert isinstance(g["text"], str) and isinstance(g["metadata"], dict)
        for kw in ({"rerank": False}, {"rerank": True}, {"filter": {"year": {"$gte": 2000}}}, {"filter": {"lang": "en"}}):
            try:
                res = col.search("alpha protein", k=5, candidates=20, **kw)
            except CorruptFileError:
                continue
            assert len(res.ids()) == len(set(map(repr, res.ids())))
            for h in res.hits:
                assert h.id in ids, (h.id, ids)
                assert isinstance(h.text, str)
                assert math.isfinite(h.first_stage_score)
    finally:
        try:
            col.close(checkpoint=False)
        except TailrankError:
            pass


# --- values a crafted file may hold --------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**63 - 1, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["cosine", "ip", "l2", "none", "rrf", "linear", "\ud800", ""]),
)
_json_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
_sql_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    st.binary(max_size=40),
)


# --- the manifest --------------------------------------------------------------------------------

_MANIFEST_PATHS = [
    ("format",), ("format_version",), ("metric",), ("dim",), ("chunk_tokens",), ("chunk_overlap",), ("M",),
    ("ef_construction",), ("embedder",), ("embedder", "fingerprint"), ("embedder", "path"), ("reranker",),
    ("reranker", "fingerprint"), ("reranker", "path"), ("fusion",), ("fusion", "method"), ("fusion", "weight"),
    ("fusion", "rrf_k"), ("fusion", "tuned"),
]  # fmt: skip


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any, delete: bool) -> None:
    for k in path[:-1]:
        if not isinstance(doc.get(k), dict):
            doc[k] = {}
        doc = doc[k]
    if delete:
        doc.pop(path[-1], None)
    else:
        doc[path[-1]] = value


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(_MANIFEST_PATHS), _json_values, st.booleans()), min_size=1, max_size=3),
       recorded_models=st.booleans())  # fmt: skip
def test_fuzz_manifest_fields(pristine, tmp_path, emb, ce, edits, recorded_models):
    root = _copy(pristine, tmp_path)
    doc = json.loads((root / "manifest.json").read_text())
    doc.pop("sha256")
    if ("fusion",) not in [e[0] for e in edits]:
        doc["fusion"] = {"method": "linear", "weight": 0.5, "rrf_k": 60, "tuned": None}
    for path, value, delete in edits:
        _set(doc, path, value, delete)
    try:
        write_json_checked(root / "manifest.json", doc)  # a crafted file: a valid checksum
    except (ValueError, UnicodeEncodeError):
        return  # not representable as JSON at all
    if recorded_models:
        try:
            col = Collection.open(root)
        except TYPED:
            return
        col.close(checkpoint=False)
    else:
        _exercise(root, emb, ce)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=4000), junk=st.binary(max_size=8))
def test_fuzz_manifest_bytes(pristine, tmp_path, emb, ce, cut, flip, junk):
    root = _copy(pristine, tmp_path)
    raw = bytearray((root / "manifest.json").read_bytes())
    if flip < len(raw) and junk:
        raw[flip : flip + len(junk)] = junk
    (root / "manifest.json").write_bytes(bytes(raw[: max(cut, 0)]) if cut < len(raw) else bytes(raw))
    _exercise(root, emb, ce)


# --- the SQLite log ------------------------------------------------------------------------------

_COLUMNS = {
    "state": ["value"],
    "docs": ["doc_id", "text", "metadata"],
    "chunks": ["key", "doc_id", "start", "end", "seq", "vector", "tokens"],
    "deleted": ["key", "seq"],
    "fields": ["doc_id", "name", "kind", "value"],
}
_STATE_KEYS = ["seq", "next_key", "chunks", "checkpoint", "checkpoint_next_key", "pruned_to"]


@st.composite
def _sql_edit(draw) -> tuple[str, tuple[Any, ...]]:
    kind = draw(st.sampled_from(["update", "state", "blob", "tokens", "delete", "insert_deleted", "drop", "extra", "dup_chunk"]))
    if kind == "update":
        table = draw(st.sampled_from(sorted(_COLUMNS)))
        col = draw(st.sampled_from(_COLUMNS[table]))
        return f'UPDATE OR IGNORE {table} SET "{col}" = ? WHERE rowid IN (SELECT rowid FROM {table} ORDER BY random() LIMIT ?)', (
            draw(_sql_values), draw(st.integers(1, 3)))
    if kind == "state":
        return "UPDATE state SET value = ? WHERE key = ?", (
            draw(st.one_of(_sql_values, st.integers(-3, 40))), draw(st.sampled_from(_STATE_KEYS)))
    if kind == "blob":  # a vector of the wrong length
        n = draw(st.integers(0, 300))
        return "UPDATE chunks SET vector = ? WHERE key = (SELECT key FROM chunks ORDER BY random() LIMIT 1)", (bytes(n),)
    if kind == "tokens":  # token ids outside the vocabulary, or a ragged blob
        toks = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12))
        blob = np.asarray(toks, dtype="<i4").tobytes() + draw(st.binary(max_size=3))
        return "UPDATE chunks SET tokens = ? WHERE key = (SELECT key FROM chunks ORDER BY random() LIMIT 1)", (blob,)
    if kind == "delete":
        table = draw(st.sampled_from(sorted(_COLUMNS)))
        return f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} ORDER BY random() LIMIT ?)", (draw(st.integers(1, 2)),)
    if kind == "insert_deleted":
        return "INSERT OR IGNORE INTO deleted(key, seq) VALUES (?, ?)", (draw(st.integers(-5, 60)), draw(st.integers(-5, 40)))
    if kind == "drop":
        return f"DROP TABLE {draw(st.sampled_from(sorted(_COLUMNS)))}", ()
    if kind == "extra":
        return "CREATE TABLE IF NOT EXISTS extra(x)", ()
    return ("INSERT OR IGNORE INTO chunks(key, doc_id, start, end, seq, vector, tokens) SELECT key + ?, doc_id, start, end, seq + ?, "
            "vector, tokens FROM chunks ORDER BY random() LIMIT 1", (draw(st.integers(-3, 40)), draw(st.integers(-3, 5))))


@FUZZ
@given(edits=st.lists(_sql_edit(), min_size=1, max_size=4))
def test_fuzz_log_rows(pristine, tmp_path, emb, ce, edits):
    root = _copy(pristine, tmp_path)
    db = _db(root)
    for sql, params in edits:
        try:
            db.execute(sql, params)
        except sqlite3.Error:
            pass  # e.g. a NOT NULL constraint: a crafted file could still hold it, see below
    db.close()
    _exercise(root, emb, ce)


@FUZZ
@given(edits=st.lists(_sql_edit(), min_size=1, max_size=3), nulls=st.lists(st.sampled_from(
    [(t, c) for t, cs in _COLUMNS.items() for c in cs]), min_size=1, max_size=2))  # fmt: skip
def test_fuzz_log_without_constraints(pristine, tmp_path, emb, ce, edits, nulls):
    """Tables rebuilt without types or NOT NULL (a crafted file): NULLs and any type anywhere."""
    root = _copy(pristine, tmp_path)
    db = _db(root)
    for table in _COLUMNS:
        db.execute(f"CREATE TABLE t_{table} AS SELECT * FROM {table}")
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE t_{table} RENAME TO {table}")
    for table, col in nulls:
        db.execute(f'UPDATE {table} SET "{col}" = NULL WHERE rowid IN (SELECT rowid FROM {table} ORDER BY random() LIMIT 1)')
    for sql, params in edits:
        try:
            db.execute(sql, params)
        except sqlite3.Error:
            pass
    db.close()
    _exercise(root, emb, ce)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=200_000), junk=st.binary(min_size=0, max_size=64), at=st.integers(0, 200_000))
def test_fuzz_log_file_bytes(pristine, tmp_path, emb, ce, cut, junk, at):
    root = _copy(pristine, tmp_path)
    p = root / "meta.sqlite"
    raw = bytearray(p.read_bytes())
    if junk:
        raw[at % len(raw) : at % len(raw) + len(junk)] = junk
    p.write_bytes(bytes(raw[: cut % (len(raw) + 1)]) if cut % 3 else bytes(raw))
    _exercise(root, emb, ce)


# --- checkpoints ---------------------------------------------------------------------------------


def _ckpts(root: Path) -> list[int]:
    return sorted({int(p.stem.split("-")[1]) for p in root.glob("index-*.bin")})


@FUZZ
@given(op=st.sampled_from(["swap", "swap_index", "swap_store", "truncate", "flip", "remove", "newer", "older", "point"]),
       which=st.sampled_from(["index", "docstore"]), n=st.integers(0, 100_000), junk=st.binary(min_size=1, max_size=16),
       seq=st.integers(-2, 50))  # fmt: skip
def test_fuzz_checkpoints(pristine, tmp_path, emb, ce, op, which, n, junk, seq):
    root = _copy(pristine, tmp_path)
    a, b = _ckpts(root)[:1][0], _ckpts(root)[-1]
    db = _db(root)
    if op.startswith("swap"):
        kinds = {"swap": ["index", "docstore"], "swap_index": ["index"], "swap_store": ["docstore"]}[op]
        for k in kinds:
            pa, pb = root / f"{k}-{a}.bin", root / f"{k}-{b}.bin"
            tmp = root / "swap.tmp"
            pa.rename(tmp), pb.rename(pa), tmp.rename(pb)
    elif op in ("truncate", "flip", "remove"):
        p = root / f"{which}-{b}.bin"
        raw = bytearray(p.read_bytes())
        if op == "truncate":
            raw = raw[: n % (len(raw) + 1)]
        elif op == "flip":
            raw[n % len(raw) : n % len(raw) + len(junk)] = junk
        if op == "remove":
            p.unlink()
        else:
            p.write_bytes(bytes(raw))
    elif op == "newer":  # the newest checkpoint copied under a number past the log's last write
        s = b + 1 + abs(seq)
        for k in ("index", "docstore"):
            shutil.copy(root / f"{k}-{b}.bin", root / f"{k}-{s}.bin")
        db.execute("UPDATE state SET value = ? WHERE key = 'checkpoint'", (s,))
    elif op == "older":  # the database points at the first checkpoint again
        db.execute("UPDATE state SET value = ? WHERE key = 'checkpoint'", (a,))
    else:
        db.execute("UPDATE state SET value = ? WHERE key = 'checkpoint'", (seq,))
    db.close()
    _exercise(root, emb, ce)


# --- damage that lands after open: a reader catching up with another writer -------------------

_KWS = ({"rerank": False}, {"rerank": True}, {"filter": {"year": {"$gte": 2000}}, "rerank": False},
        {"filter": {"lang": {"$ne": "en"}}})  # fmt: skip


def _answers(col: Collection) -> dict[str, Any]:
    """Everything a caller can ask of a collection, in a comparable form (every document, every
    chunk as a candidate: no approximation left to differ)."""
    with col._snapshot() as db:
        ids = _askable(r[0] for r in db.execute("SELECT doc_id FROM docs"))
    out: dict[str, Any] = {"len": len(col), "get": col.get(ids)}
    for i, kw in enumerate(_KWS):
        res = col.search("alpha protein", k=50, candidates=100, **kw)
        scores = [h.score for h in res.hits]
        assert scores == sorted(scores, reverse=True)
        # Ties may come in either order (graph and fresh part): compared as a set.
        out[f"search{i}"] = sorted(((h.id, h.text, round(h.score, 4)) for h in res.hits), key=repr)
    return out


def _askable(ids: Any) -> list[Any]:
    # The ids a caller could ask for (a NULL, negative or blob id is unreachable), each once.
    return sorted(dict.fromkeys(x for x in ids if type(x) is str or (type(x) is int and x >= 0)), key=repr)


def _documents(answers: dict[str, Any] | None) -> dict[str, Any] | None:
    """The answers up to which chunk of a document a search found: the HNSW graph of a newer
    checkpoint may miss a chunk that an exact search of the fresh part finds (or score another)."""
    if answers is None:
        return None
    return {k: sorted({repr(h[0]) for h in v}) if k.startswith("search") else v for k, v in answers.items()}


def _reader_answers(col: Collection) -> dict[str, Any] | None:
    """The caught-up reader's answers, or None when it reports damage (CorruptFileError)."""
    try:
        return _answers(col)
    except CorruptFileError:
        return None


def _consistent_with_its_database(col: Collection, root: Path, got: dict[str, Any]) -> None:
    db = sqlite3.connect(root / "meta.sqlite")
    try:
        docs = {r[0]: r[1] for r in db.execute("SELECT doc_id, text FROM docs")}
    finally:
        db.close()
    assert [g["id"] for g in got["get"]] == _askable(docs)
    for i in range(len(_KWS)):
        for doc_id, text, score in got[f"search{i}"]:
            assert doc_id in docs and text in docs[doc_id] and math.isfinite(score), (doc_id, text, score)


_WRITES = st.lists(st.tuples(st.sampled_from(["add", "upsert", "delete"]), st.integers(0, 10**6)), min_size=1, max_size=3)


def _write(col: Collection, ops: list[tuple[str, int]]) -> None:
    """Another writer's commits: new documents, replaced ones, deletions."""
    for op, r in ops:
        with col._snapshot() as db:
            live_ids = sorted((r[0] for r in db.execute("SELECT doc_id FROM docs")), key=repr)
        if op == "delete" and live_ids:
            col.delete([live_ids[r % len(live_ids)]])
            continue
        n = 1 + r % 3
        ids: list[Any] = [f"w{r}-{j}" for j in range(n)]
        if op == "upsert" and live_ids:
            ids = list(dict.fromkeys([live_ids[r % len(live_ids)], *ids[1:]]))
            n = len(ids)
        metas = [{"lang": ["en", "de", "fr"][(r + j) % 3], "year": 1990 + (r + j) % 40} for j in range(n)]
        col.upsert(_texts(n, r % 11), ids=ids, metadata=metas)


@st.composite
def _edit_after(draw, after: int) -> tuple[str, tuple[Any, ...]]:
    """One crafted change of the rows committed after write ``after`` (or of the state). Older
    rows stay as they were: their damage is the open fuzzers' (a crafted old deletion can fool an
    open whose counts still add up, never a reader that applied it before the damage)."""
    new_chunks = f"SELECT rowid FROM chunks WHERE seq > {after} ORDER BY random() LIMIT 1"
    new_docs = f"SELECT doc_id FROM chunks WHERE seq > {after}"
    kind = draw(st.sampled_from(["chunk", "vector", "tokens", "deleted", "insert_deleted", "docs", "fields", "kind",
                                 "state", "drop_row", "dup_chunk"]))
    if kind == "chunk":
        col = draw(st.sampled_from(_COLUMNS["chunks"]))
        return f'UPDATE OR IGNORE chunks SET "{col}" = ? WHERE rowid IN ({new_chunks})', (
            draw(st.one_of(_sql_values, st.integers(-3, 60))),)
    if kind == "vector":  # right length, any bytes: huge, NaN or plain other values
        raw = draw(st.sampled_from([b"\x7f\x7f\xff\xff", b"\x00\x00\xc0\x7f", b"\x9e\x7b\x0c\x72", b"\x00\x00\x80\x3f"]))
        return f"UPDATE chunks SET vector = ? * (length(vector) / 4) WHERE rowid IN ({new_chunks})", (raw,)
    if kind == "tokens":
        toks = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8))
        return f"UPDATE chunks SET tokens = ? WHERE rowid IN ({new_chunks})", (np.asarray(toks, dtype="<i4").tobytes(),)
    if kind == "deleted":
        col = draw(st.sampled_from(_COLUMNS["deleted"]))
        return f'UPDATE OR IGNORE deleted SET "{col}" = ? WHERE rowid IN (SELECT rowid FROM deleted WHERE seq > {after} ' \
               "ORDER BY random() LIMIT 1)", (
            draw(st.one_of(_sql_values, st.integers(-3, 60))),)
    if kind == "insert_deleted":  # a deletion, in the newest write, of any key
        return "INSERT OR IGNORE INTO deleted(key, seq) VALUES (?, (SELECT value FROM state WHERE key = 'seq'))", (
            draw(st.integers(-2, 60)),)
    if kind == "docs":
        col = draw(st.sampled_from(_COLUMNS["docs"]))
        return f'UPDATE OR IGNORE docs SET "{col}" = ? WHERE doc_id IN ({new_docs} ORDER BY random() LIMIT 1)', (draw(_sql_values),)
    if kind in ("fields", "kind"):
        col = "kind" if kind == "kind" else draw(st.sampled_from(_COLUMNS["fields"]))
        value = draw(st.integers(-1, 6)) if kind == "kind" else draw(_sql_values)
        return f'UPDATE fields SET "{col}" = ? WHERE rowid IN (SELECT rowid FROM fields WHERE doc_id IN ({new_docs}) ' \
               "ORDER BY random() LIMIT 1)", (value,)
    if kind == "state":
        return "UPDATE state SET value = value + ? WHERE key = ?", (draw(st.integers(-3, 3)), draw(st.sampled_from(_STATE_KEYS)))
    if kind == "drop_row":
        table = draw(st.sampled_from(["chunks", "deleted", "docs", "fields"]))
        new = f"seq > {after}" if table in ("chunks", "deleted") else f"doc_id IN ({new_docs})"
        return f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {new} ORDER BY random() LIMIT 1)", ()
    return (f"INSERT OR IGNORE INTO chunks(key, doc_id, start, end, seq, vector, tokens) SELECT key + ?, doc_id, start, end, "
            f"seq + ?, vector, tokens FROM chunks WHERE seq > {after} ORDER BY random() LIMIT 1",
            (draw(st.integers(-40, 3)), draw(st.integers(-3, 1))))


@FUZZ
@given(data=st.data(), writes=_WRITES)
def test_fuzz_catch_up_with_damaged_new_rows(pristine, tmp_path, emb, ce, data, writes):
    """A reader opens; another writer commits; the rows it committed are then damaged. The
    reader's next calls (which catch up) agree with a fresh open of the same files, or raise
    CorruptFileError; nothing else, and never a hit the database does not hold."""
    root = _copy(pristine, tmp_path)
    reader = _open(root, emb, ce)
    try:
        writer = _open(root, emb, ce)
        _write(writer, writes)
        truth = _answers(writer)
        writer.close(checkpoint=False)
        edits = data.draw(st.lists(_edit_after(reader._applied), max_size=3), label="edits")
        db = _db(root)
        for sql, params in edits:
            try:
                db.execute(sql, params)
            except sqlite3.Error:
                pass  # e.g. NOT NULL: the crafted-table targets above cover those
        db.close()
        got = _reader_answers(reader)
        if not edits:
            assert got == truth
        if got is None:
            with pytest.raises(CorruptFileError):
                _answers(reader)  # it stays reported (a reload meets the same damage)
            return
        _consistent_with_its_database(reader, root, got)
        try:
            fresh = _open(root, emb, ce)
        except TYPED:
            return
        try:
            want = _reader_answers(fresh)
        finally:
            fresh.close(checkpoint=False)
        if want is not None:  # the same rows read from the state at open and from the start: one answer
            assert _documents(got) == _documents(want)  # (a changed checkpoint pointer: another graph)
    finally:
        reader.close(checkpoint=False)


@FUZZ
@given(writes=_WRITES, more=_WRITES, checkpoints=st.integers(1, 2),
       op=st.sampled_from(["truncate", "flip", "remove", "swap_new", "swap_old", "none"]),
       which=st.sampled_from(["index", "docstore"]), newest=st.booleans(), n=st.integers(0, 100_000),
       junk=st.binary(min_size=1, max_size=16))  # fmt: skip
def test_fuzz_catch_up_with_damaged_new_checkpoints(pristine, tmp_path, emb, ce, writes, more, checkpoints, op, which,
                                                     newest, n, junk):
    """A reader opens; another writer commits and checkpoints once or twice; a new checkpoint
    file is then damaged. With one new checkpoint the reader replays the log alone and must
    answer exactly as the writer did; with two it reloads from the newest: its answers, if any,
    come from the database (else CorruptFileError)."""
    root = _copy(pristine, tmp_path)
    old = _ckpts(root)
    reader = _open(root, emb, ce)
    try:
        writer = _open(root, emb, ce)
        _write(writer, writes)
        for _ in range(checkpoints):
            assert writer.checkpoint()
            _write(writer, more)
        truth = _answers(writer)
        writer.close(checkpoint=False)
        new = [c for c in _ckpts(root) if c not in old]
        assert new, (old, _ckpts(root))
        s = new[-1] if newest else new[0]
        p = root / f"{which}-{s}.bin"
        if op in ("truncate", "flip"):
            raw = bytearray(p.read_bytes())
            if op == "truncate":
                raw = raw[: n % (len(raw) + 1)]
            else:
                raw[n % len(raw) : n % len(raw) + len(junk)] = junk
            p.write_bytes(bytes(raw))
        elif op == "remove":
            p.unlink()
        elif op.startswith("swap"):
            others = [c for c in (new if op == "swap_new" else _ckpts(root)) if c != s]
            if others:
                q = root / f"{which}-{others[0]}.bin"
                tmp = root / "swap.tmp"
                p.rename(tmp), q.rename(p), tmp.rename(q)
        got = _reader_answers(reader)
        if len(new) == 1 or op == "none":
            assert _documents(got) == _documents(truth)  # one new checkpoint: the log alone brought the reader up to date
        if got is not None:
            _consistent_with_its_database(reader, root, got)
    finally:
        reader.close(checkpoint=False)


def test_the_unmutated_copy_opens_and_answers(pristine, tmp_path, emb, ce):
    # The baseline every fuzz target mutates: it must open, replay its log and answer.
    col = Collection.open(_copy(pristine, tmp_path), embedder=emb, reranker=ce)
    try:
        assert len(col) == 9 and col.chunk_count > 9
        assert col.get(["d2", 11, "e1"])[2]["metadata"] == {"year": 2020.5}
        assert "d1" not in col and 10 not in col
        res = col.search("alpha protein", k=5, candidates=20)
        assert len(res.hits) == 5 and res.reranked > 0
        assert set(col.search("gene", k=9, filter={"lang": "en"}).ids()) == {"d0", "d4"}
    finally:
        col.close(checkpoint=False)


# --- regressions: each crash the fuzzers found, by name ------------------------------------------


def _open(root: Path, emb, ce) -> Collection:
    return Collection.open(root, embedder=emb, reranker=ce)


def _sql(root: Path, *stmts: tuple[str, tuple[Any, ...]] | str) -> None:
    db = _db(root)
    for s in stmts:
        db.execute(*((s, ()) if isinstance(s, str) else s))
    db.close()


def _unconstrained(root: Path, table: str) -> None:
    _sql(root, f"CREATE TABLE t AS SELECT * FROM {table}", f"DROP TABLE {table}", f"ALTER TABLE t RENAME TO {table}")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["embedder"].pop("path"),  # was KeyError
        lambda m: m.pop("reranker"),  # was KeyError
        lambda m: m.update(embedder=None),  # was TypeError
        lambda m: m.update(dim="384"),  # was ValueError from int()
        lambda m: m.update(dim=True),
        lambda m: m.update(chunk_overlap=-1),
        lambda m: m.update(chunk_overlap=6),  # not below chunk_tokens
        lambda m: m.update(chunk_tokens=[6]),
        lambda m: m.update(metric=["cosine"]),  # was TypeError (unhashable) / a wrong metric
        lambda m: m.update(M=2**40),
        lambda m: m.update(ef_construction=float("nan")),
        lambda m: m.update(format_version=2.0),
    ],
)
def test_crafted_manifest_field_is_corrupt(pristine, tmp_path, emb, ce, edit):
    root = _copy(pristine, tmp_path)
    doc = json.loads((root / "manifest.json").read_text())
    doc.pop("sha256")
    edit(doc)
    write_json_checked(root / "manifest.json", doc)
    with pytest.raises(CorruptFileError):
        _open(root, emb, ce)
    with pytest.raises(CorruptFileError):
        Collection.open(root)


def test_state_value_of_text_is_corrupt(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _sql(root, "UPDATE state SET value = 'INF' WHERE key = 'chunks'")  # was ValueError from int()
    with pytest.raises(CorruptFileError, match="not a count"):
        _open(root, emb, ce)


@pytest.mark.parametrize("state", [{"checkpoint": 99}, {"pruned_to": 99}, {"checkpoint_next_key": 10**6}, {"seq": 0}])
def test_state_out_of_order_is_corrupt(pristine, tmp_path, emb, ce, state):
    # A checkpoint newer than the log, write numbers going backwards, a key counter behind.
    root = _copy(pristine, tmp_path)
    _sql(root, *[("UPDATE state SET value = ? WHERE key = ?", (v, k)) for k, v in state.items()])
    with pytest.raises(CorruptFileError, match="out of order"):
        _open(root, emb, ce)


def test_dropped_fields_table_is_corrupt_at_open(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _sql(root, "DROP TABLE fields")  # was sqlite3.OperationalError at the first filtered search
    with pytest.raises(CorruptFileError, match="fields"):
        _open(root, emb, ce)


@pytest.mark.parametrize("blob", [b"\0" * 6, b"", b"\0" * 4000], ids=["ragged", "empty", "too-long"])
def test_vector_blob_of_wrong_length_is_corrupt(pristine, tmp_path, emb, ce, blob):
    root = _copy(pristine, tmp_path)
    _sql(root, ("UPDATE chunks SET vector = ? WHERE seq = (SELECT max(seq) FROM chunks)", (blob,)))  # was ValueError
    with pytest.raises(CorruptFileError, match="malformed"):
        _open(root, emb, ce)


def test_null_vector_is_corrupt(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _unconstrained(root, "chunks")
    _sql(root, "UPDATE chunks SET vector = NULL WHERE seq = (SELECT max(seq) FROM chunks)")  # was TypeError in join
    with pytest.raises(CorruptFileError):
        _open(root, emb, ce)


@pytest.mark.parametrize("tokens", [[-1, 5], [2**31 - 1]], ids=["negative", "past-vocab"])
def test_token_ids_outside_the_vocabulary_are_corrupt(pristine, tmp_path, emb, ce, tokens):
    root = _copy(pristine, tmp_path)
    blob = np.asarray(tokens, dtype="<i4").tobytes()
    _sql(root, ("UPDATE chunks SET tokens = ? WHERE seq = (SELECT max(seq) FROM chunks)", (blob,)))
    with pytest.raises(CorruptFileError, match="vocabulary"):
        _open(root, emb, ce)


def test_ragged_token_blob_is_corrupt(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _sql(root, ("UPDATE chunks SET tokens = ? WHERE seq = (SELECT max(seq) FROM chunks)", (b"\1\0\0\0\2",)))
    with pytest.raises(CorruptFileError):
        _open(root, emb, ce)


def test_deletion_of_a_key_the_checkpoint_lacks_is_corrupt(pristine, tmp_path, emb, ce):
    # Was UnknownIdError from the index: the first checkpoint (empty) swapped in for the newest.
    root = _copy(pristine, tmp_path)
    a, b = _ckpts(root)[0], _ckpts(root)[-1]
    for k in ("index", "docstore"):
        (root / f"{k}-{a}.bin").rename(root / "t"), (root / f"{k}-{b}.bin").rename(root / f"{k}-{a}.bin")
        (root / "t").rename(root / f"{k}-{b}.bin")
    with pytest.raises(CorruptFileError, match="disagree"):
        _open(root, emb, ce)


def test_deletion_row_of_a_key_never_given_is_corrupt(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _sql(root, "INSERT INTO deleted(key, seq) VALUES ((SELECT value FROM state WHERE key = 'next_key') + 5, "
               "(SELECT value FROM state WHERE key = 'seq'))")  # fmt: skip
    with pytest.raises(CorruptFileError, match="never given"):
        _open(root, emb, ce)


@pytest.mark.parametrize("key", ["NULL", "-1"])  # was TypeError in np.fromiter / ValueError on allow
def test_bad_chunk_key_is_corrupt_at_filtered_search(pristine, tmp_path, emb, ce, key):
    # A checkpointed chunk (not replayed at open): it is read only by a filter's allow-list.
    root = _copy(pristine, tmp_path)
    _unconstrained(root, "chunks")
    _sql(root, f"UPDATE chunks SET key = {key} WHERE doc_id = 'd0'")
    col = _open(root, emb, ce)
    try:
        with pytest.raises(CorruptFileError, match="key"):
            col.search("alpha", k=3, filter={"lang": "en"})
    finally:
        col.close(checkpoint=False)


def test_non_utf8_text_is_corrupt(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _sql(root, "UPDATE docs SET text = CAST(x'80ff61' AS TEXT) WHERE doc_id = 'd0'")  # was UnicodeDecodeError
    col = _open(root, emb, ce)
    try:
        with pytest.raises(CorruptFileError, match="UTF-8"):
            col.get(["d0"])
        assert col.get(["d3"])[0]["id"] == "d3"
    finally:
        col.close(checkpoint=False)


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]", "null"])
def test_malformed_metadata_is_corrupt(pristine, tmp_path, emb, ce, meta):
    root = _copy(pristine, tmp_path)
    _sql(root, ("UPDATE docs SET metadata = ? WHERE doc_id = 'd0'", (meta,)))  # was JSONDecodeError
    col = _open(root, emb, ce)
    try:
        with pytest.raises(CorruptFileError, match="metadata"):
            col.get(["d0"])
    finally:
        col.close(checkpoint=False)


def test_chunk_span_past_its_text_is_corrupt(pristine, tmp_path, emb, ce):
    root = _copy(pristine, tmp_path)
    _sql(root, "UPDATE chunks SET start = 5, end = 100000")
    col = _open(root, emb, ce)
    try:
        with pytest.raises(CorruptFileError, match="spans"):
            col.search("alpha", k=3, rerank=False)
    finally:
        col.close(checkpoint=False)


def test_huge_finite_vectors_normalize_without_overflow(tmp_path, emb):
    # Was a float32 overflow in the cosine norm (|x| ~ 1e20): a zero vector in the fresh part.
    col = Collection.create(tmp_path / "c", embedder=emb)
    try:
        v = np.zeros((2, emb.dim), dtype=np.float32)
        v[0, 0], v[1, 1] = 1e30, 3e38
        col.add(["a", "b"], ids=["x", "y"], vectors=v)
        prepared = col._fresh.prepare(v)
        assert prepared[0, 0] == pytest.approx(1.0) and prepared[1, 1] == pytest.approx(1.0)
    finally:
        col.close(checkpoint=False)


def test_malformed_page_read_after_open_is_corrupt(pristine, tmp_path, emb, ce):
    # Open reads only the state and the replayed rows: a damaged page of the docs table is found
    # by the first get or search (was sqlite3.DatabaseError: database disk image is malformed).
    root = _copy(pristine, tmp_path)
    db = _db(root)
    page = db.execute("PRAGMA page_size").fetchone()[0]
    (rootpage,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'docs'").fetchone()
    db.close()
    with open(root / "meta.sqlite", "r+b") as f:
        f.seek((rootpage - 1) * page)
        f.write(b"\xff" * page)
    col = _open(root, emb, ce)
    try:
        with pytest.raises(CorruptFileError, match="malformed"):
            col.get(["d0"])
        with pytest.raises(CorruptFileError, match="malformed"):
            col.search("alpha", k=3)
    finally:
        col.close(checkpoint=False)


# --- regressions of damage after open (a reader catching up) and of huge vectors -----------------


def _reader_and_new_write(pristine: Path, tmp_path: Path, emb, ce) -> tuple[Path, Collection, int]:
    """A reader open at the pristine state, and one more write committed by another object."""
    root = _copy(pristine, tmp_path)
    reader = _open(root, emb, ce)
    writer = _open(root, emb, ce)
    writer.add(_texts(2, 4), ids=["n0", "n1"], metadata=[{"lang": "en"}, {"year": 2030}])
    writer.close(checkpoint=False)
    return root, reader, reader._applied


def test_catch_up_deletion_of_a_chunk_not_live_is_corrupt(pristine, tmp_path, emb, ce):
    # An old deletion moved into the new write: was UnknownIdError from the index at the next search.
    root, reader, _ = _reader_and_new_write(pristine, tmp_path, emb, ce)
    _sql(root, "UPDATE deleted SET seq = (SELECT value FROM state WHERE key = 'seq') "
               "WHERE key = (SELECT min(key) FROM deleted)")  # fmt: skip
    try:
        for _ in range(2):  # and it stays reported
            with pytest.raises(CorruptFileError, match="not live"):
                reader.search("alpha", k=3)
    finally:
        reader.close(checkpoint=False)


def test_catch_up_of_an_old_chunk_relabelled_into_a_new_write_is_corrupt(pristine, tmp_path, emb, ce):
    # Was the chunk appended a second time to the fresh part (two live copies of one key).
    root, reader, applied = _reader_and_new_write(pristine, tmp_path, emb, ce)
    _sql(root, ("UPDATE chunks SET seq = ? WHERE key = (SELECT min(key) FROM chunks)", (applied + 1,)))
    try:
        with pytest.raises(CorruptFileError, match="below"):
            reader.search("alpha", k=3, rerank=False)
    finally:
        reader.close(checkpoint=False)


def test_catch_up_deletion_row_without_its_write_is_corrupt(pristine, tmp_path, emb, ce):
    # A live chunk "deleted" in the new write, its rows left in place: was a silently missing chunk.
    root, reader, _ = _reader_and_new_write(pristine, tmp_path, emb, ce)
    _sql(root, "INSERT INTO deleted(key, seq) SELECT min(key), (SELECT value FROM state WHERE key = 'seq') FROM chunks")
    try:
        with pytest.raises(CorruptFileError, match="counts"):
            reader.search("alpha", k=3)
    finally:
        reader.close(checkpoint=False)


@pytest.mark.parametrize(
    "edit, flt",
    [
        ("UPDATE fields SET value = 'x' WHERE name = 'year' AND doc_id = 'd0'", {"year": {"$gte": 2000}}),  # text > numbers
        ("UPDATE fields SET value = X'00' WHERE name = 'year' AND doc_id = 'd0'", {"year": {"$lt": 2000}}),
        ("UPDATE fields SET value = NULL WHERE name = 'year' AND doc_id = 'd0'", {"year": {"$ne": 2018}}),
        ("UPDATE fields SET value = 5 WHERE name = 'lang' AND doc_id = 'd0'", {"lang": {"$lt": "zz"}}),
        ("UPDATE fields SET value = 0.5 WHERE name = 'flag' AND doc_id = 'd0'", {"flag": True}),
        ("UPDATE fields SET value = 7 WHERE name = 'flag' AND doc_id = 'd0'", {"flag": {"$ne": False}}),
        ("UPDATE fields SET kind = 0 WHERE name = 'lang' AND doc_id = 'd0'", {"lang": None}),  # a null holding text
        ("UPDATE fields SET kind = 7 WHERE name = 'year' AND doc_id = 'd0'", {"year": {"$ne": 2018}}),
        ("UPDATE fields SET kind = 2.5 WHERE name = 'year' AND doc_id = 'd0'", {"year": 2018}),
        ("UPDATE fields SET kind = 'x' WHERE name = 'lang' AND doc_id = 'd0'", {"lang": {"$exists": False}}),
    ],
)
def test_fields_row_of_another_kind_is_corrupt_at_filtered_search(pristine, tmp_path, emb, ce, edit, flt):
    # Was silently accepted: the damaged row matched (or failed) conditions its kind never could.
    root = _copy(pristine, tmp_path)
    _unconstrained(root, "fields")
    _sql(root, edit, "CREATE INDEX fields_by_value ON fields(name, kind, value)")
    col = _open(root, emb, ce)
    try:
        with pytest.raises(CorruptFileError, match="metadata field"):
            col.search("alpha", k=3, filter=flt)
        assert col.search("alpha", k=3, filter={"score": {"$gte": 0}}).hits  # other fields still answer
    finally:
        col.close(checkpoint=False)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("value", [1e30, 3e38, -2e19])
def test_ip_l2_vectors_whose_scores_overflow_are_refused(tmp_path, emb, metric, value):
    # Were accepted: scores of 0, inf or NaN ranked silently (float32 dot products overflow).
    col = Collection.create(tmp_path / "c", embedder=emb, metric=metric)
    try:
        v = np.full((2, emb.dim), 0.1, dtype=np.float32)
        v[1, :3] = value
        with pytest.raises(ValueError, match=r"vectors .*row 1 has norm"):
            col.add(["a", "b"], ids=["a", "b"], vectors=v)
        assert len(col) == 0
        v[1, :3] = 1e17  # large, still finite in every score
        col.add(["a", "b"], ids=["a", "b"], vectors=v)
        assert col.checkpoint()
        assert all(math.isfinite(h.first_stage_score) for h in col.search("alpha", k=2, rerank=False).hits)
    finally:
        col.close(checkpoint=False)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_log_holding_a_vector_whose_scores_overflow_is_corrupt(tmp_path, emb, metric):
    col = Collection.create(tmp_path / "c", embedder=emb, metric=metric)
    col.add(["a", "b"], ids=["a", "b"], vectors=np.full((2, emb.dim), 0.5, dtype=np.float32))
    col.close(checkpoint=False)
    _sql(tmp_path / "c", ("UPDATE chunks SET vector = ? WHERE doc_id = 'b'", (np.full(emb.dim, 1e30, "<f4").tobytes(),)))
    with pytest.raises(CorruptFileError, match="norm"):
        Collection.open(tmp_path / "c", embedder=emb)


def test_tiny_cosine_vectors_normalize_without_overflow(tmp_path, emb):
    # Was inf / NaN after 1 / norm overflowed float32 (|x| ~ 1e-45): a NaN score, then every
    # checkpoint failed ("vector has a NaN or infinite value") and the fresh part never drained.
    col = Collection.create(tmp_path / "c", embedder=emb)
    try:
        v = np.zeros((2, emb.dim), dtype=np.float32)
        v[0, 0], v[1, :2] = 1e-45, 1e-40
        col.add(["a", "b"], ids=["x", "y"], vectors=v)
        prepared = col._fresh.prepare(v)
        assert prepared[0, 0] == pytest.approx(1.0) and np.linalg.norm(prepared[1]) == pytest.approx(1.0)
        assert all(math.isfinite(h.first_stage_score) for h in col.search("alpha", k=2, rerank=False).hits)
        assert col.checkpoint() and col._fresh.count == 0
    finally:
        col.close(checkpoint=False)
