"""tailrank serve with an LLM reranker (issue 16): both rerank dialects and /search with an
``instruction``, scores equal to CrossEncoder's, requests with different prompts in one EDF round
(each prompt's prefix run once), the score cache, deadline degradation, and the field's
validation; a seeded tiny Qwen3 reranker through the in-process ASGI app."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import numpy as np
import pytest

import llm_models
import models

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from test_serve import Rounds, async_client, client, create_app, hold_and_fill, queued_requests, until  # noqa: E402
from tailrank import Collection, CrossEncoder, Embedder  # noqa: E402
from tailrank.export import export  # noqa: E402
from tailrank.serve import Limits  # noqa: E402

MAX_LENGTH = 160
INSTRUCTION = "Find the passage about hormones"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("serve-llm")
    hf = llm_models.build_llm_checkpoint("qwen3", root / "hf")
    return export(hf, root / "out", rerank_template="qwen3")


@pytest.fixture(scope="module")
def llm(llm_dir: Any) -> CrossEncoder:
    return CrossEncoder(llm_dir, threads=1, max_length=MAX_LENGTH, spin=False)


def docs_of(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [models.sample_text(rng, rng.randint(1, 30)) for _ in range(n)]


class PrefixCount:
    """Counts the runs of a model's prefix graph (one per prompt per round)."""

    def __init__(self, ce: CrossEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
        assert ce._llm is not None
        real, count = ce._llm.prefix_session, self
        self.runs = 0

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def run(self, names: Any, feeds: Any) -> Any:
                count.runs += 1
                return real.run(names, feeds)

        monkeypatch.setattr(ce._llm, "prefix_session", Counting())


def by_index(results: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in sorted(results, key=lambda r: r["index"])]


def test_both_dialects_score_as_predict_with_the_instruction(llm: CrossEncoder) -> None:
    docs = docs_of(1, 9) + ["", "a document far longer than the room the prompt leaves " * 20]
    q = "insulin and glucose"
    with client(create_app(llm, score_cache_bytes=0)) as c:
        for instruction in (None, INSTRUCTION, "é 日本 — x²"):
            want = llm.predict([(q, d) for d in docs], instruction=instruction)
            extra = {} if instruction is None else {"instruction": instruction}
            r = c.post("/v2/rerank", json={"query": q, "documents": docs, **extra})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(by_index(r.json()["results"], "relevance_score"), want, atol=1e-5, rtol=0)
            r = c.post("/rerank", json={"query": q, "texts": docs, "raw_scores": True, **extra})
            assert r.status_code == 200, r.text
            raw = llm.scores_from_logits(np.log(want / (1 - want))[:, None], raw=True)
            np.testing.assert_allclose(by_index(r.json(), "score"), raw, atol=1e-4, rtol=0)
        # The instruction changes the scores (it is in the prompt).
        a = c.post("/rerank", json={"query": q, "texts": docs}).json()
        b = c.post("/rerank", json={"query": q, "texts": docs, "instruction": INSTRUCTION}).json()
        assert not np.allclose(by_index(a, "score"), by_index(b, "score"), atol=1e-4)
        # Over-long documents are cut unless the request says not to.
        r = c.post("/rerank", json={"query": q, "texts": docs, "truncate": False})
        assert r.status_code == 413 and "truncate" in r.json()["detail"], r.text


def test_requests_with_different_instructions_share_a_round_and_each_prefix_runs_once(
        llm: CrossEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests queued behind a held round (and the round formed meanwhile) form one round: two instructions and a repeat of
    the first request's prompt. The round runs two prefixes (one per distinct prompt), and every
    request's scores equal CrossEncoder.predict with its own instruction."""
    rounds = Rounds()
    app = create_app(llm, round_hook=rounds, score_cache_bytes=0, max_batch_tokens=16 * MAX_LENGTH)
    q = "protein binding"
    bodies = [{"query": q, "documents": docs_of(2, 6), "instruction": INSTRUCTION},
              {"query": q, "texts": docs_of(3, 5), "instruction": "Is the document about cells?"},
              {"query": q, "documents": docs_of(4, 4), "instruction": INSTRUCTION}]
    prefixes = PrefixCount(llm, monkeypatch)

    async def go() -> tuple[list[Any], int]:
        async with async_client(app) as c:
            held, filler = await hold_and_fill(c, app, rounds)
            rest = [asyncio.ensure_future(c.post("/rerank", json=b)) for b in bodies]
            await until(lambda: queued_requests(app) == 2 + len(bodies), "the requests queued behind the held one")
            before = prefixes.runs
            rounds.gate.set()
            assert (await held).status_code == 200 and (await filler).status_code == 200
            out = await asyncio.gather(*rest)
            return out, prefixes.runs - before

    responses, runs = asyncio.run(go())
    assert rounds.sizes[:3] == [1, 1, 3], rounds.sizes  # the three requests in one round
    assert runs == 2 + 2  # the held and the filler's prefixes, then one per distinct prompt of the round
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        docs = body.get("documents") or body["texts"]
        want = llm.predict([(q, d) for d in docs], instruction=body["instruction"])
        got = by_index(r.json()["results"], "relevance_score") if "documents" in body else by_index(r.json(), "score")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_repeats_are_answered_from_the_score_cache(llm_dir: Any) -> None:
    ce = CrossEncoder(llm_dir, threads=1, max_length=MAX_LENGTH, spin=False)
    docs = docs_of(5, 8)
    body = {"query": "cell growth", "texts": docs, "raw_scores": True, "instruction": INSTRUCTION}
    app = create_app(ce)
    with client(app) as c:
        first = c.post("/rerank", json=body).json()
        stats = app.state.tailrank.score_cache.cache.stats()
        assert (stats.hits, stats.misses) == (0, len(docs))
        again = c.post("/rerank", json=body).json()
        assert again == first  # bit-identical: the stored logits
        assert app.state.tailrank.score_cache.cache.stats().hits == len(docs)
        other = c.post("/rerank", json={**body, "instruction": "Another task"}).json()
        assert app.state.tailrank.score_cache.cache.stats().hits == len(docs)  # another prompt: misses
        assert other != first
        # The server's keys are the library's: the model's own calls hit what the server stored.
    lib = CrossEncoder(llm_dir, threads=1, max_length=MAX_LENGTH, score_cache=app.state.tailrank.score_cache.cache)
    got = lib.predict([("cell growth", d) for d in docs], instruction=INSTRUCTION)
    assert lib.cache_stats().hits == 2 * len(docs)  # the repeat request, then all of the library call
    np.testing.assert_allclose(lib.scores_from_logits(np.log(got / (1 - got))[:, None], raw=True),
                               by_index(first, "score"), atol=1e-5)


class Held:
    """The real LLM reranker; its call number ``block_call`` waits for ``release`` (a busy model,
    without timing anything)."""

    def __init__(self, ce: CrossEncoder) -> None:
        self.ce = ce
        self.calls = 0
        self.block_call: int | None = None
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ce, name)

    def score_assembly(self, assembly: Any, *, deadline: float | None = None) -> Any:
        self.calls += 1
        if self.calls == self.block_call:
            assert self.release.wait(60)
        return self.ce.score_assembly(assembly, deadline=deadline)


def test_a_deadline_degrades_an_llm_request_and_says_so(llm: CrossEncoder) -> None:
    """Rounds of one prompt and a few documents; the request's second round blocks: at its
    deadline it is answered with the first round's documents ranked and the rest in input order."""
    model = Held(llm)
    docs = docs_of(6, 40)
    with client(create_app(model, max_batch_tokens=MAX_LENGTH, score_cache_bytes=0)) as c:
        model.block_call = model.calls + 2
        r = c.post("/rerank", json={"query": "brain", "documents": docs, "instruction": INSTRUCTION},
                   headers={"X-Request-Timeout-Ms": "1500"})
        model.release.set()
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["meta"]["degraded"] is True and r.headers["X-Tailrank-Degraded"] == "true"
        n = out["meta"]["scored"]
        assert 0 < n < len(docs)
        head, rest = out["results"][:n], out["results"][n:]
        want = llm.predict([("brain", docs[x["index"]]) for x in head], instruction=INSTRUCTION)
        np.testing.assert_allclose([x["relevance_score"] for x in head], want, atol=1e-5, rtol=0)
        assert [x["relevance_score"] for x in head] == sorted((x["relevance_score"] for x in head), reverse=True)
        assert all(x["relevance_score"] is None for x in rest)
        assert [x["index"] for x in rest] == sorted(x["index"] for x in rest)


def test_the_instruction_field_is_validated(llm: CrossEncoder, tmp_path_factory: pytest.TempPathFactory) -> None:
    with client(create_app(llm, limits=Limits(max_instruction_chars=20))) as c:
        for path, body in [("/rerank", b'{"query": "q", "texts": ["a"], "instruction": "x\\ud800"}'),
                           ("/v1/rerank", b'{"query": "q", "documents": ["a"], "instruction": "\\udfff"}')]:
            r = c.post(path, content=body, headers=JSON)
            assert r.status_code == 422 and "instruction" in r.json()["detail"], r.text
            assert "lone surrogate" in r.json()["detail"], r.text
        r = c.post("/rerank", json={"query": "q", "texts": ["a"], "instruction": "x" * 21})
        assert r.status_code == 413 and "instruction" in r.json()["detail"], r.text
        for bad in (3, ["a"], {"t": "a"}):
            assert c.post("/rerank", json={"query": "q", "texts": ["a"], "instruction": bad}).status_code == 422
        r = c.post("/rerank", json={"query": "q", "texts": ["a"], "truncation_direction": "left"})
        assert r.status_code == 422 and "LLM" in r.json()["detail"], r.text
        assert c.post("/rerank", json={"query": "q", "texts": ["a"], "instruction": ""}).status_code == 200
    # An encoder has no instruction slot: the field is refused, naming it, in both dialects.
    _, enc_dir = models.exported(tmp_path_factory, "bert", 1)
    with client(create_app(CrossEncoder(enc_dir, threads=1))) as c:
        for path, body in [("/rerank", {"query": "q", "texts": ["a"], "instruction": "find"}),
                           ("/v2/rerank", {"query": "q", "documents": ["a"], "instruction": "find"})]:
            r = c.post(path, json=body)
            assert r.status_code == 422 and "instruction is for LLM rerankers" in r.json()["detail"], r.text
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200


def test_search_with_an_llm_reranker_and_an_instruction_matches_the_library(
        llm: CrossEncoder, tmp_path_factory: pytest.TempPathFactory) -> None:
    emb = Embedder(models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1], threads=1)
    col = Collection.create(tmp_path_factory.mktemp("serve-llm-col") / "col", embedder=emb, reranker=llm)
    col.add(docs_of(7, 30))
    with client(create_app(llm, collection=col)) as c:
        for extra in ({}, {"instruction": INSTRUCTION}):
            want = col.search("protein binding", k=5, candidates=20, **extra)
            r = c.post("/search", json={"query": "protein binding", "k": 5, "candidates": 20, **extra})
            assert r.status_code == 200, r.text
            out = r.json()
            assert [h["id"] for h in out["hits"]] == want.ids() and out["degraded"] is False
            np.testing.assert_allclose([h["score"] for h in out["hits"]], [h.score for h in want.hits], atol=1e-5)
            assert [h["truncated"] for h in out["hits"]] == [h.truncated for h in want.hits]
        r = c.post("/search", json={"query": "q", "rerank": False, "instruction": INSTRUCTION})
        assert r.status_code == 422 and "instruction" in r.json()["detail"], r.text
        r = c.post("/search", content=b'{"query": "q", "instruction": "\\ud800"}', headers=JSON)
        assert r.status_code == 422 and "instruction" in r.json()["detail"], r.text
    col.close()


def test_the_full_prompt_path_serves_too(llm_dir: Any) -> None:
    """A model loaded with prefix_reuse=False: rounds hold whole prompts (the prefix as the
    template's fixed tokens); the scores are still CrossEncoder's."""
    full = CrossEncoder(llm_dir, threads=1, max_length=MAX_LENGTH, prefix_reuse=False, spin=False)
    docs = docs_of(8, 7)
    with client(create_app(full, score_cache_bytes=0)) as c:
        r = c.post("/rerank", json={"query": "kidney", "documents": docs, "instruction": INSTRUCTION})
        assert r.status_code == 200, r.text
    want = full.predict([("kidney", d) for d in docs], instruction=INSTRUCTION)
    np.testing.assert_allclose(by_index(r.json()["results"], "relevance_score"), want, atol=1e-5, rtol=0)


def test_tokens_are_counted_as_computed_and_the_estimate_counts_the_prompt_once(llm: CrossEncoder) -> None:
    """A request's tokens are its prefix once plus each document's and the suffix's tokens (what
    prefix reuse computes, not whole prompts); admission's estimate before tokenizing, with the
    characters per token of these documents, is within 25% of that, and far below whole prompts."""
    from tailrank.serve.validate import RerankSpec, tokenize_pairs

    docs = docs_of(9, 50)
    q = "insulin and glucose"
    spec = RerankSpec(q, docs, True, False, None, INSTRUCTION)
    pairs = tokenize_pairs(llm, None, spec, Limits())
    prompts = [llm.prompt_ids(q, d, instruction=INSTRUCTION) for d in docs]
    before = pairs.prompt_tokens
    assert before == llm._prompts.prompt(q, INSTRUCTION).before.size
    assert [before + int(n) for n in pairs.lengths] == [p.size for p in prompts]
    assert pairs.tokens == before + int(pairs.lengths.sum())
    whole = sum(p.size for p in prompts)
    app = create_app(llm)
    server = app.state.tailrank
    seg = llm.tokenize_documents(docs)
    server.admission.chars_per_token = sum(map(len, docs)) / sum(s.size for s in seg)
    est = server._estimate(spec, range(len(docs)))
    assert abs(est - pairs.tokens) <= 0.25 * pairs.tokens, (est, pairs.tokens)
    assert est < whole / 2


def test_the_openapi_schema_documents_the_instruction_field(llm: CrossEncoder) -> None:
    schemas = create_app(llm).openapi()["components"]["schemas"]
    for name in ("CohereRerankRequest", "TeiRerankRequest", "SearchRequest"):
        field = schemas[name]["properties"]["instruction"]
        assert {"type": "string"} in field["anyOf"] and "LLM rerankers" in field["description"], name
        assert "instruction" not in schemas[name].get("required", []), name
