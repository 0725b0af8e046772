"""Score fusion: the math against hand-computed cases and a brute-force reference, Collection.search
with each fusion against that reference, the stored default, `tailrank tune`, and /search."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

import models
from collection_fixtures import ce, ce_dir, emb, emb_dir  # noqa: F401  (pytest fixtures)

from tailrank.collection import Collection
from tailrank.collection import _fusion as F
from tailrank.collection._manifest import MANIFEST
from tailrank.errors import CorruptFileError, FusionError
from tailrank._fileio import read_json_checked, write_json_checked

N_DOCS = 40


# --- the reference: loops over the definitions ----------------------------------------------


def ref_rank(x: list[float], i: int, lower: bool) -> int:
    return 1 + sum(1 for y in x if (y < x[i] if lower else y > x[i]))


def ref_minmax(x: list[float], i: int, lower: bool) -> float:
    lo, hi = min(x), max(x)
    if hi == lo:
        return 0.5
    v = (x[i] - lo) / (hi - lo)
    return 1 - v if lower else v


def ref_fuse(method: str, first: list[float], rerank: list[float], *, w: float = 0.5, k: int = 60,
             lower: bool = False) -> list[float]:
    n = len(first)
    if method == "rrf":
        return [1 / (k + ref_rank(first, i, lower)) + 1 / (k + ref_rank(rerank, i, False)) for i in range(n)]
    if method == "linear":
        return [w * ref_minmax(rerank, i, False) + (1 - w) * ref_minmax(first, i, lower) for i in range(n)]
    return list(rerank)


def ref_order(fused: list[float]) -> list[int]:
    return sorted(range(len(fused)), key=lambda i: (-fused[i], i))


# --- the math -------------------------------------------------------------------------------


def test_hand_computed_cases():
    np.testing.assert_array_equal(F.ranks([3, 1, 3, 2]), [1, 4, 1, 3])  # ties share the best rank
    np.testing.assert_array_equal(F.ranks([3, 1, 3, 2], lower_is_better=True), [3, 1, 3, 2])
    np.testing.assert_allclose(F.minmax([2, 4, 3]), [0, 1, 0.5])
    np.testing.assert_allclose(F.minmax([2, 4, 3], lower_is_better=True), [1, 0, 0.5])
    first, rerank = [0.9, 0.8, 0.7], [0.1, 0.3, 0.2]
    np.testing.assert_allclose(F.rrf(first, rerank), [1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    np.testing.assert_allclose(F.rrf(first, rerank, k=1), [1 / 2 + 1 / 4, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3])
    # minmax(first) = [1, .5, 0], minmax(rerank) = [0, 1, .5]
    np.testing.assert_allclose(F.linear(first, rerank, weight=0.25), [0.75, 0.625, 0.125])
    np.testing.assert_allclose(F.linear(first, rerank, weight=1.0), [0, 1, 0.5])
    np.testing.assert_allclose(F.linear(first, rerank, weight=0.0), [1, 0.5, 0])
    # l2: the first stage is a distance, lower is better
    np.testing.assert_allclose(F.linear([0.1, 0.2, 0.3], rerank, weight=0.25, lower_first=True), [0.75, 0.625, 0.125])
    np.testing.assert_allclose(F.rrf([0.1, 0.2, 0.3], rerank, lower_first=True), F.rrf(first, rerank))


def test_single_candidate_equal_scores_and_ties_are_finite():
    for f in (F.Fusion("rrf"), F.Fusion("linear", 0.3), F.Fusion("none")):
        one = F.fuse(f, [0.7], [2.0])
        assert one.shape == (1,) and np.isfinite(one).all()
        same = F.fuse(f, [0.5] * 4, [1.0] * 4)
        assert np.isfinite(same).all() and np.all(same == same[0])  # nothing reorders them
    # equal first-stage scores: linear orders by the reranker alone; rrf too
    for f in (F.Fusion("rrf"), F.Fusion("linear", 0.3)):
        assert ref_order(F.fuse(f, [1.0] * 4, [0.1, 0.4, 0.2, 0.3]).tolist()) == [1, 3, 2, 0]
    assert F.fuse(F.Fusion("linear", 0.3), [], []).size == 0 and F.rrf([], []).size == 0
    # extreme but finite inputs stay finite (float64 ranges)
    big = F.linear([-3.4e38, 3.4e38], [3.4e38, -3.4e38], weight=0.5)
    np.testing.assert_allclose(big, [0.5, 0.5])


def test_math_equals_brute_force_reference():
    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(1, 30)
        tie = rng.random() < 0.5  # small integer scores: many ties
        first = [float(rng.randint(0, 4)) if tie else rng.uniform(-1, 1) for _ in range(n)]
        rerank = [float(rng.randint(0, 3)) if tie else rng.gauss(0, 3) for _ in range(n)]
        lower, w, k = rng.random() < 0.3, rng.choice([0.0, 0.2, 0.6, 1.0]), rng.choice([1, 60])
        for method in ("none", "rrf", "linear"):
            fz = F.resolve(None, method, w if method == "linear" else None, k)
            got = F.fuse(fz, first, rerank, lower_first=lower)
            want = ref_fuse(method, first, rerank, w=w, k=k, lower=lower)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{trial} {method}")
            assert ref_order(got.tolist()) == ref_order(want)


def test_fuse_scored_fuses_the_scored_subset_only():
    first = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    rerank = np.array([0.1, 0.9, 0.5, 0.0, 0.0])
    scored = np.array([True, True, True, False, False])
    out = F.fuse_scored(F.Fusion("linear", 0.5), first, rerank, scored)
    assert not np.isnan(out).any() and np.all(np.isneginf(out[3:]))
    np.testing.assert_allclose(out[:3], ref_fuse("linear", [0.9, 0.8, 0.7], [0.1, 0.9, 0.5], w=0.5))
    assert np.all(np.isneginf(F.fuse_scored(F.Fusion("rrf"), first, rerank, np.zeros(5, bool))))


@pytest.mark.parametrize(
    "args",
    [("max",), (1,), ("RRF",), ("linear", 1.5), ("linear", -0.01), ("linear", float("nan")), ("linear", float("inf")),
     ("linear", True), ("linear", "0.5"), ("rrf", None, 0), ("rrf", None, -3), ("rrf", None, 2.5), ("rrf", None, True),
     ("rrf", 0.5), ("none", 0.5)],
)
def test_bad_fusion_arguments_are_fusion_errors(args):
    with pytest.raises(FusionError):
        F.resolve(None, *args)
    assert issubclass(FusionError, ValueError)


def test_resolve_over_a_default():
    d = F.Fusion("linear", 0.7, 60)
    assert F.resolve(None, None) == F.Fusion("none")
    assert F.resolve(d, None) == d
    assert F.resolve(d, "linear") == d and F.resolve(d, "linear", 0.2) == F.Fusion("linear", 0.2)
    assert F.resolve(F.Fusion("rrf", None, 10), "linear") == F.Fusion("linear", F.DEFAULT_WEIGHT, 10)
    assert F.resolve(d, "none") == F.Fusion("none") and F.resolve(d, "rrf", rrf_k=5) == F.Fusion("rrf", None, 5)
    assert F.from_manifest(None, "m") is None and F.from_manifest(d.to_json(), "m") == d
    for bad in ({"method": "x"}, {"method": "linear", "weight": 2}, [1], "rrf"):
        with pytest.raises(FusionError):
            F.from_manifest(bad, "m")


# --- Collection.search ------------------------------------------------------------------------


def _docs(seed: int = 0, n: int = N_DOCS):
    rng = random.Random(seed)
    texts = [models.sample_text(rng, rng.randint(3, 60)) for _ in range(n)]
    return texts, [f"d{i}" for i in range(n)]


@pytest.fixture(params=["cosine", "l2"])
def col(request, tmp_path, emb, ce):
    c = Collection.create(tmp_path / "col", embedder=emb, reranker=ce, metric=request.param)
    texts, ids = _docs()
    c.add(texts, ids=ids)
    return c


def _reference(col, ce, q, method, w=0.5, k=60, n=N_DOCS):
    first = col.search(q, k=n, candidates=n, rerank=False)
    rr = [r["score"] for r in sorted(ce.rank(q, [h.text for h in first.hits]), key=lambda r: r["corpus_id"])]
    fs = [h.first_stage_score for h in first.hits]
    fused = ref_fuse(method, fs, rr, w=w, k=k, lower=col.metric == "l2")
    order = ref_order(fused)
    return [first.hits[i].id for i in order], [fused[i] for i in order], [rr[i] for i in order], first


@pytest.mark.parametrize("method,w", [("none", None), ("rrf", None), ("linear", 0.3), ("linear", 0.8)])
def test_search_orders_as_the_reference_fusion(col, ce, method, w):
    for q in ("protein binding site", "cell gene"):
        want, fused, rr, _ = _reference(col, ce, q, method, w=w if w is not None else 0.5)
        res = col.search(q, k=N_DOCS, candidates=N_DOCS, fusion=method, fusion_weight=w)
        assert res.ids() == want and res.fusion == method and res.fusion_weight == w
        assert [h.score for h in res.hits] == pytest.approx(fused, abs=1e-5)
        assert [h.rerank_score for h in res.hits] == pytest.approx(rr, abs=1e-5)
        assert all(h.reranked for h in res.hits)
        assert col.search_batch([q], k=5, candidates=N_DOCS, fusion=method, fusion_weight=w)[0].ids() == want[:5]


def test_fusion_under_a_deadline_fuses_what_was_scored(col, ce):
    q = "alpha beta gamma"
    first = col.search(q, k=N_DOCS, candidates=N_DOCS, rerank=False).ids()
    res = col.search(q, k=N_DOCS, candidates=N_DOCS, deadline_ms=1e-3, fusion="linear", fusion_weight=0.5)
    assert res.degraded and res.reranked == 0 and res.ids() == first and res.fusion == "linear"
    assert all(h.rerank_score is None and h.score == h.first_stage_score for h in res.hits)

    class SlowAfterFirst:  # scores one batch, then takes until the deadline
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
    col.reranker = SlowAfterFirst(real)
    try:
        res = col.search(q, k=N_DOCS, candidates=N_DOCS, deadline_ms=3000, fusion="rrf")
    finally:
        col.reranker = real
    scored = [h for h in res.hits if h.reranked]
    assert res.degraded and 1 <= len(scored) < N_DOCS
    assert {h.id for h in scored} == set(first[: len(scored)])  # best first-stage first
    assert [h.id for h in res.hits if not h.reranked] == first[len(scored):]
    # the scored ones are ranked by RRF among themselves
    fs = [h.first_stage_score for h in scored]
    rr = [h.rerank_score for h in scored]
    want = ref_fuse("rrf", fs, rr, lower=col.metric == "l2")
    assert [h.score for h in scored] == pytest.approx(want) and want == sorted(want, reverse=True)


def test_default_fusion_is_stored_and_reopened(col, emb, ce):
    q = "protein binding site"
    assert col.default_fusion is None and col.search(q).fusion == "none"
    want = col.search(q, k=10, fusion="linear", fusion_weight=0.3).ids()
    col.set_default_fusion("linear", fusion_weight=0.3, tuned={"dev_ndcg@10": 0.5})
    assert col.search(q, k=10).ids() == want and col.search(q).fusion_weight == 0.3
    assert col.search(q, k=10, fusion="linear").fusion_weight == 0.3  # the default's weight
    assert col.search(q, fusion="none").fusion == "none"  # an explicit choice wins
    assert col.search(q, rerank=False).fusion == "none"  # first stage only: nothing to fuse
    m = read_json_checked(col.path / MANIFEST, "m")
    assert m["fusion"] == {"method": "linear", "weight": 0.3, "rrf_k": 60, "tuned": {"dev_ndcg@10": 0.5}}
    col.close()
    again = Collection.open(col.path, embedder=emb, reranker=ce)
    assert again.default_fusion == F.Fusion("linear", 0.3) and again.search(q, k=10).ids() == want
    # another process's (here: object's) new default is picked up by refresh()
    other = Collection.open(col.path, embedder=emb, reranker=ce)
    other.set_default_fusion("rrf", rrf_k=10)
    assert again.refresh() and again.default_fusion == F.Fusion("rrf", None, 10)
    other.set_default_fusion(None)
    assert again.refresh() and again.default_fusion is None
    assert "fusion" in read_json_checked(col.path / MANIFEST, "m")  # null: none stored


def test_default_is_written_under_the_writer_lock(col):
    from tailrank.collection._locks import FileLock
    from tailrank.errors import ConcurrentUseError

    before = (col.path / MANIFEST).read_bytes()
    other = FileLock(col.path / ".writer.lock")  # another writer (flock: per open file)
    assert other.try_acquire()
    try:
        with pytest.raises(ConcurrentUseError):
            col.set_default_fusion("rrf")
    finally:
        other.release()
    assert (col.path / MANIFEST).read_bytes() == before and col.default_fusion is None
    col.set_default_fusion("rrf")
    assert col.default_fusion == F.Fusion("rrf") and not list(col.path.glob(".manifest.json.*.tmp"))
    col.add(["a new document about cells"], ids=["new"])  # writes go on after it, the manifest intact
    assert "new" in col and read_json_checked(col.path / MANIFEST, "m")["fusion"]["method"] == "rrf"


def test_manifest_without_or_with_a_damaged_fusion_field(col, emb, ce):
    path = col.path / MANIFEST
    col.close()
    m = read_json_checked(path, "m")
    m.pop("fusion", None)  # a collection written before fusion existed
    write_json_checked(path, m)
    assert Collection.open(col.path, embedder=emb, reranker=ce).default_fusion is None
    m["fusion"] = {"method": "linear", "weight": 7}
    write_json_checked(path, m)
    with pytest.raises(CorruptFileError, match="fusion"):
        Collection.open(col.path, embedder=emb, reranker=ce)


def test_bad_fusion_arguments_change_nothing(col):
    before = (col.path / MANIFEST).read_bytes()
    want = col.search("x y", k=5).ids()
    for kw in ({"fusion": "max"}, {"fusion": "linear", "fusion_weight": 2.0}, {"fusion": "rrf", "fusion_weight": 0.5},
               {"fusion": "rrf", "rrf_k": 0}, {"fusion_weight": float("nan"), "fusion": "linear"},
               {"fusion": "rrf", "rerank": False}, {"fusion": ["linear"]}):
        with pytest.raises(FusionError):
            col.search("x y", **kw)
        with pytest.raises(FusionError):
            col.search_batch(["x y"], **kw)
    for kw in ({"fusion": "max"}, {"fusion": "linear", "fusion_weight": -1}, {"fusion": None, "fusion_weight": 0.5},
               {"fusion": "rrf", "tuned": {"x": float("nan")}}, {"fusion": "rrf", "tuned": {"x": object()}}):
        with pytest.raises(FusionError):
            col.set_default_fusion(**kw)
    assert (col.path / MANIFEST).read_bytes() == before and col.default_fusion is None
    assert col.search("x y", k=5).ids() == want


# --- tune -------------------------------------------------------------------------------------


def _beir_files(tmp_path: Path, texts: list[str], ids: list[str], n_queries: int = 16) -> tuple[Path, Path]:
    rng = random.Random(5)
    queries = tmp_path / "queries.jsonl"
    qrels = tmp_path / "qrels.tsv"
    qs = [rng.randrange(len(texts)) for _ in range(n_queries)]
    queries.write_text("".join(json.dumps({"_id": f"q{j}", "text": " ".join(texts[d].split()[:6])}) + "\n"
                               for j, d in enumerate(qs)))
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{j}\t{ids[d]}\t1\n" for j, d in enumerate(qs)))
    return queries, qrels


def test_tune_stores_the_best_fusion_and_its_numbers_are_the_searches(tmp_path, emb, ce, emb_dir, ce_dir, capsys):
    from tailrank._tune import split
    from tailrank.bench.quality import evaluate
    from tailrank.cli import main

    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    texts, ids = _docs(2)
    col.add(texts, ids=ids)
    col.close()
    queries, qrels = _beir_files(tmp_path, texts, ids)
    args = ["tune", str(col.path), "--queries", str(queries), "--qrels", str(qrels), "--candidates", "20",
            "--embedder", str(emb_dir), "--reranker", str(ce_dir)]
    assert main(args + ["--json", "--no-store"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["stored"] is False
    assert "fusion" not in read_json_checked(col.path / MANIFEST, "m")
    assert main(args + ["--json"]) == 0
    rep2 = json.loads(capsys.readouterr().out)
    assert {k: rep2[k] for k in ("best", "dev", "heldout")} == {k: rep[k] for k in ("best", "dev", "heldout")}
    best = rep["best"]
    dev = rep["dev"]
    assert dev[best["method"]] == max(dev["none"], dev["rrf"], dev["linear"])
    assert dev["linear"] == max(dev["linear_grid"].values())
    assert rep["dev"]["queries"] == 8 and rep["heldout"]["queries"] == 8

    # the stored default is what a reopened collection searches with ...
    again = Collection.open(col.path, embedder=emb, reranker=ce)
    assert again.default_fusion == F.resolve(None, best["method"], best["weight"], best["rrf_k"])
    assert read_json_checked(col.path / MANIFEST, "m")["fusion"]["tuned"]["dev_queries"] == 8
    # ... and tune's numbers equal evaluating real searches with each fusion on the held-out queries
    qtext = {json.loads(x)["_id"]: json.loads(x)["text"] for x in queries.read_text().splitlines()}
    qr = {f"q{j}": {line.split("\t")[1]: 1} for j, line in enumerate(qrels.read_text().splitlines()[1:])}
    _, held = split(sorted(qr), 0.5, 0)
    for key, kw in (("none", {"fusion": "none"}), ("rrf", {"fusion": "rrf"}),
                    ("linear", {"fusion": "linear", "fusion_weight": max(
                        rep["grid"], key=lambda w: dev["linear_grid"][f"{w:g}"])})):
        run = {}
        for q in held:
            hits = again.search(qtext[q], k=20, candidates=20, **kw).hits
            run[q] = {str(h.id): float(len(hits) - i) for i, h in enumerate(hits)}
        assert evaluate(qr, run)["ndcg@10"] == pytest.approx(rep["heldout"][key], abs=1e-9), key

    # the table, and --test-qrels as the held-out split
    held_qrels = tmp_path / "held.tsv"
    lines = qrels.read_text().splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join(lines[:9]) + "\n")
    held_qrels.write_text("\n".join(lines[:1] + lines[9:]) + "\n")
    assert main(["tune", str(col.path), "--queries", str(queries), "--qrels", str(tmp_path / "dev.tsv"),
                 "--test-qrels", str(held_qrels), "--candidates", "20", "--max-queries", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 dev and 5 held-out queries" in out and "linear (w=" in out and "stored as the default" in out
    # overlapping dev and held-out are refused
    assert main(["tune", str(col.path), "--queries", str(queries), "--qrels", str(qrels), "--test-qrels", str(qrels)]) == 2
    # the CLI search takes the fusion flags
    assert main(["search", str(col.path), texts[0][:30], "--fusion", "linear", "--fusion-weight", "0.4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["fusion"] == "linear" and s["fusion_weight"] == 0.4 and "rerank_score" in s["hits"][0]
    assert main(["search", str(col.path), "x", "--fusion", "rrf", "--fusion-weight", "0.4"]) == 2
    for flags, says in ((["--fusion", "none"], "reranked=20\n"), (["--fusion", "rrf"], "fusion=rrf"),
                        (["--fusion", "linear", "--fusion-weight", "0.4"], "fusion=linear(w=0.4)")):
        assert main(["search", str(col.path), texts[0][:30], "--candidates", "20", *flags]) == 0
        out = capsys.readouterr().out
        assert says in out + "\n" and ("rerank=" in out) == (flags[1] != "none")
    # eval ranks the reranked run by the stored default unless told otherwise, and says which
    assert main(["eval", str(col.path), "--queries", str(queries), "--qrels", str(qrels), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fusion"] == Collection.open(col.path).default_fusion.describe()
    assert main(["eval", str(col.path), "--queries", str(queries), "--qrels", str(qrels), "--json",
                 "--fusion", "linear", "--fusion-weight", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["fusion"] == "linear (w=0.25)"


def test_served_search_takes_fusion(col):
    from fastapi.testclient import TestClient

    from tailrank.serve import create_app

    want = col.search("protein binding", k=5, candidates=30, fusion="linear", fusion_weight=0.2)
    app = create_app(col.reranker, collection=col)
    with TestClient(app) as c:
        assert app.state.tailrank.wait_ready(60)
        r = c.post("/search", json={"query": "protein binding", "k": 5, "candidates": 30, "fusion": "linear",
                                    "fusion_weight": 0.2})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["hits"]] == want.ids()
        assert r.json()["hits"][0]["score"] == pytest.approx(want.hits[0].score, abs=1e-6)
        # Every hit carries the score it was ranked by and both scores it was fused from.
        assert (r.json()["fusion"], r.json()["fusion_weight"]) == ("linear", 0.2)
        for got, h in zip(r.json()["hits"], want.hits):
            assert got["reranked"] is True
            assert got["fused_score"] == pytest.approx(h.score, abs=1e-6) == got["score"]
            assert got["rerank_score"] == pytest.approx(h.rerank_score, abs=1e-5)
            assert got["first_stage_score"] == pytest.approx(h.first_stage_score, abs=1e-6)
        plain = c.post("/search", json={"query": "protein binding", "k": 5, "candidates": 30, "fusion": "none"}).json()
        assert plain["fusion"] == "none" and plain["fusion_weight"] is None
        assert all(h["fused_score"] is None and h["rerank_score"] == h["score"] for h in plain["hits"])
        first = c.post("/search", json={"query": "protein binding", "k": 5, "rerank": False}).json()
        assert all(h["rerank_score"] is None and h["fused_score"] is None and not h["reranked"]
                   and h["score"] == h["first_stage_score"] for h in first["hits"])
        bad = c.post("/search", json={"query": "x", "fusion": "rrf", "fusion_weight": 0.2})
        assert bad.status_code == 422 and "fusion_weight" in bad.json()["detail"]
        assert c.post("/search", json={"query": "x", "fusion": "linear", "fusion_weight": 2}).status_code == 422
