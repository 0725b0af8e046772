"""The Collection's store: writes as a log plus checkpoints, crash safety across processes
(kill -9 torture), consistent searches under concurrent writes, other processes' writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import models

from tailrank import CrossEncoder, Embedder
from tailrank.collection import Collection
from tailrank.errors import ConcurrentUseError

SAFETY_S = 120.0  # a safety limit on waits for other processes, never a measured bound


from collection_fixtures import ce, ce_dir, emb, emb_dir  # noqa: E402,F401  (pytest fixtures)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


# A deterministic history of writes: op i depends only on i and the state after ops 0..i-1,
# so the state after n committed writes is known exactly (the writer's seq counts its writes).
MODEL = textwrap.dedent(
    """
    import random
    import numpy as np
    WORDS = "cell gene protein binding tumor risk study blood brain liver".split()

    def op(i, live):
        r = random.Random(i)
        kind = "add" if len(live) < 8 or r.random() < 0.45 else r.choice(["upsert", "delete"])
        if kind == "add":
            ids = [f"d{i}-{j}" for j in range(r.randint(1, 4))]
        elif kind == "upsert":
            ids = r.sample(live, min(len(live), r.randint(1, 3))) + ([f"u{i}"] if r.random() < 0.3 else [])
        else:
            ids = r.sample(live, min(len(live), r.randint(1, 2)))
        texts = [f"{x} v{i} " + " ".join(r.choice(WORDS) for _ in range(r.randint(1, 12))) for x in ids]
        metas = [{"v": i, "g": r.randint(0, 3)} for _ in ids]
        return kind, ids, texts, metas

    def step(state, i):
        kind, ids, texts, metas = op(i, sorted(state))
        if kind == "delete":
            for x in ids:
                del state[x]
        else:
            for x, t, m in zip(ids, texts, metas):
                state[x] = (t, m)
        return kind, ids, texts, metas

    def simulate(n):
        state = {}
        for i in range(n):
            step(state, i)
        return state

    def vectors(i, n, dim):
        return np.random.default_rng([i, 7]).standard_normal((n, dim)).astype(np.float32)
    """
)

WRITER = MODEL + textwrap.dedent(
    """
    import sys, time
    from tailrank.collection import Collection, _checkpoints
    path, slow = sys.argv[1], sys.argv[2] == "slow"
    col = Collection.open(path, threads=1)
    col.checkpoint_min_chunks, col.checkpoint_fraction, col.fresh_index_at = 6, 0.0, 5
    save = _checkpoints.save

    def announced_save(root, seq, index, store):
        # The checkpoint window made wide enough for a kill to land in it (index saved, store not).
        print("ckpt", flush=True)
        index.save(_checkpoints.index_path(root, seq))
        if slow:
            time.sleep(0.03)
        if store is not None:
            store.save(_checkpoints.store_path(root, seq))

    _checkpoints.save = announced_save
    i = col._applied
    state = simulate(i)
    print(i, flush=True)  # what this open found durable: acknowledged even if killed before a write
    while True:
        kind, ids, texts, metas = step(state, i)
        if kind == "delete":
            col.delete(ids)
        else:
            getattr(col, kind)(texts, ids=ids, metadata=metas, vectors=vectors(i, len(ids), col.dim))
        i += 1
        assert col._applied == i, (col._applied, i)
        print(i, flush=True)
        if i % 9 == 0:
            col.checkpoint()
    """
)

READER = textwrap.dedent(
    """
    import os, sys
    from tailrank.collection import Collection
    path, stop = sys.argv[1], sys.argv[2]
    col = Collection.open(path, threads=1)
    n = 0
    words = "cell gene protein binding tumor risk study blood brain liver".split()
    while not os.path.exists(stop):
        for kw in ({}, {"deadline_ms": 60000}, {"filter": {"g": n % 4}}, {"rerank": False},
                   {"filter": {"v": {"$gte": n % 50}}, "rerank": False}):
            res = col.search(words[n % len(words)], k=6, candidates=12, **kw)
            for h in res.hits:
                assert h.text.startswith(f"{h.id} v{h.metadata['v']} "), h
        n += 1
    print(n, flush=True)
    """
)


class Lines:
    """A child's stdout, read by a thread; waits are on events (with a safety limit)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self.cond:
                self.lines.append(line.strip())
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def wait_for(self, pred) -> str:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(pred(x) for x in self.lines) or "<eof>" in self.lines, SAFETY_S)
        assert ok, "the child said nothing within the safety limit"
        return next((x for x in self.lines if pred(x)), "<eof>")

    def acked(self) -> int:
        with self.cond:
            return max([int(x) for x in self.lines if x.isdigit()], default=0)


def _reap(proc: subprocess.Popen, lines: Lines) -> str:
    """Kills a child (if still running), waits for it and closes its pipes; returns its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(SAFETY_S)
    lines.thread.join(SAFETY_S)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return err


def _model() -> dict:
    ns: dict = {}
    exec(MODEL, ns)  # noqa: S102 - the same source the child processes run
    return ns


def _check_state(col: Collection, want: dict) -> None:
    with col._snapshot() as db:
        rows = {d: (t, __import__("json").loads(m)) for d, t, m in db.execute("SELECT doc_id, text, metadata FROM docs")}
    assert rows == want
    assert col.chunk_count == len(want) == len(col._index) + col._fresh.live
    assert col._store is not None and len(col._store) == len(want)


@pytest.mark.slow
def test_kill_9_torture_with_a_reader_searching_throughout(tmp_path, emb_dir, ce_dir):
    """A writer killed with SIGKILL 22 times (half of them inside a checkpoint) while another
    process searches: every open agrees with itself and holds exactly the state after the
    writes it reports, which include every acknowledged one; the reader never fails."""
    path = tmp_path / "col"
    Collection.create(path, embedder=emb_dir, reranker=ce_dir).close()
    (tmp_path / "writer.py").write_text(WRITER)
    (tmp_path / "reader.py").write_text(READER)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, str(tmp_path / "reader.py"), str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    model = _model()
    rng = random.Random(0)
    kills = in_checkpoint = 0
    try:
        for trial in range(22):
            w = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(path), "slow"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
            lines = Lines(w)
            if trial % 2:
                got = lines.wait_for(lambda x: x == "ckpt")
                time.sleep(rng.uniform(0.0, 0.03))
            else:
                got = lines.wait_for(str.isdigit)
                time.sleep(rng.uniform(0.0, 0.4))
            assert got != "<eof>", _reap(w, lines)
            err = _reap(w, lines)
            kills += w.returncode == -signal.SIGKILL
            assert w.returncode == -signal.SIGKILL, err
            in_checkpoint += bool(trial % 2) and lines.lines[-2:-1] == ["ckpt"]
            acked = lines.acked()
            col = Collection.open(path, threads=1)  # checks index, DocStore and database agree
            seq = col._applied
            assert acked <= seq <= acked + 1, (trial, acked, seq)  # nothing acknowledged is lost
            _check_state(col, model["simulate"](seq))
            col.close(checkpoint=False)
            assert reader.poll() is None, reader.stderr.read()
    finally:
        stop.write_text("")
        out, err = reader.communicate(timeout=SAFETY_S)
    assert reader.returncode == 0, err
    assert int(out.split()[-1]) > 0
    assert kills >= 20 and in_checkpoint >= 1, (kills, in_checkpoint)
    assert not [p.name for p in path.iterdir() if ".tmp" in p.name]  # the last open cleaned up


@pytest.mark.slow
def test_open_and_server_start_racing_commits_lose_nothing(tmp_path, emb_dir, ce_dir):
    from fastapi.testclient import TestClient

    from tailrank.serve import create_app

    path = tmp_path / "col"
    Collection.create(path, embedder=emb_dir, reranker=ce_dir).close()
    (tmp_path / "writer.py").write_text(WRITER)
    w = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(path), "fast"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines = Lines(w)
    model = _model()
    try:
        assert lines.wait_for(str.isdigit) != "<eof>"
        for _ in range(12):
            acked = lines.acked()
            col = Collection.open(path, threads=1)
            seq = col._applied
            assert seq >= acked
            assert col.chunk_count == len(model["simulate"](seq)) == len(col._index) + col._fresh.live
            col.close(checkpoint=False)
        acked = lines.acked()
        app = create_app(str(Path(ce_dir)), collection=str(path))
        with TestClient(app) as c:
            assert app.state.tailrank.wait_ready(60)  # /search is admitted like /rerank: 503 until calibrated
            served = app.state.tailrank.collection
            assert served._applied >= acked
            assert served.chunk_count == len(model["simulate"](served._applied))
            r = c.post("/search", json={"query": "cell gene", "k": 5, "candidates": 12})
            assert r.status_code == 200, r.text
            assert all(h["text"].startswith(f"{h['id']} v") for h in r.json()["hits"])
    finally:
        err = _reap(w, lines)
    assert w.returncode == -signal.SIGKILL, err  # it was still committing at the end
    assert lines.acked() > 12  # the writer kept committing meanwhile


def test_another_process_sees_a_write_on_its_next_search_and_after_refresh(tmp_path, emb, ce):
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(["first doc"], ids=["p0"], metadata=[{"tag": "p0"}])
    script = tmp_path / "peer.py"
    script.write_text(textwrap.dedent(
        """
        import sys
        from tailrank.collection import Collection
        col = Collection.open(sys.argv[1], threads=1)
        print("ready", flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "search":
                res = col.search("doc", k=10, rerank=False, filter={"tag": arg})
                print("hits", ",".join(str(h.id) for h in res.hits), flush=True)
            elif cmd == "count":
                print("count", col.chunk_count, flush=True)
            elif cmd == "refresh":
                print("refresh", col.refresh(), flush=True)
        """
    ))
    peer = subprocess.Popen([sys.executable, str(script), str(col.path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())

    def ask(cmd: str) -> str:
        peer.stdin.write(cmd + "\n")
        peer.stdin.flush()
        return peer.stdout.readline().strip()

    try:
        assert peer.stdout.readline().strip() == "ready", peer.stderr.read()
        assert ask("search p0") == "hits p0"
        col.add(["second doc"], ids=["p1"], metadata=[{"tag": "p1"}])
        assert ask("search p1") == "hits p1"  # the documented bound: its next search
        col.upsert(["third doc"], ids=["p2"], metadata=[{"tag": "p2"}])
        col.delete(["p0"])
        assert ask("count") == "count 2"  # nothing applied between searches ...
        assert ask("refresh") == "refresh True"  # ... until refresh()
        assert ask("count") == "count 2" and ask("search p2") == "hits p2" and ask("search p0") == "hits"
        assert ask("refresh") == "refresh False"
    finally:
        _, err = peer.communicate(input="", timeout=SAFETY_S)
    assert peer.returncode == 0, err


def test_searches_during_upserts_and_deletes_see_one_state(tmp_path, emb, ce):
    """Documents come in pairs written together: a search that returns both halves of a pair
    must show one version of it; a deleted pair is never returned by a later search."""
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.fresh_index_at, col.checkpoint_min_chunks, col.checkpoint_fraction = 6, 10, 0.0
    rng = random.Random(3)
    pairs = 12

    def write(g: int, ver: int, op: str = "upsert") -> None:
        ids = [f"g{g}a", f"g{g}b"]
        texts = [f"{x} v{ver} " + models.sample_text(rng, 8) for x in ids]
        getattr(col, op)(texts, ids=ids, metadata=[{"v": ver, "g": g}] * 2)

    for g in range(pairs):
        write(g, 0)
    errors: list[BaseException] = []
    stop = threading.Event()
    counts = [0]

    def reader(n: int) -> None:
        kws = [{}, {"deadline_ms": 60_000}, {"rerank": False}, {"filter": {"g": {"$lt": 6}}}]
        try:
            while not stop.is_set():
                res = col.search("cell protein", k=2 * pairs, candidates=2 * pairs, **kws[n % len(kws)])
                seen: dict[int, set[int]] = {}
                for h in res.hits:
                    assert h.text.startswith(f"{h.id} v{h.metadata['v']} "), h
                    seen.setdefault(h.metadata["g"], set()).add(h.metadata["v"])
                assert all(len(v) == 1 for v in seen.values()), seen
                counts[0] += 1
                n += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for ver in range(1, 150):
            if errors:
                break
            g = ver % pairs
            if ver % 4 == 0:
                col.delete([f"g{g}a", f"g{g}b"])
                for kw in ({"rerank": False}, {}, {"deadline_ms": 60_000}):
                    res = col.search("cell", k=2 * pairs, candidates=2 * pairs, filter={"g": g}, **kw)
                    assert res.hits == [], (ver, kw)
                    res = col.search("cell", k=2 * pairs, candidates=2 * pairs, **kw)
                    assert not any(h.metadata["g"] == g for h in res.hits)
                write(g, ver, "add")
            else:
                write(g, ver)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert counts[0] > 0 and len(col) == 2 * pairs


def test_first_stage_is_exact_over_graph_and_fresh_parts_and_survives_reopen(tmp_path, emb):
    col = Collection.create(tmp_path / "col", embedder=emb)
    col.fresh_index_at = 10**9  # only checkpoint() moves chunks into the graph here
    rng = np.random.default_rng(1)
    vecs: dict[str, np.ndarray] = {}

    def add(ids: list[str], op: str = "add") -> None:
        v = rng.standard_normal((len(ids), col.dim)).astype(np.float32)
        getattr(col, op)([f"t {x}" for x in ids], ids=ids, vectors=v)
        vecs.update(zip(ids, v))

    def check(c: Collection) -> None:
        q = "gene cell"
        qv = c.embedder.encode([q])[0]
        ids = sorted(vecs)
        m = np.stack([vecs[i] for i in ids])
        sims = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ (qv / np.linalg.norm(qv))
        want = [ids[i] for i in np.argsort(-sims, kind="stable")]
        res = c.search(q, k=len(ids), candidates=len(ids), rerank=False)
        assert res.ids() == want
        assert [h.first_stage_score for h in res.hits] == pytest.approx(sorted(sims, reverse=True), abs=1e-5)

    add([f"a{i}" for i in range(20)])
    assert col.checkpoint() and col._fresh.count == 0 and len(col._index) == 20
    add([f"b{i}" for i in range(15)])
    assert col._fresh.live == 15
    check(col)
    col.delete(["a3", "b4"])  # one from the graph, one fresh
    del vecs["a3"], vecs["b4"]
    add(["a5", "b6", "c0"], "upsert")
    check(col)
    again = Collection.open(col.path, embedder=emb)  # replays the fresh part from the log
    assert again._fresh.live == 16 and len(again._index) == 18
    check(again)
    assert col.checkpoint() and col._fresh.count == 0
    check(col)
    check(Collection.open(col.path, embedder=emb))


def test_an_interrupt_after_the_commit_keeps_the_write_and_the_files(tmp_path, emb, ce):
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(["one doc", "two doc"], ids=["x", "y"])
    col.checkpoint()
    files = sorted(p.name for p in col.path.glob("*.bin"))
    real = col._drop

    def interrupted(keys):
        raise KeyboardInterrupt

    col._drop = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        col.upsert(["ONE"], ids=["x"])
    col._drop = real  # type: ignore[method-assign]
    assert sorted(p.name for p in col.path.glob("*.bin")) == files
    assert col.get(["x"])[0]["text"] == "ONE"
    assert [h.text for h in col.search("ONE", k=5).hits if h.id == "x"] == ["ONE"]  # reloaded state
    assert col.chunk_count == 2
    again = Collection.open(col.path, embedder=emb, reranker=ce)
    assert again.get(["x"])[0]["text"] == "ONE" and again.chunk_count == 2


def test_a_second_writing_process_is_told_and_changes_nothing(tmp_path, emb, ce):
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(["a"], ids=["a"])
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(
        """
        import fcntl, os, sys
        fd = os.open(os.path.join(sys.argv[1], ".writer.lock"), os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
        """
    ))
    holder = subprocess.Popen([sys.executable, str(script), str(col.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConcurrentUseError):
            col.add(["b"], ids=["b"])
    finally:
        holder.communicate(input="", timeout=SAFETY_S)
    assert "b" not in col and col.chunk_count == 1
    col.add(["b"], ids=["b"])
    assert col.chunk_count == 2


def _open_fds() -> int:
    import gc

    gc.collect()  # objects of earlier tests close their files when collected: not counted here
    return len(os.listdir("/proc/self/fd"))


def test_close_closes_every_connection_and_later_calls_raise_closed_error(tmp_path, emb, ce):
    from tailrank.errors import ClosedError

    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(["one doc", "two doc"], ids=["a", "b"], metadata=[{"g": 1}, {"g": 2}])
    col.close()
    before = _open_fds()
    for _ in range(5):  # open, search from two threads, write, close: nothing stays open
        c = Collection.open(col.path, embedder=emb, reranker=ce)
        t = threading.Thread(target=lambda: c.search("doc", k=2, filter={"g": 1}))
        t.start()
        t.join()
        c.upsert(["three doc"], ids=["c"])
        c.search("doc", k=2)
        c.close()
        c.close()  # a second close does nothing
    assert _open_fds() == before  # (was 2 more per cycle: the writer's connection and its WAL)
    calls = [
        lambda: c.search("doc"), lambda: c.search_batch(["doc"]), lambda: c.plan_search("doc"), lambda: c.get(["a"]),
        lambda: c.add(["x"], ids=["x"]), lambda: c.upsert(["x"], ids=["x"]), lambda: c.delete(["a"]), lambda: len(c),
        lambda: "a" in c, lambda: c.chunk_count, lambda: c.refresh(), lambda: c.checkpoint(),
        lambda: c.set_default_fusion("rrf"),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(ClosedError, match="closed"):
            call()
    assert c.closed and "closed" in repr(c)
    assert _open_fds() == before  # none of them reopened the database
    again = Collection.open(col.path, embedder=emb, reranker=ce)
    assert len(again) == 3 and again.get(["c"])[0]["text"] == "three doc"  # the writes of closed objects stayed
    again.close()


def test_a_failed_open_keeps_no_file_open(tmp_path, emb, ce):
    from tailrank.errors import CorruptFileError

    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(["one doc"], ids=["a"])
    col.close()
    for p in col.path.glob("index-*.bin"):
        p.write_bytes(b"damaged")
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(CorruptFileError):
            Collection.open(col.path, embedder=emb, reranker=ce)
    assert _open_fds() == before


def test_close_waits_for_a_search_in_flight(tmp_path, emb, ce):
    """close() from another thread while a search is inside its first stage: the search
    finishes on an open database, then the connections close (no 'closed database' error)."""
    from tailrank.errors import ClosedError

    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(["one doc", "two doc"], ids=["a", "b"])
    inside, release = threading.Event(), threading.Event()
    real = col._texts

    def slow_texts(*args, **kwargs):
        inside.set()
        assert release.wait(SAFETY_S)
        return real(*args, **kwargs)

    col._texts = slow_texts  # type: ignore[method-assign]
    out: list = []
    t = threading.Thread(target=lambda: out.append(col.search("doc", k=2, rerank=False)))
    t.start()
    assert inside.wait(SAFETY_S)
    waiting = threading.Event()
    cond_wait = col._users_cond.wait_for

    def wait_for(pred, timeout=None):
        waiting.set()  # close() has begun waiting for the uses in flight
        return cond_wait(pred, timeout)

    col._users_cond.wait_for = wait_for  # type: ignore[method-assign]
    closer = threading.Thread(target=col.close, kwargs={"checkpoint": False})
    closer.start()
    assert waiting.wait(SAFETY_S) and col.closed and closer.is_alive()
    with pytest.raises(ClosedError):
        col.get(["a"])  # no new use once close began
    release.set()
    t.join(SAFETY_S)
    closer.join(SAFETY_S)
    assert not closer.is_alive() and [h.id for h in out[0].hits] and len(out[0].hits) == 2
