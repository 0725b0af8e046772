"""Checkpoints: the HNSW index and the DocStore of one committed write, saved as files.

``index-<s>.bin`` and ``docstore-<s>.bin`` hold exactly the state after write ``s``. Only the
holder of ``.checkpoint.lock`` creates or removes these files, and it removes a file only after
the database points past it, keeping the newest two: a reader that read the pointer and then
lost the race to an unlink sees ``FileNotFoundError`` and reads the pointer again; a reader that
already opened a file keeps reading it (POSIX unlink semantics).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from .._fileio import fsync_dir
from ..docstore import DocStore
from ..errors import CorruptFileError
from ..index import VectorIndex
from . import _log

LOCK = ".checkpoint.lock"
_FILE_RE = re.compile(r"^(index|docstore)-(\d+)\.bin$")
_TEMP_RE = re.compile(r"^(index|docstore)-\d+\.bin\..+$")  # an unfinished save (temp, then rename)
_LOAD_TRIES = 50


def index_path(root: Path, seq: int) -> Path:
    return root / f"index-{seq}.bin"


def store_path(root: Path, seq: int) -> Path:
    return root / f"docstore-{seq}.bin"


def save(root: Path, seq: int, index: VectorIndex, store: DocStore | None) -> None:
    """Writes the files of write ``seq`` (each atomic); the caller holds the checkpoint lock and
    keeps the objects unchanged meanwhile."""
    index.save(index_path(root, seq))
    if store is not None:
        store.save(store_path(root, seq))
    fsync_dir(root)


def publish(db: sqlite3.Connection, seq: int, next_key: int) -> set[int] | None:
    """Points the database at checkpoint ``seq`` and forgets deletions that the previous
    checkpoint already covers. Returns the checkpoints to keep, or None if a newer one exists."""
    db.execute("BEGIN IMMEDIATE")
    try:
        st = _log.read_state(db)
        prev = st["checkpoint"]
        if prev >= seq:
            db.execute("ROLLBACK")
            return None
        # A reader of checkpoint `prev` replays deletions after it: those stay.
        db.execute("DELETE FROM deleted WHERE seq <= ?", (prev,))
        _log.set_state(db, checkpoint=seq, checkpoint_next_key=next_key, pruned_to=prev)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return {seq, prev}


def remove_unreferenced(root: Path, keep: set[int]) -> None:
    """Removes checkpoint files other than ``keep`` and unfinished saves (checkpoint lock held)."""
    for p in root.iterdir():
        m = _FILE_RE.match(p.name)
        if (m and int(m.group(2)) not in keep) or _TEMP_RE.match(p.name):
            p.unlink(missing_ok=True)


def _check_loaded(root: Path, seq: int, index: VectorIndex, store: DocStore | None, dim: int, metric: str, reranker: Any) -> None:
    """A checkpoint that loaded whole still has to be this collection's (the one validator of
    checkpoints beyond the files' own checks): a file from another collection or model is damage."""
    if index.dim != dim or index.metric != metric:
        raise CorruptFileError(f"{index_path(root, seq)} holds a {index.dim}-d {index.metric} index; the collection is {dim}-d {metric}")
    if store is not None and reranker is not None and store.vocab_size != reranker.vocab_size:
        raise CorruptFileError(
            f"{store_path(root, seq)} has a vocabulary of {store.vocab_size}; the reranker's is {reranker.vocab_size}"
        )


def load_latest(
    root: Path, db: sqlite3.Connection, with_store: bool, dim: int, metric: str, reranker: Any = None
) -> tuple[VectorIndex, DocStore | None, int, int]:
    """Loads the checkpoint the database points at: ``(index, store, seq, next_key)``.

    The caller then replays the log after ``seq``; it must check that ``pruned_to <= seq`` in
    the snapshot it replays from (else a newer checkpoint replaced this one: load again).
    """
    last: Exception | None = None
    for _ in range(_LOAD_TRIES):
        st = _log.read_state(db)
        seq = st["checkpoint"]
        try:
            index = VectorIndex.load(index_path(root, seq))
            store = DocStore.load(store_path(root, seq)) if with_store else None
        except FileNotFoundError as e:  # replaced by a newer checkpoint meanwhile
            last = e
            continue
        _check_loaded(root, seq, index, store, dim, metric, reranker)
        return index, store, seq, st["checkpoint_next_key"]
    raise CorruptFileError(f"the checkpoint files of the collection at {root} are missing: {last}")
