"""Collection: ingest -> embed -> HNSW -> rerank, filters, deadlines, persistence, crash safety."""

from __future__ import annotations

import json
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

from tailrank import CrossEncoder, Embedder  # noqa: E402
from tailrank.collection import Collection  # noqa: E402
from tailrank.errors import (  # noqa: E402
    CorruptFileError,
    DuplicateIdError,
    FilterError,
    ModelMismatchError,
    UnknownIdError,
)

N_DOCS = 60


from collection_fixtures import backend, ce, ce_dir, emb, emb_dir, where  # noqa: E402,F401  (pytest fixtures)


def _docs(seed: int = 0, n: int = N_DOCS) -> tuple[list[str], list[str], list[dict]]:
    rng = random.Random(seed)
    texts = [models.sample_text(rng, rng.randint(3, 60)) for _ in range(n)]
    ids = [f"d{i}" for i in range(n)]
    metas = [{"lang": ["en", "de", "fr"][i % 3], "year": 2018 + i % 5, "flag": i % 2 == 0} for i in range(n)]
    return texts, ids, metas


@pytest.fixture()
def filled(where, emb, ce):
    """60 documents on either backend (the tests taking it run against both)."""
    col = Collection.create(where("col"), embedder=emb, reranker=ce)
    texts, ids, metas = _docs()
    assert col.add(texts, ids=ids, metadata=metas) == ids
    return col, texts, ids, metas


def _state(col: Collection) -> tuple:
    return len(col), col.chunk_count, col.search("alpha beta", k=5, rerank=False).ids()


def test_add_get_len_and_first_stage_is_exact(filled):
    col, texts, ids, metas = filled
    assert len(col) == N_DOCS and col.chunk_count == N_DOCS
    assert "d3" in col and "d999" not in col and 3 not in col
    got = col.get(["d5", "d0"])
    assert got[0] == {"id": "d5", "text": texts[5], "metadata": metas[5]}
    assert got[1]["id"] == "d0"
    # The first stage equals brute-force cosine over the embeddings (small n: HNSW is exact).
    vecs = col.embedder.encode(texts)
    q = "gene protein cell"
    qv = col.embedder.encode([q])[0]
    want = [ids[i] for i in np.argsort(-(vecs @ qv), kind="stable")[:10]]
    res = col.search(q, k=10, rerank=False)
    assert res.ids() == want
    assert [h.first_stage_score for h in res.hits] == pytest.approx(sorted((vecs @ qv).tolist(), reverse=True)[:10], abs=1e-5)
    assert not res.degraded and res.reranked == 0
    assert set(res.timings) == {"embed", "ann", "assemble", "score", "total"}


def test_rerank_orders_candidates_as_the_cross_encoder(filled, ce):
    col, texts, ids, _ = filled
    q = "protein binding site"
    first = col.search(q, k=20, candidates=20, rerank=False)
    res = col.search(q, k=7, candidates=20)
    cand_texts = [h.text for h in first.hits]
    ranked = ce.rank(q, cand_texts)
    assert res.ids() == [first.hits[r["corpus_id"]].id for r in ranked[:7]]
    for h, r in zip(res.hits, ranked):
        assert h.reranked and h.score == pytest.approx(r["score"], abs=1e-5)
        assert h.first_stage_score == pytest.approx(first.hits[r["corpus_id"]].first_stage_score, abs=1e-6)
    assert res.reranked == 20 and res.candidates == 20
    batch = col.search_batch([q, "cell"], k=3, candidates=20)
    assert batch[0].ids() == res.ids()[:3] and len(batch[1].hits) == 3


def test_filters_are_applied_inside_the_walk(filled):
    col, texts, ids, metas = filled
    res = col.search("cell", k=N_DOCS, candidates=N_DOCS, rerank=False, filter={"lang": "de"})
    assert sorted(res.ids()) == sorted(i for i, m in zip(ids, metas) if m["lang"] == "de")
    res = col.search("cell", k=N_DOCS, candidates=N_DOCS, filter={"year": {"$in": [2019, 2021]}, "lang": {"$eq": "en"}})
    want = {i for i, m in zip(ids, metas) if m["year"] in (2019, 2021) and m["lang"] == "en"}
    assert set(res.ids()) == want and all(h.reranked for h in res.hits)
    # bool and int are told apart; no match gives no hits
    assert {h.id for h in col.search("x", k=N_DOCS, candidates=N_DOCS, rerank=False, filter={"flag": True}).hits} == {
        i for i, m in zip(ids, metas) if m["flag"] is True
    }
    assert col.search("x", filter={"flag": 1}, rerank=False).hits == []
    assert col.search("x", filter={"lang": "xx"}).hits == []
    for bad in ({"lang": {"$regex": "e"}}, {"lang": {"$in": "en"}}, {"$or": []}, {"lang": {"$gt": True}},
                {"lang": [1, 2]}, {"lang": {"$eq": float("nan")}}, ["lang"], {"lang": {}}, {"$not": {"a": 1}}):
        with pytest.raises(FilterError):
            col.search("x", filter=bad)  # type: ignore[arg-type]


def test_deadline_reranks_best_first_stage_first_and_says_degraded(filled):
    col, *_ = filled
    q = "alpha beta gamma"
    first = col.search(q, k=40, candidates=40, rerank=False).ids()
    res = col.search(q, k=40, candidates=40, deadline_ms=1e-3)  # passes before any batch starts
    assert res.degraded and res.reranked == 0 and res.ids() == first
    full = col.search(q, k=40, candidates=40, deadline_ms=60_000)
    assert not full.degraded and full.reranked == 40
    fused = {h.id: h.score for h in col.search(q, k=40, candidates=40).hits}
    assert {h.id: pytest.approx(fused[h.id], abs=1e-5) for h in full.hits} == fused

    # A reranker that takes until the deadline after its first batch: exactly the best
    # first-stage candidates of that batch are scored, the rest keep first-stage order.
    class SlowAfterFirst:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def score_assembly(self, assembly, *, deadline=None):
            self.calls += 1
            out = self.inner.score_assembly(assembly, deadline=deadline)
            time.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
            return out

    real = col.reranker
    slow = SlowAfterFirst(real)
    col.reranker = slow
    try:
        res = col.search(q, k=40, candidates=40, deadline_ms=3000)
    finally:
        col.reranker = real
    assert slow.calls == 1 and res.degraded and 1 <= res.reranked <= real.max_batch_size
    scored = [h.id for h in res.hits if h.reranked]
    rest = [h.id for h in res.hits if not h.reranked]
    assert set(scored) == set(first[: len(scored)])
    assert rest == first[len(scored):]


def test_persistence_and_model_fingerprints(filled, emb_dir, ce_dir, tmp_path_factory):
    col, texts, ids, _ = filled
    before = col.search("cell growth", k=5)
    again = Collection.open(col.path, embedder=emb_dir, reranker=ce_dir)
    assert again.search("cell growth", k=5).ids() == before.ids()
    assert len(again) == N_DOCS
    other_emb = models.exported_st(tmp_path_factory, pooling="cls", normalize=True)[1]
    with pytest.raises(ModelMismatchError, match="embedder"):
        Collection.open(col.path, embedder=other_emb, reranker=ce_dir)
    other_ce = models.exported(tmp_path_factory, "bert", 2)[1]
    with pytest.raises(ModelMismatchError, match="reranker"):
        Collection.open(col.path, embedder=emb_dir, reranker=other_ce)
    with pytest.raises(FileExistsError):
        Collection.create(col.path, embedder=emb_dir)
    with pytest.raises(FileNotFoundError):
        Collection.open(col.path / "nope" if isinstance(col.path, Path) else col.path + "_nope")


@pytest.mark.parametrize("backend", ["embedded"])  # files of the embedded store (Milvus: test_collection_milvus)
@pytest.mark.parametrize("victim", ["manifest.json", "index", "docstore"])
def test_damaged_files_are_corrupt_file_errors(filled, victim):
    col, *_ = filled
    path = col.path
    target = path / victim if victim == "manifest.json" else next(path.glob(f"{victim}-*.bin"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        Collection.open(path, embedder=col.embedder, reranker=col.reranker)


def test_bad_input_changes_nothing(filled):
    col, texts, ids, _ = filled
    before = _state(col)
    cases = [
        (TypeError, lambda: col.add("one string")),
        (TypeError, lambda: col.add([b"bytes"])),
        (ValueError, lambda: col.add(["bad \udcff surrogate"])),
        (ValueError, lambda: col.add(["a", "b"], ids=["x"])),
        (ValueError, lambda: col.add(["a"], metadata=[{}, {}])),
        (TypeError, lambda: col.add(["a"], metadata=[{"k": object()}])),
        (TypeError, lambda: col.add(["a"], metadata=[{"k": float("nan")}])),
        (TypeError, lambda: col.add(["a"], ids=[1.5])),
        (ValueError, lambda: col.add(["a"], ids=[-1])),
        (DuplicateIdError, lambda: col.add(["a", "b"], ids=["n1", "n1"])),
        (DuplicateIdError, lambda: col.add(["a", "b"], ids=["n1", "d3"])),
        (ValueError, lambda: col.add(["a"], vectors=np.zeros((1, col.dim + 1), np.float32))),
        (ValueError, lambda: col.add(["a", "b"], vectors=np.zeros((1, col.dim), np.float32))),
        (ValueError, lambda: col.add(["a"], vectors=np.full((1, col.dim), np.nan, np.float32))),
        (UnknownIdError, lambda: col.delete(["d1", "nope"])),
        (UnknownIdError, lambda: col.get(["nope"])),
        (TypeError, lambda: col.search(b"bytes")),
        (ValueError, lambda: col.search("q", k=0)),
        (ValueError, lambda: col.search("q", deadline_ms=-1)),
    ]
    for exc, call in cases:
        with pytest.raises(exc):
            call()
        assert _state(col) == before
    assert col.get(["d1"])[0]["text"] == texts[1]


def test_upsert_delete_and_auto_ids(where, backend, emb, ce):
    col = Collection.create(where("c"), embedder=emb, reranker=ce)
    assert col.add(["one", "two"]) == [0, 1]
    assert col.add(["three"], ids=[10]) == [10]
    assert col.add(["four"]) == [11]
    col.upsert(["TWO", "five"], ids=[1, "s"], metadata=[{"v": 2}, None])
    assert col.get([1, "s"]) == [{"id": 1, "text": "TWO", "metadata": {"v": 2}}, {"id": "s", "text": "five", "metadata": {}}]
    assert len(col) == 5 and col.chunk_count == 5
    col.delete([0, "s"])
    assert len(col) == 3 and 0 not in col and col.chunk_count == 3
    assert {h.id for h in col.search("TWO", k=10, rerank=False).hits} == {1, 10, 11}
    col2 = Collection.open(col.path, embedder=emb, reranker=ce)
    assert len(col2) == 3 and col2.get([1])[0]["text"] == "TWO"
    # col2's write reaches col (a search picks it up); col then writes on top of it
    col2.add(["six"], ids=["x6"])
    assert "x6" in {h.id for h in col.search("six", k=10, rerank=False).hits}
    col.add(["seven"], ids=["x7"])
    changed = col2.refresh()  # Milvus: searches read the server; refresh only re-reads the manifest
    assert (changed or backend == "milvus") and col2.chunk_count == 5 and "x7" in col2


def test_chunking_keeps_parent_id_and_metadata(where, emb, ce):
    col = Collection.create(where("c"), embedder=emb, reranker=ce, chunk_tokens=8, chunk_overlap=2)
    rng = random.Random(5)
    texts = [models.sample_text(rng, 40), models.sample_text(rng, 3)]
    col.add(texts, ids=["long", "short"], metadata=[{"k": 1}, {"k": 2}])
    assert len(col) == 2 and col.chunk_count > 3
    res = col.search(texts[0][:30], k=10, candidates=50)
    assert sorted(h.id for h in res.hits) == ["long", "short"]  # one hit per document
    for h in res.hits:
        assert h.text in texts[0] or h.text in texts[1]
        assert h.metadata == {"k": 1 if h.id == "long" else 2}
    assert col.get(["long", "short"])[0]["text"] == texts[0]  # the whole text, not a chunk
    col.upsert([texts[1]], ids=["long"])  # fewer chunks now: the old ones beyond go
    assert col.chunk_count == 2 and col.get(["long"])[0]["text"] == texts[1]
    with pytest.raises(ValueError, match="chunk_overlap"):
        Collection.create(where("c2"), embedder=emb, chunk_tokens=4, chunk_overlap=4)
    with pytest.raises(ValueError, match="chunking"):
        col.add(["x"], vectors=np.zeros((1, col.dim), np.float32))


@pytest.mark.parametrize("backend", ["embedded"])  # the in-process locking of the embedded store
def test_search_from_threads_while_another_thread_writes(filled):
    col, *_ = filled
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                res = col.search("cell", k=5, candidates=10)
                assert len(res.hits) == 5
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    rng = random.Random(9)
    for j in range(5):
        col.add([models.sample_text(rng, 20) for _ in range(5)], ids=[f"w{j}-{i}" for i in range(5)])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(col) == N_DOCS + 25


_WRITER = textwrap.dedent(
    """
    import random, sys
    from tailrank.collection import Collection
    path, emb, ce, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    col = Collection.open(path, embedder=emb, reranker=ce, threads=1)
    rng = random.Random(start)
    words = "cell gene protein binding tumor risk study".split()
    for b in range(start, start + 1000):
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(7)]
        col.upsert(texts, ids=[f"b{b}-{i}" for i in range(7)], metadata=[{"batch": b}] * 7)
        if b % 3 == 0:
            col.delete([f"b{b}-0"])
        print(b, flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_mid_ingest_leaves_the_last_commit(tmp_path, emb_dir, ce_dir):
    """A writer killed with SIGKILL at random moments: every open finds index, DocStore and
    database in agreement, every batch whole or absent, and no committed batch lost."""
    path = tmp_path / "col"
    Collection.create(path, embedder=emb_dir, reranker=ce_dir)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    rng = random.Random(0)
    start = 0
    kills = 0
    for trial in range(14):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(emb_dir), str(ce_dir), str(start)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        # wait for the first commit of this process, then kill at a random moment
        first = proc.stdout.readline()
        assert first.strip(), proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        kills += proc.returncode == -signal.SIGKILL
        reported = [int(x) for x in ([first] + out.split()) if str(x).strip()]
        col = Collection.open(path, embedder=emb_dir, reranker=ce_dir, threads=1)  # checks agreement
        batches: dict[int, set[str]] = {}
        for doc in col.get([*_all_ids(col)]):
            batches.setdefault(doc["metadata"]["batch"], set()).add(doc["id"])
        for b in reported:  # committed before the kill: present
            assert b in batches, (trial, b)
        for b, members in batches.items():  # whole or absent (a delete is a commit of its own)
            whole = {f"b{b}-{i}" for i in range(7)}
            if b % 3 == 0:
                allowed = [whole - {f"b{b}-0"}] if b in reported else [whole, whole - {f"b{b}-0"}]
            else:
                allowed = [whole]
            assert members in allowed, (b, members)
        assert col.chunk_count == len(col)
        leftovers = [p.name for p in path.iterdir() if ".tmp" in p.name]
        assert not leftovers
        start = max(batches) + 1
    assert kills >= 10


def _all_ids(col: Collection) -> list:
    return [r[0] for r in col._reader().execute("SELECT doc_id FROM docs")]


def test_cli_ingest_search_eval(tmp_path, where, emb_dir, ce_dir, capsys):
    from tailrank.cli import main

    texts, ids, _ = _docs(3, 30)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "title": "T" + i, "text": t, "src": "x"}) + "\n"
                              for i, t in zip(ids, texts)))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q{j}", "text": texts[j][:40]}) + "\n" for j in range(6)))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{j}\t{ids[j]}\t1\n" for j in range(5)))
    col = where("col")
    assert main(["ingest", str(col), "--jsonl", str(corpus), "--embedder", str(emb_dir), "--reranker", str(ce_dir),
                 "--batch", "7"]) == 0
    assert "ingested 30 documents" in capsys.readouterr().out
    assert main(["search", str(col), texts[2][:40], "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["hits"]) == 3 and out["hits"][0]["metadata"]["src"] == "x"
    assert out["hits"][0]["metadata"]["title"].startswith("T")
    assert main(["search", str(col), "cell", "--no-rerank", "--filter", '{"src": "y"}']) == 0
    assert "candidates=0" in capsys.readouterr().out  # no document matches the filter
    assert main(["eval", str(col), "--queries", str(queries), "--qrels", str(qrels), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["queries"] == 5
    for stage in ("first_stage", "reranked"):
        assert set(ev[stage]) == {"ndcg@10", "recall@10", "recall@100"}
        assert all(0.0 <= v <= 1.0 for v in ev[stage].values())
    # the same query text finds its own document: the first stage recalls it
    assert ev["first_stage"]["recall@100"] == 1.0
    assert main(["search", str(col), "x", "--filter", "{bad"]) == 2
    assert main(["search", str(col), "x", "--filter", '{"a": {"$regex": 1}}']) == 2


def test_served_search_on_a_real_collection(filled):
    """POST /search of `tailrank serve` over this Collection: same hits as the library call,
    filters, stage-time headers, and a bad filter is a 422."""
    from fastapi.testclient import TestClient

    from tailrank.serve import create_app

    col, texts, ids, metas = filled
    want = col.search("protein binding", k=5, candidates=30, filter={"lang": "en"})
    app = create_app(col.reranker, collection=col)
    with TestClient(app) as c:
        assert app.state.tailrank.wait_ready(60)
        r = c.post("/search", json={"query": "protein binding", "k": 5, "candidates": 30, "filter": {"lang": "en"}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [h["id"] for h in body["hits"]] == want.ids()
        assert all(h["metadata"]["lang"] == "en" for h in body["hits"])
        assert body["hits"][0]["score"] == pytest.approx(want.hits[0].score, abs=1e-5)
        assert body["degraded"] is False and r.headers["X-Tailrank-Degraded"] == "false"
        assert float(r.headers["X-Score-Time"]) > 0
        bad = c.post("/search", json={"query": "x", "filter": {"lang": {"$regex": "e"}}})
        assert bad.status_code == 422 and "$regex" in bad.text
