"""tailrank serve: both rerank dialects, the Cohere SDK, auth, limits, bad input, overload,
failing batches, deadlines, metrics, cross-request batching and search, on a real small model
through an in-process ASGI client (and once through uvicorn for the SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import models

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tailrank import CrossEncoder  # noqa: E402
from tailrank.serve import Limits  # noqa: E402
from tailrank.serve import create_app as serve_app  # noqa: E402
from tailrank.serve.loadgen import arrival_times, run_open_loop_async, summarize  # noqa: E402

KEY = "test-key-5"


def create_app(model: Any, **kw: Any) -> Any:
    """The app as these tests build it: scoring at normal priority (a SCHED_IDLE scorer gets no
    CPU at all while other processes keep both cores busy) and no default deadline that a busy
    machine could reach; the tests of those defaults pass them explicitly."""
    kw.setdefault("scoring_nice", 0)
    kw.setdefault("default_deadline_ms", 600_000)
    return serve_app(model, **kw)


@pytest.fixture(scope="module")
def ce(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoder:
    _, model_dir = models.exported(tmp_path_factory, "bert", 1)
    return CrossEncoder(model_dir, threads=1)


def texts(seed: int, n: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [models.sample_text(rng, rng.randint(1, words)) for _ in range(n)]


@contextlib.contextmanager
def client(app: Any, **kw: Any) -> Iterator[TestClient]:
    with TestClient(app, **kw) as c:
        assert app.state.tailrank.wait_ready(60)
        yield c


@contextlib.asynccontextmanager
async def async_client(app: Any) -> AsyncIterator[Any]:
    """Concurrent requests in one event loop (the app's lifespan run by hand)."""
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(app.state.tailrank.wait_ready, 60)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tailrank") as c:
            yield c


@dataclass
class Gated:
    """The real model, counting its calls; call number ``block_call`` (1-based) waits for
    ``release`` first (a model that is still busy, without timing anything); optionally failing
    on any batch holding the token ``poison``."""

    ce: CrossEncoder
    block_call: int | None = None
    poison: int | None = None
    failed_rounds: int = 0
    calls: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    blocked: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.max_length = self.ce.max_length
        self.n_labels = self.ce.n_labels
        self.batch_tokens = self.ce.batch_tokens

    def batcher(self, max_batch_size: int | None = None) -> Any:
        return self.ce.batcher(max_batch_size)

    def tokenize(self, texts: list[str]) -> Any:
        return self.ce.tokenize(texts)

    def document_tokens(self, texts: list[str], query_len: int = 0) -> Any:
        return self.ce.document_tokens(texts, query_len)

    def scores_from_logits(self, logits: Any, *, raw: bool = False) -> Any:
        return self.ce.scores_from_logits(logits, raw=raw)

    def score_assembly(self, assembly: Any, *, deadline: float | None = None) -> Any:
        if self.poison is not None and any((b.input_ids == self.poison).any() for b in assembly.batches):
            self.failed_rounds += 1
            raise RuntimeError("injected failure")
        self.calls += 1
        if self.calls == self.block_call:
            self.blocked.set()
            assert self.release.wait(60)
        return self.ce.score_assembly(assembly, deadline=deadline)


def gauge(app: Any, name: str) -> float:
    value = app.state.tailrank.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else float(value)


def queued_requests(app: Any) -> int:
    """Requests admitted and not yet answered (the server's own count)."""
    return int(gauge(app, "tailrank_queue_requests"))


async def until(predicate: Any, what: str) -> None:
    """Waits for a state of the server (not for a time); the bound only turns a hang into a failure."""
    for _ in range(12_000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the server never reached: {what}")


@dataclass
class Rounds:
    """A round hook: records each round's jobs; can hold rounds until released."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    sizes: list[int] = field(default_factory=list)
    queries: list[list[tuple[int, ...]]] = field(default_factory=list)

    def __call__(self, jobs: list[Any]) -> None:
        self.sizes.append(len(jobs))
        self.queries.append([tuple(j.queries[0].tolist()) for j in jobs])
        self.entered.set()
        assert self.gate.wait(30)


async def hold_and_fill(c: Any, app: Any, rounds: Rounds) -> tuple[Any, Any]:
    """Holds one /rerank round in ``rounds`` and fills the round that forms while it runs, so that
    requests sent next all wait for the same, later round. Returns the two requests in flight."""
    held = asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "texts": ["x"]}))
    await asyncio.to_thread(rounds.entered.wait, 30)
    filler = asyncio.ensure_future(c.post("/rerank", json={"query": "fill", "texts": ["y"]}))
    lane = app.state.tailrank.queue._lanes["rerank"]
    await until(lambda: lane.slot is not None, "the filler's round assembled")
    return held, filler


class Leaving:
    """A raw ASGI POST of ``payload`` whose client disconnects when told to (after its body was
    read); ``messages`` are what the app sent it."""

    def __init__(self, app: Any, path: str, payload: dict[str, Any]) -> None:
        self.leave = asyncio.Event()
        self.messages: list[dict[str, Any]] = []
        body = json.dumps(payload).encode()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self.leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            self.messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "client": ("t", 1), "server": ("t", 80)}
        self.call = asyncio.ensure_future(app(scope, receive, send))

    async def disconnect(self) -> None:
        """The client leaves; returns once the app has answered."""
        self.leave.set()
        await self.call


def ranked(ce: CrossEncoder, query: str, docs: list[str]) -> list[tuple[int, float]]:
    return [(h["corpus_id"], h["score"]) for h in ce.rank(query, docs)]


# --- dialects -----------------------------------------------------------------------------


def test_cohere_dialect_matches_rank(ce: CrossEncoder) -> None:
    docs = texts(1, 9)
    want = ranked(ce, "cancer risk in mice", docs)
    with client(create_app(ce)) as c:
        for path, version in (("/rerank", "2"), ("/v1/rerank", "1"), ("/v2/rerank", "2")):
            body = {"model": "any-name", "query": "cancer risk in mice", "documents": docs[:4] + [{"text": d} for d in docs[4:]]}
            r = c.post(path, json={**body, "top_n": 4, "return_documents": True})
            assert r.status_code == 200, r.text
            out = r.json()
            assert [x["index"] for x in out["results"]] == [i for i, _ in want[:4]]
            np.testing.assert_allclose([x["relevance_score"] for x in out["results"]], [s for _, s in want[:4]], atol=1e-5)
            assert [x["document"]["text"] for x in out["results"]] == [docs[i] for i, _ in want[:4]]
            assert out["meta"]["api_version"]["version"] == version and out["meta"]["degraded"] is False
            assert out["meta"]["model"] == "any-name" and out["meta"]["billed_units"]["search_units"] == 1
            assert r.headers["X-Tailrank-Degraded"] == "false"
            for h in ("X-Tokenize-Time", "X-Queue-Time", "X-Score-Time", "X-Total-Time"):
                assert float(r.headers[h]) >= 0
        full = c.post("/rerank", json=body).json()["results"]
        assert len(full) == len(docs) and all("document" not in x for x in full)
        assert c.post("/rerank", json={"query": "q", "documents": []}).json()["results"] == []
        # Cohere v1 rank_fields: objects ranked on the named fields.
        r = c.post("/v1/rerank", json={"query": "q", "documents": [{"title": "cells", "body": "x"}], "rank_fields": ["title"]})
        assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_tei_dialect(ce: CrossEncoder) -> None:
    docs = texts(2, 7)
    want = ranked(ce, "immune response", docs)
    with client(create_app(ce)) as c:
        r = c.post("/rerank", json={"query": "immune response", "texts": docs, "return_text": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert isinstance(out, list) and [x["index"] for x in out] == [i for i, _ in want]
        np.testing.assert_allclose([x["score"] for x in out], [s for _, s in want], atol=1e-5)
        assert [x["text"] for x in out] == [docs[x["index"]] for x in out]
        raw = c.post("/v1/rerank", json={"query": "immune response", "texts": docs, "raw_scores": True}).json()
        assert [x["index"] for x in raw] == [i for i, _ in want] and "text" not in raw[0]
        np.testing.assert_allclose(1 / (1 + np.exp(-np.array([x["score"] for x in raw]))), [s for _, s in want], atol=1e-5)


def test_tei_truncation(ce: CrossEncoder) -> None:
    filler = " ".join(["cells"] * 120)  # far past the model's 64 positions
    docs = [filler + " cancer tumor", filler + " sleep memory"]
    with client(create_app(ce)) as c:
        r = c.post("/rerank", json={"query": "q", "texts": docs, "truncate": False})
        assert r.status_code == 413 and "at most 64" in r.json()["detail"]
        right = c.post("/rerank", json={"query": "q", "texts": docs, "truncate": True}).json()
        assert right[0]["score"] == pytest.approx(right[1]["score"], abs=1e-6)  # the same kept start
        left = c.post("/rerank", json={"query": "q", "texts": docs, "truncation_direction": "Left"}).json()
        assert abs(left[0]["score"] - left[1]["score"]) > 1e-4  # the different ends are kept
        want = ranked(ce, "q", [" ".join(["cells"] * 58) + " cancer tumor"])[0][1]  # 64 - 3 specials - 1 query token
        assert next(x["score"] for x in left if x["index"] == 0) == pytest.approx(want, abs=1e-5)
        # Cohere's max_tokens_per_doc cuts documents before pairing.
        r = c.post("/rerank", json={"query": "q", "documents": docs, "max_tokens_per_doc": 3})
        assert r.json()["results"][0]["relevance_score"] == pytest.approx(ranked(ce, "q", ["cells cells cells"])[0][1], abs=1e-5)


def test_left_truncation_is_the_cores_and_scores_as_the_pre_cut_pairs(ce: CrossEncoder) -> None:
    """TEI's truncation_direction left, cut by the core's assembly: each score equals the library's
    score of the pair pre-cut to its ends (as many tokens as the core's rule keeps, query and
    document), while a right-truncated request of the same texts shares the round; repeats are
    answered from the score cache with their own side's scores (the two sides are keyed apart)."""
    rng = random.Random(14)
    query = models.sample_text(rng, 40)  # long enough that the query is cut too
    docs = [models.sample_text(rng, 120), models.sample_text(rng, 90), "short one", models.sample_text(rng, 70)]
    rounds = Rounds()
    app = create_app(ce, round_hook=rounds, max_batch_tokens=16 * ce.max_length)  # both requests fit one round
    left_body = {"query": query, "texts": docs, "truncation_direction": "left", "raw_scores": True}
    right_body = {"query": query, "texts": docs, "raw_scores": True}

    async def go() -> tuple[Any, Any, Any, Any]:
        async with async_client(app) as c:
            held, filler = await hold_and_fill(c, app, rounds)
            left = asyncio.ensure_future(c.post("/rerank", json=left_body))
            right = asyncio.ensure_future(c.post("/rerank", json=right_body))
            await until(lambda: queued_requests(app) == 4, "both requests queued behind the held one")
            rounds.gate.set()
            assert (await held).status_code == 200 and (await filler).status_code == 200
            first = await left, await right
            again = await c.post("/rerank", json=left_body), await c.post("/rerank", json=right_body)
            return (*first, *again)

    left, right, left2, right2 = asyncio.run(go())
    assert rounds.sizes[:3] == [1, 1, 2]  # the left and the right request in one round
    q = ce.tokenize([query])[0]
    rules = ce.batcher()
    want_left, want_right = [], []
    for d in ce.tokenize(docs):
        kq, kd = rules.truncate_lengths(q.size, d.size)
        logits, _ = ce.score_tokens(q[q.size - kq :], [d[d.size - kd :]])
        want_left.append(float(ce.scores_from_logits(logits, raw=True)[0]))
        logits, _ = ce.score_tokens(q, [d])
        want_right.append(float(ce.scores_from_logits(logits, raw=True)[0]))
    assert rules.truncate_lengths(q.size, ce.tokenize([docs[0]])[0].size)[0] < q.size  # the query was cut

    def by_index(r: Any) -> list[float]:
        assert r.status_code == 200, r.text
        return [x["score"] for x in sorted(r.json(), key=lambda x: x["index"])]

    np.testing.assert_allclose(by_index(left), want_left, atol=1e-5)
    np.testing.assert_allclose(by_index(right), want_right, atol=1e-5)
    assert abs(want_left[0] - want_right[0]) > 1e-4  # the sides differ where pairs are cut
    assert by_index(left2) == by_index(left) and by_index(right2) == by_index(right)
    stats = app.state.tailrank.score_cache.cache.stats()
    # The short pair fits: one key for both sides; every cut pair is keyed per side (+ hold, filler).
    assert (stats.entries, stats.hits) == (2 * len(docs) - 1 + 2, 2 * len(docs))


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free 127.0.0.1 port (in a thread); yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(12_000):  # another thread's start-up: nothing to block on
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        assert app.state.tailrank.wait_ready(120)  # 503 until the model is calibrated
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_cohere_sdk_round_trip(ce: CrossEncoder) -> None:
    cohere = pytest.importorskip("cohere")

    docs = texts(3, 6)
    want = ranked(ce, "protein binding", docs)
    with live_server(create_app(ce, api_key=KEY)) as base:
        with httpx.Client() as http:  # closed here: the SDK leaves its own clients' sockets open
            v2 = cohere.ClientV2(api_key=KEY, base_url=base, httpx_client=http).rerank(
                model="m", query="protein binding", documents=docs, top_n=3
            )
            assert [x.index for x in v2.results] == [i for i, _ in want[:3]]
            assert v2.results[0].relevance_score == pytest.approx(want[0][1], abs=1e-5)
            v1 = cohere.Client(api_key=KEY, base_url=base, httpx_client=http).rerank(
                model="m", query="protein binding", documents=docs, top_n=2, return_documents=True
            )
            assert [x.index for x in v1.results] == [i for i, _ in want[:2]]
            assert v1.results[0].document.text == docs[want[0][0]]
            with pytest.raises(cohere.errors.UnauthorizedError):
                cohere.ClientV2(api_key="wrong", base_url=base, httpx_client=http).rerank(
                    model="m", query="q", documents=["a"]
                )


# --- security, limits, bad input -------------------------------------------------------------


def test_auth(ce: CrossEncoder) -> None:
    body = {"query": "q", "texts": ["a b"]}
    with client(create_app(ce, api_key=KEY)) as c:
        assert c.get("/health").status_code == 200
        for method, path in (("get", "/ready"), ("get", "/metrics"), ("get", "/openapi.json"), ("post", "/rerank")):
            r = getattr(c, method)(path, **({"json": body} if method == "post" else {}))
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
        assert c.post("/rerank", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/rerank", json=body, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
        assert c.post("/rerank", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with client(create_app(ce)) as c:
        assert c.post("/rerank", json=body).status_code == 200
        assert c.get("/metrics").status_code == 200


def test_limits(ce: CrossEncoder) -> None:
    limits = Limits(max_documents=3, max_document_chars=50, max_query_chars=20, max_request_tokens=40, max_body_bytes=2000)
    with client(create_app(ce, limits=limits)) as c:
        cases = [
            ({"query": "q", "documents": ["a", "b", "c", "d"]}, "the limit is 3"),
            ({"query": "q", "texts": ["a", "x" * 51]}, "the limit is 50"),
            ({"query": "q" * 21, "texts": ["a"]}, "the limit is 20"),
            ({"query": "q", "texts": ["a " * 10] * 3}, "the limit is 40"),  # 3 x (10 + 1 + 3) tokens
            ({"query": "q", "texts": ["a" * 40] * 60}, "2000 bytes"),
        ]
        for body, message in cases:
            r = c.post("/rerank", json=body)
            assert r.status_code == 413 and message in r.json()["detail"], (r.status_code, r.text)
        # A body streamed without Content-Length is counted as it arrives.
        chunks = (b'{"query": "q", "texts": ["' + b"a" * 500 + b'"]' for _ in range(10))
        r = c.post("/rerank", content=chunks, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "2000 bytes" in r.json()["detail"]
        assert c.post("/rerank", json={"query": "q", "texts": ["a", "b"]}).status_code == 200


@pytest.mark.parametrize(
    "body, headers",
    [
        (b"{not json", {}),
        (b"[1, 2]", {}),
        (b'"text"', {}),
        (b"", {}),
        (b'{"query": 1, "documents": ["a"]}', {}),
        (b'{"query": "q", "documents": [1]}', {}),
        (b'{"query": "q", "documents": [{"title": "no text"}]}', {}),
        (b'{"query": "q", "documents": ["a"], "top_n": 0}', {}),
        (b'{"query": "q", "documents": ["a"], "top_n": "2"}', {}),
        (b'{"query": "q", "documents": "a"}', {}),
        (b'{"query": "q"}', {}),
        (b'{"query": "q", "texts": [null]}', {}),
        (b'{"query": "q", "texts": ["a"], "truncation_direction": "Up"}', {}),
        (b'{"query": "q", "texts": ["a"], "deadline_ms": -5}', {}),
        (b'{"query": "q", "texts": ["a"]}', {"X-Request-Timeout-Ms": "soon"}),
        (b'{"query": "q", "texts": ["a"]}', {"X-Request-Timeout-Ms": "1e12"}),
        (b'{"query": "q", "texts": ["a"]}', {"Content-Length": "x"}),
    ],
)
def test_malformed_requests_get_4xx(ce: CrossEncoder, body: bytes, headers: dict[str, str]) -> None:
    with client(create_app(ce)) as c:
        r = c.post("/rerank", content=body, headers={"Content-Type": "application/json", **headers})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert "detail" in r.json()
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_strings_the_core_cannot_encode_get_4xx_naming_the_field(ce: CrossEncoder, collection: Any, path: str
                                                                  ) -> None:
    """Lone surrogates are valid JSON (``"\\ud800"``) but not Unicode: 422 naming the field, in both
    dialects and /search; NUL is an ordinary character; an oversized string is 413."""
    with client(create_app(ce, collection=collection, limits=Limits(max_query_chars=50))) as c:
        cases = [
            (b'{"query": "q\\ud800", "texts": ["a"]}', "the query"),
            (b'{"query": "q", "texts": ["a", "b\\udfff c"]}', "texts[1]"),
            (b'{"query": "\\udc00", "documents": ["a"]}', "the query"),
            (b'{"query": "q", "documents": ["a", {"text": "\\ud800"}]}', "documents[1]"),
            (b'{"query": "q", "documents": [{"t": "\\ud800x"}], "rank_fields": ["t"]}', "documents[0]"),
        ]
        for body, field_name in cases:
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (body, r.status_code, r.text)
            assert field_name in r.json()["detail"] and "lone surrogate" in r.json()["detail"], r.text
        r = c.post("/search", content=b'{"query": "x\\ud800"}', headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "the query" in r.json()["detail"], r.text
        r = c.post("/search", content=b'{"query": "x", "filter": {"a": "\\ud800"}}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "filter value" in r.json()["detail"], r.text
        r = c.post(path, json={"query": "q\x00", "texts": ["a\x00b"]})
        assert r.status_code == 200 and len(r.json()) == 1, r.text
        r = c.post(path, json={"query": "q" * 51, "texts": ["a"]})
        assert r.status_code == 413 and "the query has 51 characters" in r.json()["detail"], r.text


# --- scheduling: overload, failures, deadlines, batching ---------------------------------------


def request_tokens(ce: CrossEncoder, query: str, docs: list[str]) -> tuple[int, float]:
    """Real tokens of a request's pairs after truncation, and its characters per token as the
    server's estimate counts them (the query once per pair)."""
    q = ce.tokenize([query])[0]
    n_special = int(ce.batcher().template.n_special)
    raw = np.array([q.size + d.size for d in ce.document_tokens(docs, q.size)])
    tokens = int((np.minimum(raw, ce.max_length - n_special) + n_special).sum())
    return tokens, (len(query) * len(docs) + sum(map(len, docs))) / float(raw.sum())


def pin_estimates(app: Any, *, tokens_per_s: float, chars_per_token: float) -> None:
    """Pins the server's measured speeds (what admission estimates from) to known values."""
    admission = app.state.tailrank.admission
    admission.tokens_per_s = tokens_per_s
    admission.chars_per_token = chars_per_token


def test_overload_refuses_what_cannot_meet_its_deadline_and_serves_the_rest(ce: CrossEncoder) -> None:
    """Counts, not times: while the model is busy (a held round) and its speed is pinned to 15 s
    per request, a 60 s deadline admits exactly 3 of 10 identical requests; the other 7 are
    answered 429 with Retry-After while the model is still busy (they never wait for compute),
    and the 3 admitted are then ranked in full."""
    rounds = Rounds()
    app = create_app(ce, default_deadline_ms=60_000, round_hook=rounds)
    docs = texts(4, 40, words=20)
    tokens, chars_per_token = request_tokens(ce, "risk", docs)

    async def go() -> tuple[list[Any], list[Any], int]:
        async with async_client(app) as c:
            hold = asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "texts": ["x"]}))
            await asyncio.to_thread(rounds.entered.wait, 30)
            pin_estimates(app, tokens_per_s=tokens / 15.0, chars_per_token=chars_per_token)
            calls = [asyncio.ensure_future(c.post("/rerank", json={"query": "risk", "texts": docs}))
                     for _ in range(10)]
            await until(lambda: sum(t.done() for t in calls) == 7, "7 refusals while the model is busy")
            queued = queued_requests(app)
            refused = [t.result() for t in calls if t.done()]
            rounds.gate.set()
            served = [r for r in await asyncio.gather(*calls) if r not in refused]
            assert (await hold).status_code == 200
            return refused, served, queued

    refused, served, queued = asyncio.run(go())
    assert queued == 1 + 3  # the held request and the 3 admitted
    for r in refused:
        assert r.status_code == 429 and r.json()["error_type"] == "deadline", r.text
        assert int(r.headers["Retry-After"]) >= 1 and "server-timing" in r.headers
    want = ranked(ce, "risk", docs)
    assert len(served) == 3
    for r in served:
        assert r.status_code == 200 and r.headers["X-Tailrank-Degraded"] == "false", r.text
        assert [x["index"] for x in r.json()] == [i for i, _ in want]
    text = app.state.tailrank.metrics.render().decode()
    assert 'tailrank_rejections_total{reason="deadline"} 7.0' in text


def test_a_cached_request_is_never_refused_for_queue_time_it_would_not_use(ce: CrossEncoder) -> None:
    """Counts, not times: the model is busy (a held round) and its speed pinned so that any
    uncached request would miss its 60 s deadline. A repeat of a request whose pairs are all in
    the score cache is answered 200 from it (no round runs, no refusal counted, one cache
    admission); the same texts with one more document, and new texts, are refused 429."""
    rounds = Rounds()
    rounds.gate.set()
    app = create_app(ce, default_deadline_ms=60_000, round_hook=rounds)
    docs = texts(6, 30, words=20)
    tokens, chars_per_token = request_tokens(ce, "memory", docs)
    body = {"query": "memory", "texts": docs}

    async def go() -> tuple[Any, ...]:
        async with async_client(app) as c:
            first = await c.post("/rerank", json=body)  # scored and cached
            rounds.gate.clear()
            rounds.entered.clear()
            hold = asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "texts": ["x"]}))
            await asyncio.to_thread(rounds.entered.wait, 30)
            pin_estimates(app, tokens_per_s=tokens / 120.0, chars_per_token=chars_per_token)
            n_rounds = len(rounds.sizes)
            new = await c.post("/rerank", json={"query": "memory", "texts": texts(7, 30, words=20)})
            more = await c.post("/rerank", json={"query": "memory", "texts": [*docs, "one more document"]})
            again = await c.post("/rerank", json=body)
            rounds_during = len(rounds.sizes) - n_rounds
            rounds.gate.set()
            assert (await hold).status_code == 200
            return first, new, more, again, rounds_during

    first, new, more, again, rounds_during = asyncio.run(go())
    for refused in (new, more):
        assert refused.status_code == 429 and refused.json()["error_type"] == "deadline", refused.text
    assert again.status_code == 200, again.text
    assert again.json() == first.json() and again.headers["X-Tailrank-Degraded"] == "false"
    assert rounds_during == 0  # answered without compute while the model was held
    metrics = app.state.tailrank.metrics
    assert metrics.registry.get_sample_value("tailrank_rejections_total", {"reason": "deadline"}) == 2
    assert metrics.registry.get_sample_value("tailrank_cache_admitted_total") == 1
    stats = app.state.tailrank.score_cache.cache.stats()
    assert stats.hits == len(docs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_scoring_runs_idle_class_by_default_and_the_gil_switches_faster(ce: CrossEncoder) -> None:
    me = os.sched_getscheduler(0)
    interval = sys.getswitchinterval()
    app = serve_app(ce)  # the defaults themselves
    with client(app) as c:
        assert os.sched_getscheduler(app.state.tailrank.executors["rerank"].thread.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(app.state.tailrank.queue.thread.native_id) == os.SCHED_IDLE  # the batcher
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        r = c.post("/rerank", json={"query": "risk", "texts": ["a risk", "none"]})
        assert r.status_code == 200 and len(r.json()) == 2
    assert os.sched_getscheduler(0) == me  # the loop (the caller here) keeps its class
    assert sys.getswitchinterval() == interval  # restored at shutdown
    with client(create_app(ce, gil_switch_interval_s=None)):
        assert sys.getswitchinterval() == interval
    for bad in ("low", -1, 20, 2.5, True):
        with pytest.raises(ValueError, match="scoring_nice"):
            create_app(ce, scoring_nice=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gil_switch_interval_s"):
        create_app(ce, gil_switch_interval_s=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_scoring_runs_below_the_event_loop(ce: CrossEncoder) -> None:
    """The executor thread lowers its own priority; the loop (the caller here) keeps its own."""
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    app = create_app(ce, scoring_nice=4)
    with client(app) as c:
        thread = app.state.tailrank.executors["rerank"].thread
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(19, me + 4)
        assert c.post("/rerank", json={"query": "risk", "texts": ["a risk", "none"]}).status_code == 200
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
    app = create_app(ce, scoring_nice=0)
    with client(app):
        assert os.getpriority(os.PRIO_PROCESS, app.state.tailrank.executors["rerank"].thread.native_id) == me


def test_failing_batch_fails_exactly_its_requests(ce: CrossEncoder) -> None:
    (poison,) = ce.tokenize(["vaccine"])[0].tolist()
    model = Gated(ce, poison=poison)
    rounds = Rounds()
    app = create_app(model, max_batch_tokens=model.max_length * 2, round_hook=rounds)
    words = [w for w in models.WORDS if w != "vaccine"]
    queries = [f"{words[2 * i]} {words[2 * i + 1]}" for i in range(8)]
    poisoned = {1, 5}

    def body(i: int) -> dict[str, Any]:
        docs = texts(10 + i, 3, words=6)
        return {"query": queries[i], "texts": docs + (["vaccine trial"] if i in poisoned else [])}

    async def go() -> list[Any]:
        async with async_client(app) as c:
            first = asyncio.ensure_future(c.post("/rerank", json=body(0)))
            await asyncio.to_thread(rounds.entered.wait, 30)  # the executor now holds round 1
            rest = [asyncio.ensure_future(c.post("/rerank", json=body(i))) for i in range(1, 8)]
            await until(lambda: queued_requests(app) == 8, "7 requests queued behind the held round")
            rounds.gate.set()
            out = await asyncio.gather(first, *rest)
            out.append(await c.get("/health"))
            out.append(await c.post("/rerank", json=body(2)))  # still serving
            return out

    *responses, health, after = asyncio.run(go())
    assert health.status_code == 200 and after.status_code == 200
    assert model.failed_rounds >= 1
    tokens = {i: tuple(ce.tokenize([q])[0].tolist()) for i, q in enumerate(queries)}
    failed_rounds = [qs for qs in rounds.queries if any(tokens[i] in qs for i in poisoned)]
    in_failed = {i for i in range(8) if any(tokens[i] in qs for qs in failed_rounds)}
    assert in_failed >= poisoned
    for i, r in enumerate(responses):
        if i in in_failed:
            assert r.status_code == 500 and "RuntimeError: injected failure" in r.json()["detail"], (i, r.text)
        else:
            assert r.status_code == 200, (i, r.text)
    assert max(rounds.sizes) >= 2  # the held-up requests were batched together


def test_cross_request_batching_mixes_requests_and_keeps_each_ranking(ce: CrossEncoder) -> None:
    rounds = Rounds()
    app = create_app(ce, round_hook=rounds)
    requests = [(f"{models.WORDS[30 + i]} risk", texts(20 + i, 5, words=8)) for i in range(6)]

    async def go() -> list[Any]:
        async with async_client(app) as c:
            first = asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "texts": ["x"]}))
            await asyncio.to_thread(rounds.entered.wait, 30)
            rest = [asyncio.ensure_future(c.post("/rerank", json={"query": q, "texts": d})) for q, d in requests]
            await until(lambda: queued_requests(app) == 1 + len(requests), "the requests queued behind the held one")
            rounds.gate.set()
            await first
            out = await asyncio.gather(*rest)
            out.append(await c.get("/metrics"))
            return out

    *responses, metrics = asyncio.run(go())
    assert max(rounds.sizes) >= 2, rounds.sizes
    for (q, docs), r in zip(requests, responses):
        want = ranked(ce, q, docs)
        assert [x["index"] for x in r.json()] == [i for i, _ in want]
        np.testing.assert_allclose([x["score"] for x in r.json()], [s for _, s in want], atol=1e-5)
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    samples = {s.labels.get("le"): s.value for s in families["tailrank_batch_requests"].samples if s.name.endswith("_bucket")}
    assert samples["1.0"] < samples["+Inf"]  # some round held more than one request


def test_deadline_degrades_and_says_so(ce: CrossEncoder) -> None:
    """The model's second round of a request blocks (a busy model, no timing): at its deadline the
    request is answered with the pairs of the first round ranked, the rest in input order."""
    model = Gated(ce)
    docs = texts(5, 150, words=12)  # ~2000 tokens: many rounds of 64 tokens
    with client(create_app(model, max_batch_tokens=ce.max_length)) as c:
        model.block_call = model.calls + 2
        r = c.post("/rerank", json={"query": "brain", "documents": docs}, headers={"X-Request-Timeout-Ms": "1500"})
        model.release.set()
        assert r.status_code == 200
        out = r.json()
        assert out["meta"]["degraded"] is True and r.headers["X-Tailrank-Degraded"] == "true"
        n_scored = out["meta"]["scored"]
        assert 0 < n_scored < len(docs)
        results = out["results"]
        assert len(results) == len(docs)
        scores = [x["relevance_score"] for x in results[:n_scored]]
        assert None not in scores and scores == sorted(scores, reverse=True)
        rest = results[n_scored:]
        assert all(x["relevance_score"] is None for x in rest)
        assert [x["index"] for x in rest] == sorted(x["index"] for x in rest)  # input order
        # TEI: the header says so; the body keeps its shape.
        model.release, model.block_call = threading.Event(), model.calls + 2
        r = c.post("/rerank", json={"query": "brain", "texts": docs, "deadline_ms": 1500})
        model.release.set()
        assert r.headers["X-Tailrank-Degraded"] == "true" and isinstance(r.json(), list)
        # A generous deadline ranks everything.
        r = c.post("/rerank", json={"query": "brain", "texts": docs[:10], "deadline_ms": 60_000})
        assert r.headers["X-Tailrank-Degraded"] == "false"
        text = c.get("/metrics").text
    assert "tailrank_degraded_total 2.0" in text


def test_disconnected_client_is_dropped_before_compute(ce: CrossEncoder) -> None:
    rounds = Rounds()
    app = create_app(ce, round_hook=rounds)

    async def go() -> None:
        async with async_client(app) as c:
            held = asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "texts": ["x"]}))
            await asyncio.to_thread(rounds.entered.wait, 30)
            gone = Leaving(app, "/rerank", {"query": "gone away", "texts": ["a", "b"]})
            await until(lambda: queued_requests(app) == 2, "the leaving request queued behind the held one")
            await gone.disconnect()
            rounds.gate.set()
            assert (await held).status_code == 200
            assert gone.messages[0]["status"] == 499

    asyncio.run(go())
    gone = tuple(ce.tokenize(["gone away"])[0].tolist())
    assert not any(gone in qs for qs in rounds.queries)  # never computed
    assert 'tailrank_rejections_total{reason="disconnected"} 1.0' in app.state.tailrank.metrics.render().decode()


# --- ops endpoints, search, loadgen ---------------------------------------------------------


def test_health_ready_metrics(ce: CrossEncoder) -> None:
    c = TestClient(create_app(ce))  # no `with`: no lifespan, so no executor and nothing to serve
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 503
    assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 503
    with client(create_app(ce)) as c:
        assert c.get("/ready").json()["status"] == "ready"
        c.post("/rerank", json={"query": "q", "texts": texts(6, 5)})
        assert c.get("/openapi.json").json()["paths"].keys() >= {"/rerank", "/v1/rerank", "/v2/rerank", "/search"}
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    stages = {s.labels["stage"] for s in families["tailrank_request_stage_seconds"].samples}
    assert stages == {"tokenize", "queue", "score", "total"}
    for name in ("tailrank_batch_size", "tailrank_batch_tokens", "tailrank_queue_pairs", "tailrank_rejections",
                 "tailrank_http_responses", "tailrank_throughput_tokens_per_second"):
        assert name in families, name
    assert families["tailrank_batch_size"].samples[-1].value >= 1  # _sum of rows


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, ce: CrossEncoder) -> Iterator[Any]:
    from tailrank import Collection, Embedder

    emb = Embedder(models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1], threads=1)
    col = Collection.create(tmp_path_factory.mktemp("serve") / "col", embedder=emb, reranker=ce)
    rng = random.Random(11)
    col.add([models.sample_text(rng, rng.randint(4, 14)) for _ in range(60)],
            metadata=[{"year": 2000 + i % 6, "lang": ("en", "de")[i % 2]} for i in range(60)])
    yield col
    col.close()


def hits(res: Any) -> list[tuple[Any, float]]:
    return [(h.id, h.score) for h in res.hits]


def test_search_runs_through_the_queue_and_matches_the_library(ce: CrossEncoder, collection: Any) -> None:
    """/search: the query's embedding and the candidates' pairs are jobs of the same queue (the
    rerank executor's rounds hold the search's pairs); hits equal Collection.search's."""
    rounds = Rounds()
    rounds.gate.set()
    app = create_app(ce, collection=collection, round_hook=rounds, limits=Limits(max_k=20, max_filter_nodes=8))
    query_tokens = tuple(ce.tokenize(["protein binding"])[0].tolist())
    with client(app) as c:
        for body in ({"query": "protein binding", "k": 5, "candidates": 30},
                     {"query": "protein binding", "k": 4, "candidates": 20, "filter": {"lang": "en"}}):
            want = collection.search(body["query"], k=body["k"], candidates=body["candidates"], filter=body.get("filter"))
            r = c.post("/search", json=body, headers={"X-Request-Timeout-Ms": "60000"})
            assert r.status_code == 200, r.text
            out = r.json()
            assert [h["id"] for h in out["hits"]] == want.ids()
            np.testing.assert_allclose([h["score"] for h in out["hits"]], [h.score for h in want.hits], atol=1e-5)
            assert all(h["reranked"] for h in out["hits"]) and out["degraded"] is False
            assert r.headers["X-Tailrank-Degraded"] == "false"
            for stage in ("Embed", "Ann", "Queue", "Score", "Total"):
                assert float(r.headers[f"X-{stage}-Time"]) >= 0
        assert any(query_tokens in qs for qs in rounds.queries)  # its pairs were a rerank round
        first = c.post("/search", json={"query": "protein binding", "k": 3, "rerank": False}).json()
        assert [h["id"] for h in first["hits"]] == collection.search("protein binding", k=3, rerank=False).ids()
        assert not any(h["reranked"] for h in first["hits"])
        for body, status, message in [
            ({"query": "q", "filter": {"lang": {"$regex": "e"}}}, 422, "$regex"),
            ({"query": "q", "k": 21}, 413, "k is 21; the limit is 20"),
            ({"query": "q", "candidates": 5000}, 413, "candidates is 5000"),
            ({"query": "q", "filter": {"$or": [{"a": i} for i in range(5)]}}, 413, "the filter has"),
            ({"query": "q", "k": "3"}, 422, "k"),
        ]:
            r = c.post("/search", json=body)
            assert r.status_code == status and message in r.json()["detail"], (body, r.text)
        # fusion fields reach the staged search by keyword; out-of-range ones are 422 before it
        body = {"query": "protein binding", "k": 5, "candidates": 30, "fusion": "linear", "fusion_weight": 0.25}
        want = collection.search("protein binding", k=5, candidates=30, fusion="linear", fusion_weight=0.25)
        r = c.post("/search", json=body, headers={"X-Request-Timeout-Ms": "60000"})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["hits"]] == want.ids()
        np.testing.assert_allclose([h["score"] for h in r.json()["hits"]], [h.score for h in want.hits], atol=1e-5)
        for bad in ({"fusion": "max"}, {"fusion_weight": 1.5}, {"fusion_weight": -0.1}, {"fusion": 1}, {"fusion_weight": "x"}):
            assert c.post("/search", json={"query": "q", **bad}).status_code == 422, bad
    with client(create_app(ce)) as c:
        assert c.post("/search", json={"query": "q"}).status_code == 404


def test_search_degrades_at_its_deadline_from_arrival_and_is_dropped_when_the_client_leaves(
        ce: CrossEncoder, collection: Any) -> None:
    """While the rerank executor is held, a search waits in the same queue: at its deadline
    (counted from its arrival) it answers in first-stage order, degraded; a search whose client
    leaves is dropped before its pairs are computed."""
    rounds = Rounds()
    app = create_app(ce, collection=collection, round_hook=rounds)
    gone_tokens = tuple(ce.tokenize(["gone away"])[0].tolist())

    async def go() -> tuple[Any, Any, list[dict[str, Any]]]:
        async with async_client(app) as c:
            held = asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "texts": ["x"]}))
            await asyncio.to_thread(rounds.entered.wait, 30)
            late = await c.post("/search", json={"query": "protein binding", "k": 5, "candidates": 20},
                                headers={"X-Request-Timeout-Ms": "1500"})
            gone = Leaving(app, "/search", {"query": "gone away", "k": 3, "candidates": 10})
            await until(lambda: queued_requests(app) == 2, "the search's pairs queued behind the held round")
            await gone.disconnect()
            rounds.gate.set()
            return await held, late, gone.messages

    held, late, messages = asyncio.run(go())
    assert held.status_code == 200
    assert late.status_code == 200 and late.headers["X-Tailrank-Degraded"] == "true", late.text
    out = late.json()
    want = collection.search("protein binding", k=5, candidates=20, rerank=False)
    assert out["degraded"] is True and [h["id"] for h in out["hits"]] == want.ids()
    assert not any(h["reranked"] for h in out["hits"])
    assert messages[0]["status"] == 499
    assert not any(gone_tokens in qs for qs in rounds.queries)  # never computed
    text = app.state.tailrank.metrics.render().decode()
    assert 'tailrank_rejections_total{reason="disconnected"} 1.0' in text


def test_loadgen_schedule_is_seeded_poisson() -> None:
    a, b = arrival_times(200, 5, seed=3), arrival_times(200, 5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert 800 < a.size < 1200 and np.all(np.diff(a) > 0) and a[-1] < 5
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.1) and gaps.std() == pytest.approx(1 / 200, rel=0.15)
    assert not np.array_equal(a[:50], arrival_times(200, 5, seed=4)[:50])


def test_loadgen_raw_client_against_uvicorn(ce: CrossEncoder) -> None:
    """The load generator's own HTTP client, over real sockets: statuses, Server-Timing, keep-alive."""
    docs = texts(5, 4)
    # A deadline no queue of this size can miss: every request is admitted however loaded the machine.
    with live_server(create_app(ce, default_deadline_ms=600_000)) as base:
        records = asyncio.run(run_open_loop_async(
            base + "/rerank", lambda n: {"query": "risk", "texts": docs}, rate=40, duration_s=0.5, seed=2,
        ))
    assert len(records) > 8 and all(r.status == 200 and r.error is None for r in records), records
    assert all(r.server_s is not None and 0 < r.server_s <= r.latency_s for r in records)
    assert all(0 <= r.late_s <= r.latency_s for r in records)
    stats = summarize(records, duration_s=0.5)
    assert stats["send_late_p50_ms"] is not None and stats["ok"] == len(records)


def test_raw_client_reads_chunked_bodies_and_reconnects() -> None:
    """Chunked and Content-Length bodies; a kept-alive connection the server closed meanwhile (as
    uvicorn does after its keep-alive timeout) is replaced, not reported as a failure."""
    from tailrank.serve.loadgen import RawHttpClient

    requests_seen: list[bytes] = []
    closed: list[asyncio.Event] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        requests_seen.append(await reader.readexactly(length))
        if len(requests_seen) == 1:
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\nRetry-After: 1\r\n\r\n"
                         b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer-Timing: app;dur=0.5\r\n\r\nok")
        await writer.drain()
        writer.close()  # without "Connection: close": the client must notice on its next request
        await writer.wait_closed()
        closed[0].set()

    async def go() -> list[tuple[int, dict[str, str], bytes]]:
        closed.append(asyncio.Event())
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = RawHttpClient(f"http://127.0.0.1:{port}/rerank", timeout_s=10)
        try:
            first = await c.post(b'{"a": 1}', {"Content-Type": "application/json"})
            await closed[0].wait()  # the server has closed that connection
            second = await c.post(b"[2]", {})
            return [first, second]
        finally:
            await c.aclose()
            server.close()
            await server.wait_closed()

    first, second = asyncio.run(go())
    assert first[0] == 429 and first[1]["retry-after"] == "1" and first[2] == b"abcde"
    assert second == (200, {"content-length": "2", "server-timing": "app;dur=0.5"}, b"ok")
    assert requests_seen == [b'{"a": 1}', b"[2]"]
    with pytest.raises(ValueError, match="http://"):
        RawHttpClient("https://example.invalid/x")


def test_loadgen_reads_server_timing() -> None:
    from tailrank.serve.loadgen import _server_seconds

    assert _server_seconds("app;dur=1.5") == pytest.approx(0.0015)
    assert _server_seconds('app;dur=1.5, db;desc="x";dur=2') == pytest.approx(0.0035)
    assert _server_seconds("app") is None and _server_seconds("app;dur=abc") is None
    assert _server_seconds(None) is None and _server_seconds("") is None
