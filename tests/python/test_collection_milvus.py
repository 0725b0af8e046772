"""What only the Milvus backend has: its URIs, a server that goes down, writes that half fail,
a damaged or foreign manifest, the token cap. (The behaviour both backends share is tested,
parametrized, in test_collection.py and test_collection_filters.py.)"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

import models
from collection_fixtures import ce, ce_dir, emb, emb_dir  # noqa: F401  (pytest fixtures)
from milvus_fixtures import MilvusProcess, milvus_uri

from tailrank.collection import Collection, _location
from tailrank.collection._milvus import SIDE_SUFFIX, MilvusCollection, chunk_pk, doc_key
from tailrank.errors import BackendError, CorruptFileError, StoreURIError


@pytest.mark.parametrize("bad", [
    "s3://bucket/col", "http://127.0.0.1:19530/docs", "milvus+grpc://h:1/x", "milvus://127.0.0.1/docs",
    "milvus://:19530/docs", "milvus://h:19530", "milvus://h:19530/", "milvus://h:19530/9starts_with_digit",
    "milvus://h:19530/has-dash", "milvus://h:19530/a/b", "milvus://h:99999/x", "milvus://h:port/x",
    "milvus://h:1/x?nope=1", "milvus://h:1/x?timeout=0", "milvus://h:1/x?timeout=abc", "milvus://h:1/x?consistency=Weak",
    "milvus://h:1/x#frag", "milvus:/h:1/x", "milvus:relative", Path("milvus://h:1/x"),
])
def test_a_uri_is_never_taken_for_a_folder(bad, tmp_path, monkeypatch, emb):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreURIError):
        Collection.create(bad, embedder=emb)
    with pytest.raises(StoreURIError):
        Collection.open(bad)
    assert list(tmp_path.iterdir()) == []  # no folder named "milvus:" or "s3:"


def test_uri_options_token_and_what_messages_show(monkeypatch):
    u = _location.parse("milvus+https://user:p%40ss@db.example.com:443/docs?db=prod&timeout=2.5&consistency=Session")
    assert isinstance(u, _location.MilvusURI)
    assert (u.endpoint, u.name, u.db, u.timeout, u.consistency, u.token) == (
        "https://db.example.com:443", "docs", "prod", 2.5, "Session", "user:p@ss")
    assert "p@ss" not in str(u) and "p@ss" not in repr(u) and str(u) == "milvus+https://db.example.com:443/docs"
    monkeypatch.setenv(_location.TOKEN_ENV, "api-key")
    v = _location.parse("milvus://10.0.0.1:19530/c_1")
    assert isinstance(v, _location.MilvusURI) and v.token == "api-key" and v.client_kwargs()["token"] == "api-key"
    assert _location.parse("plain/folder") == Path("plain/folder")
    with pytest.raises(StoreURIError) as e:
        _location.parse("milvus://u:secret@h/x")  # no port
    assert "secret" not in str(e.value)


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [models.sample_text(rng, rng.randint(3, 30)) for _ in range(n)]


class FlakyUpserts:
    """The real client, but ``upsert`` raises on the calls listed in ``fail`` (numbered from 0)."""

    def __init__(self, inner, fail):
        self.inner, self.fail, self.calls = inner, set(fail), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upsert(self, *args, **kwargs):
        i, self.calls = self.calls, self.calls + 1
        if i in self.fail:
            from pymilvus.exceptions import MilvusException

            raise MilvusException(message=f"injected failure of upsert call {i}")
        return self.inner.upsert(*args, **kwargs)


def test_a_half_failed_batch_write_is_retried_or_reported_never_silently_partial(milvus_server, emb, ce):
    col = Collection.create(milvus_uri(milvus_server, "flaky"), embedder=emb, reranker=ce)
    assert isinstance(col, MilvusCollection)
    col.write_batch_rows = 3  # 9 documents of one chunk each: three batches
    col._sleep = lambda s: None  # the backoff, injected
    texts, ids = _docs(9), [f"x{i}" for i in range(9)]
    real = col._conn

    col._conn = FlakyUpserts(real, fail={1})  # the second batch fails once: retried, whole
    assert col.add(texts, ids=ids) == ids
    assert col._conn.calls == 4 and len(col) == 9
    col.delete(ids)

    col._conn = FlakyUpserts(real, fail={1, 2, 3})  # the second batch fails every attempt: reported
    with pytest.raises(BackendError, match=r"3 of 9 documents were stored.*'x3' is not.*repeat it with upsert") as e:
        col.add(texts, ids=ids)
    assert "flaky" in str(e.value)  # the URI
    assert len(col) == 3 and set(col._existing(ids)) == {"x0", "x1", "x2"}  # exactly what the error says
    col._conn = real
    col.upsert(texts, ids=ids)  # repeating the write completes it (upserts by pk are idempotent)
    assert len(col) == 9 and col.chunk_count == 9
    assert [d["text"] for d in col.get(ids)] == texts


def test_open_refuses_a_damaged_or_foreign_manifest(milvus_server, emb):
    uri = milvus_uri(milvus_server, "damaged")
    col = Collection.create(uri, embedder=emb)
    assert isinstance(col, MilvusCollection)
    side = col.uri.name + SIDE_SUFFIX
    good = col._client.query(side, filter="pk == 0", output_fields=["manifest"])[0]["manifest"]
    for bad in ["{not json", json.dumps({"format": "other"}), json.dumps({**json.loads(good), "dim": "384"}),
                json.dumps({**json.loads(good), "embedder": None}), json.dumps([1, 2])]:
        col._client.upsert(side, [{"pk": 0, "v": [0.0, 0.0], "manifest": bad}])
        with pytest.raises(CorruptFileError):
            Collection.open(uri, embedder=emb)
    col._client.delete(side, filter="pk == 0")
    with pytest.raises(CorruptFileError, match="missing"):
        Collection.open(uri, embedder=emb)
    col._client.drop_collection(side)  # a Milvus collection tailrank did not make (or no longer owns)
    with pytest.raises(FileNotFoundError, match="did not create"):
        Collection.open(uri, embedder=emb)
    assert not Collection.exists(uri) and not Collection.exists(milvus_uri(milvus_server, "never"))


def test_tokens_are_stored_cut_to_the_pair_cap_and_hits_say_truncated(milvus_server, tmp_path, emb, ce):
    col = Collection.create(milvus_uri(milvus_server, "cap"), embedder=emb, reranker=ce)
    ref = Collection.create(tmp_path / "ref", embedder=emb, reranker=ce)
    assert isinstance(col, MilvusCollection) and col.token_cap == min(ce._doc_cap, 4096)
    long_text = " ".join(_docs(40, 3))
    texts = [long_text, "short one"]
    for c in (col, ref):
        c.add(texts, ids=["long", "short"])
    row = col._client.query(col.uri.name, filter=f"pk == {chunk_pk(doc_key('long'), 0)}", output_fields=["tok", "cut"])
    assert len(row[0]["tok"]) == col.token_cap < len(ce.tokenize([long_text])[0]) and row[0]["cut"] is False
    got, want = col.search("long text", k=2), ref.search("long text", k=2)
    assert got.ids() == want.ids()
    assert [h.truncated for h in got.hits] == [h.truncated for h in want.hits]
    assert {h.id: h.truncated for h in got.hits} == {"long": True, "short": False}
    assert np.allclose([h.score for h in got.hits], [h.score for h in want.hits], atol=1e-5)


def test_a_server_that_goes_down_is_a_backend_error_and_a_503(tmp_path, emb, ce):
    """A second, short-lived server, stopped under a live collection."""
    from fastapi.testclient import TestClient

    from tailrank.serve import create_app

    server = MilvusProcess(tmp_path)
    try:
        server.wait_ready()
        uri = f"{server.uri_base}/down?timeout=3"
        col = Collection.create(uri, embedder=emb, reranker=ce)
        col.add(_docs(5), ids=list(range(5)))
        assert len(col.search("cell", k=3).hits) == 3
        app = create_app(col.reranker, collection=col)
        with TestClient(app) as c:
            assert app.state.tailrank.wait_ready(60)
            assert c.post("/search", json={"query": "cell", "k": 3}).status_code == 200
            server.stop()
            r = c.post("/search", json={"query": "cell", "k": 3})
            assert r.status_code == 503 and r.json()["error_type"] == "backend_unavailable"
            assert server.uri_base.removeprefix("milvus://") in r.json()["detail"]
        for call in (lambda: col.search("cell"), lambda: col.add(["x"]), lambda: len(col), lambda: col.get([1]),
                     lambda: Collection.open(uri, embedder=emb, reranker=ce)):
            with pytest.raises(BackendError, match="Milvus at milvus://127.0.0.1"):
                call()
    finally:
        server.stop()


def test_serve_opens_a_milvus_uri_with_its_recorded_embedder(milvus_server, emb, ce, ce_dir):
    """`tailrank serve --collection milvus://...`: the app opens the URI itself (the embedder from
    the manifest in Milvus, the reranker the served model) and searches it."""
    from fastapi.testclient import TestClient

    from tailrank.serve import create_app

    uri = milvus_uri(milvus_server, "served")
    col = Collection.create(uri, embedder=emb, reranker=ce)
    texts = _docs(12, 7)
    col.add(texts, ids=[f"s{i}" for i in range(12)], metadata=[{"even": i % 2 == 0} for i in range(12)])
    want = col.search(texts[3][:30], k=3, filter={"even": False})
    app = create_app(ce_dir, collection=uri)
    with TestClient(app) as c:
        assert app.state.tailrank.wait_ready(60)
        r = c.post("/search", json={"query": texts[3][:30], "k": 3, "filter": {"even": False}})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["hits"]] == want.ids()
        bad = c.post("/search", json={"query": "x", "filter": {"even": {"$gt": 2**60}}})
        assert bad.status_code == 422 and "2**53" in bad.text


def _listening(proc_net: list[Path]) -> dict[int, str]:
    """inode -> "address:port" of every listening TCP socket in this network namespace."""
    out = {}
    for f in proc_net:
        for line in f.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = cols[1].split(":")
            if len(addr) == 8:
                ip = ".".join(str(b) for b in bytes.fromhex(addr)[::-1])
            else:
                ip = "::1" if addr == "00000000000000000000000001000000" else ("::" if set(addr) == {"0"} else addr)
            out[int(cols[9])] = f"{ip}:{int(port, 16)}"
    return out


def _group_sockets(pgid: int) -> set[int]:
    inodes = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for fd in (d / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except (OSError, ValueError, IndexError):
            continue  # a process that just exited
    return inodes


def test_the_test_server_listens_on_localhost_only(milvus_server):
    """Of everything the server's process group listens on, only 127.0.0.1:PORT is reachable from
    this machine's network (the engine itself binds every interface, inside its own namespace)."""
    if not milvus_server.isolated:  # a machine without unprivileged namespaces: said in the log, and here
        assert milvus_server.refusal and "not isolated" in (milvus_server.root / "milvus-server.log").read_text()
        return
    here = _listening([Path("/proc/net/tcp"), Path("/proc/net/tcp6")])
    mine = {ino: addr for ino, addr in here.items() if ino in _group_sockets(milvus_server.proc.pid)}
    assert list(mine.values()) == [f"127.0.0.1:{milvus_server.port}"]
    inner = Path(f"/proc/{milvus_server.proc.pid}/task")  # the relay; the engine is its child
    assert inner.exists() and os.readlink(f"/proc/{milvus_server.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
