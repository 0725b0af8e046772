"""atheris (libFuzzer for Python, coverage-guided) over the embedded Collection's loaders of
untrusted files: the manifest and the SQLite log, read as ``Collection.open`` and a catch-up read
them (no model is needed: the loaders validate before any model sees a byte).

Each input is cut into edits of one valid collection's files: byte overwrites of the manifest
(re-sealed with a valid checksum when the result still parses, so field checks are reached),
byte overwrites of the database, and a few SQL statements' worth of crafted values. Any
exception other than ``CorruptFileError`` is a finding (libFuzzer stops and writes the input).

    python tests/fuzz/fuzz_collection.py -runs=2000 [corpus dir ...]   (``make test-fuzz-py``)
"""

from __future__ import annotations

import atexit
import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["tailrank.collection", "tailrank._fileio"]):
    from tailrank._fileio import write_json_checked
    from tailrank.collection import _filters, _log
    from tailrank.collection._manifest import MANIFEST, read_manifest
    from tailrank.errors import CorruptFileError

DIM, VOCAB = 4, 50


def _pristine(root: Path) -> None:
    """A small valid collection's manifest and database (three documents, one deleted chunk)."""
    root.mkdir(parents=True)
    _log.create(root)
    db = _log.connect(root)
    rng = np.random.default_rng(0)
    metas = [{"year": 2018, "lang": "en", "flag": True}, {"year": 1999.5, "lang": "de"}, {"tags": [1], "none": None}]
    db.execute("BEGIN IMMEDIATE")
    docs = [(f"d{i}", f"text number {i} of the fuzz seed", json.dumps(m)) for i, m in enumerate(metas)]
    fields = [r for i, m in enumerate(metas) for r in _filters.field_rows(f"d{i}", m)]
    chunks = [(k, f"d{k // 2}", 0, 4 + k, 1 + k // 2, _log.vector_blob(rng.standard_normal(DIM).astype(np.float32)),
               _log.tokens_blob(rng.integers(0, VOCAB, 3 + k))) for k in range(6)]
    _log.insert_docs(db, docs, fields, chunks)
    db.execute("INSERT INTO deleted(key, seq) VALUES (6, 3)")
    _log.set_state(db, seq=3, next_key=7, chunks=6, checkpoint=1, checkpoint_next_key=2, pruned_to=0)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode = DELETE")  # every byte in meta.sqlite: the input edits all of it
    db.close()
    write_json_checked(root / MANIFEST, {
        "format": "tailrank.collection", "format_version": 2, "metric": "ip", "dim": DIM, "chunk_tokens": 6,
        "chunk_overlap": 1, "M": 16, "ef_construction": 200, "embedder": {"fingerprint": "e", "path": "/nowhere"},
        "reranker": {"fingerprint": "r", "path": "/nowhere"}, "fusion": None,
    })  # fmt: skip


# In memory where the system has it: the writes' fsyncs would set the pace otherwise.
WORK = Path(tempfile.mkdtemp(prefix="tailrank-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)  # libFuzzer ends the process itself
SEED = WORK / "seed"
_pristine(SEED)
MANIFEST_BYTES = (SEED / MANIFEST).read_bytes()
DB_BYTES = (SEED / _log.DB).read_bytes()
_SQL = [  # crafted values where the loaders read them (the value comes from the input)
    "UPDATE state SET value = ? WHERE key = 'seq'", "UPDATE state SET value = ? WHERE key = 'checkpoint'",
    "UPDATE state SET value = ? WHERE key = 'chunks'", "UPDATE state SET value = ? WHERE key = 'next_key'",
    "UPDATE chunks SET key = ? WHERE key = 3", "UPDATE chunks SET seq = ? WHERE key = 4",
    "UPDATE chunks SET vector = ? WHERE key = 5", "UPDATE chunks SET tokens = ? WHERE key = 2",
    "UPDATE chunks SET start = ? WHERE key = 2", "UPDATE deleted SET key = ?", "UPDATE deleted SET seq = ?",
    "UPDATE docs SET metadata = ? WHERE doc_id = 'd1'", "UPDATE docs SET text = ? WHERE doc_id = 'd0'",
    "UPDATE fields SET value = ? WHERE name = 'year'", "UPDATE fields SET kind = ? WHERE name = 'lang'",
    "UPDATE docs SET doc_id = ? WHERE doc_id = 'd2'",
]  # fmt: skip


def _value(fdp: atheris.FuzzedDataProvider) -> object:
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    if kind == 1:
        return fdp.ConsumeRegularFloat()
    if kind == 2:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    return None


def _overwrite(raw: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    b = bytearray(raw)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        at = fdp.ConsumeIntInRange(0, max(len(b) - 1, 0))
        junk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        b[at : at + len(junk)] = junk
    if fdp.ConsumeBool() and fdp.ConsumeBool():
        del b[fdp.ConsumeIntInRange(0, len(b)) :]
    return bytes(b)


def _load(root: Path) -> None:
    """What open and a catch-up read, in their order; the outcome is data or CorruptFileError."""
    try:
        m = read_manifest(root)
        dim, metric = int(m["dim"]), str(m["metric"])
    except CorruptFileError:
        dim, metric = DIM, "ip"
    db = _log.connect(root)
    try:
        _log.check_schema(db)
        st = _log.read_state(db)
        for after in (st["checkpoint"], 0, st["seq"] - 1 if st["seq"] else 0):
            delta = _log.read_delta(db, after, dim, True, VOCAB, metric=metric)
            assert delta.add_vectors.shape == (delta.add_keys.size, dim)
        _log.read_seq(db)
        with _log.damage_is_corrupt():
            _log.check_fields(db, [("year", (2,)), ("lang", (0, 3)), ("flag", (1,)), ("tags", ())])
            keys = _log.allowed_keys(db, "SELECT doc_id FROM fields WHERE name = ?", ["year"])
            _log.chunk_info(db, keys.tolist(), True)
            _log.get_docs(db, ["d0", "d1", "d2", 7])
    finally:
        db.close()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    root = WORK / "case"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    manifest = _overwrite(MANIFEST_BYTES, fdp)
    if fdp.ConsumeBool():  # a crafted manifest: edited, then re-sealed with a valid checksum
        try:
            doc = json.loads(manifest)
            if isinstance(doc, dict):
                doc.pop("sha256", None)
                write_json_checked(root / MANIFEST, doc)
                manifest = (root / MANIFEST).read_bytes()
        except (ValueError, TypeError, RecursionError):
            pass  # not JSON (or not writable as JSON): the bytes go as they are
    (root / MANIFEST).write_bytes(manifest)
    (root / _log.DB).write_bytes(_overwrite(DB_BYTES, fdp))
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        sql = _SQL[fdp.ConsumeIntInRange(0, len(_SQL) - 1)]
        try:
            db = sqlite3.connect(root / _log.DB, isolation_level=None)
            try:
                db.execute(sql, (_value(fdp),))
            finally:
                db.close()
        except (sqlite3.Error, OverflowError, UnicodeDecodeError):  # (SQLite's message may quote file bytes)
            pass  # the damaged file refuses the edit: it is loaded as it is
    try:
        _load(root)
    except CorruptFileError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
