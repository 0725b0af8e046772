"""The score cache: a repeated request (hit) against a miss, and throughput on a Zipf query mix.

    PYTHONPATH=python python benchmarks/bench_cache.py --data ../shared/data/scifact \
        --model .cache/scifact-minilm-l6-ce-onnx --threads 2 --duration 60

Model: the shared cross-encoder exported with ``tailrank export`` (its max_length, 384). Every
configuration is one ``tailrank.CrossEncoder`` with ``--threads`` ONNX Runtime threads, in this
process, measured in the same run.

1. Hit vs miss: one SciFact claim with ``--candidates`` seeded random abstracts. A miss is the
   request scored from scratch (cache off); a hit is the same request once it is cached. Both
   through the library (``CrossEncoder.rank``) and through the server (``create_app``, in-process
   ASGI client, Cohere body), ``--miss-repeats`` misses and ``--hit-repeats`` hits after warm-up.
2. Zipf mix: ``--queries`` claims (queries.jsonl order), each with its own fixed seeded set of
   ``--candidates`` abstracts. Requests draw a claim with P(rank k) ~ k^-s (s = ``--zipf``; the
   rank -> claim map a seeded permutation). The same seeded request sequence is served by one
   client, one request at a time, to a cache-off and a cache-on CrossEncoder in turn (ABBA, each
   request to both) for 2 x ``--duration`` seconds, the cache cold at the start as in a server
   restarted into the traffic: requests/s over each one's own request time, pair hit rate,
   p50/p99 request latency.
3. Steady state: the pair hit rate of the first 1k/10k/100k requests of that sequence through a
   real ScoreCache (64 MiB, and 4 MiB to show LRU eviction) on the real token ids, no model; with
   the measured hit and miss times of step 1 this gives the steady-state throughput a loaded
   machine's short run cannot reach (labelled as derived, not measured).
4. Overhead: what the cache adds to a request that misses entirely (hash 100 keys, look them up,
   store 100 logits), and what a hit costs in the cache itself, ``--hit-repeats`` times.
5. Refusals (``reject``): in-process 429 latency of ``--reject-repeats`` distinct uncached
   requests (SciFact claims with their candidates) while the model is held (a blocked round) and
   the speed pinned so that every one is refused; a server with the cache on (a refusal then also
   digests the request's texts to ask the cache whether it was seen) and one with it off,
   alternating request by request in one process.
Writes ``cache.json`` and ``cache.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DEFAULT_DATA, DEFAULT_OUT, REPO_ROOT, environment, environment_line, markdown_table, write_json, write_text  # noqa: E402

from tailrank import CrossEncoder  # noqa: E402
from tailrank.bench.workload import load_corpus, sample_candidates, select_queries  # noqa: E402

DEFAULT_MODEL = str(REPO_ROOT / ".cache" / "scifact-minilm-l6-ce-onnx")


def pct_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000.0
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def hit_vs_miss(args: argparse.Namespace, query: str, docs: list[str]) -> list[dict[str, Any]]:
    rows = []
    off = CrossEncoder(args.model, threads=args.threads)
    on = CrossEncoder(args.model, threads=args.threads, cache_bytes=64 << 20)
    off.rank(query, docs)  # warm-up
    miss = timed(lambda: off.rank(query, docs), args.miss_repeats)
    on.rank(query, docs)  # stores the request
    assert on.rank(query, docs) == off.rank(query, docs)  # same ranking and scores
    hit = timed(lambda: on.rank(query, docs), args.hit_repeats)
    rows.append({"path": "library CrossEncoder.rank", "miss": pct_ms(miss), "hit": pct_ms(hit)})

    from tailrank.serve import create_app

    body = {"query": query, "documents": docs, "return_documents": False}

    async def serve(cache_bytes: int, n: int) -> list[float]:
        import httpx

        app = create_app(off, score_cache_bytes=cache_bytes, scoring_nice=0)  # same priority as the library rows
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(app.state.tailrank.wait_ready, 120)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=120) as c:
                r = await c.post("/rerank", json=body)  # warm-up (and, cache on, the store)
                assert r.status_code == 200, r.text
                out = []
                for _ in range(n):
                    t = time.perf_counter()
                    r = await c.post("/rerank", json=body)
                    out.append(time.perf_counter() - t)
                    assert r.status_code == 200
                return out

    s_miss = asyncio.run(serve(0, args.miss_repeats))
    s_hit = asyncio.run(serve(64 << 20, args.hit_repeats))
    rows.append({"path": "server POST /rerank (in-process ASGI)", "miss": pct_ms(s_miss), "hit": pct_ms(s_hit)})
    return rows


def zipf_sequence(n_queries: int, s: float, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_queries + 1, dtype=np.float64) ** -s
    ranks = rng.choice(n_queries, size=n, p=p / p.sum())
    claim_of_rank = rng.permutation(n_queries)
    return [int(claim_of_rank[r]) for r in ranks]


def zipf_mix(args: argparse.Namespace, requests: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """Cache off and on interleaved request by request (ABBA) over one seeded sequence, so load
    that changes during the run falls on both alike; each one's rate is its requests over its own
    summed request time."""
    seq = zipf_sequence(len(requests), args.zipf, 100_000, args.seed)
    configs = [("cache off", CrossEncoder(args.model, threads=args.threads, cache_bytes=0)),
               ("cache on (64 MiB)", CrossEncoder(args.model, threads=args.threads, cache_bytes=64 << 20))]
    befores = []
    for _, ce in configs:
        ce.rank(*requests[0])  # warm-up: the first request's pairs, as a miss
        if ce.score_cache is not None:
            ce.score_cache.clear()
        befores.append(ce.cache_stats())
    lat: list[list[float]] = [[], []]
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < 2 * args.duration:
        q, docs = requests[seq[i]]
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            configs[k][1].rank(q, docs)
            lat[k].append(time.perf_counter() - t)
        i += 1
    rows = []
    for (label, ce), before, ls in zip(configs, befores, lat):
        s = ce.cache_stats()
        hits = 0 if s is None or before is None else s.hits - before.hits
        looked = 0 if s is None or before is None else hits + s.misses - before.misses
        busy = float(sum(ls))
        rows.append({
            "config": label, "requests": i, "distinct_claims": len(set(seq[:i])), "seconds": busy,
            "requests_per_s": i / busy, "pair_hit_rate": hits / looked if looked else 0.0,
            "cache_entries": 0 if s is None else s.entries, "cache_bytes": 0 if s is None else s.bytes,
            **pct_ms(ls),
        })
        print(f"  {label}: {rows[-1]['requests_per_s']:.2f} req/s, hit rate {rows[-1]['pair_hit_rate']:.3f}",
              flush=True)
    return rows


def steady_state(args: argparse.Namespace, requests: list[tuple[str, list[str]]], hm: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    from tailrank import ScoreCache
    from tailrank._score_cache import pair_keys

    ce = CrossEncoder(args.model, threads=args.threads)
    keys = []
    for q, docs in requests:  # the keys the library computes: query ids, cached document ids
        (q_ids,) = ce.tokenize([q])
        keys.append(pair_keys(ce.score_fingerprint, [q_ids], None, ce.document_tokens(docs, q_ids.size)))
    seq = zipf_sequence(len(requests), args.zipf, 100_000, args.seed)
    lib = hm[0]
    t_hit, t_miss = lib["hit"]["mean_ms"], lib["miss"]["mean_ms"]
    rows = []
    for cap in (64 << 20, 4 << 20):
        cache = ScoreCache(cap, ce.n_labels)
        marks = {1_000, 10_000, 100_000}
        for n, claim in enumerate(seq, 1):
            found = cache.lookup(keys[claim])
            if found.miss.size:
                cache.store_misses(found, np.zeros((found.miss.size, ce.n_labels), np.float32))
            if n in marks:
                st = cache.stats()
                h = st.hits / (st.hits + st.misses)
                # a request's time: its hit part at the hit cost, its miss part at the miss cost
                per_req_ms = h * t_hit + (1 - h) * t_miss
                rows.append({"cache_mib": cap / 2**20, "requests": n, "distinct_claims": len(set(seq[:n])),
                             "pair_hit_rate": h, "evictions": st.evictions, "entries": st.entries,
                             "derived_requests_per_s": 1000.0 / per_req_ms,
                             "derived_speedup": t_miss / per_req_ms})
    return rows


def overhead(args: argparse.Namespace, query: str, docs: list[str]) -> dict[str, Any]:
    from tailrank import ScoreCache
    from tailrank._score_cache import pair_keys

    ce = CrossEncoder(args.model, threads=args.threads)
    (q_ids,) = ce.tokenize([query])
    toks = ce.document_tokens(docs, q_ids.size)
    logits = np.zeros((len(docs), 1), np.float32)

    def miss() -> None:
        cache = ScoreCache(64 << 20, 1)
        found = cache.lookup(pair_keys(ce.score_fingerprint, [q_ids], None, toks))
        cache.store_misses(found, logits)

    warm = ScoreCache(64 << 20, 1)
    warm.store(pair_keys(ce.score_fingerprint, [q_ids], None, toks), logits)
    hit = timed(lambda: warm.lookup(pair_keys(ce.score_fingerprint, [q_ids], None, toks)), args.hit_repeats)
    return {"pairs": len(docs), "tokens": int(sum(t.size for t in toks)),
            "miss_overhead": pct_ms(timed(miss, args.hit_repeats)), "hit_lookup": pct_ms(hit)}


def reject_path(args: argparse.Namespace, requests: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    import threading

    import httpx

    from tailrank.serve import create_app

    model = CrossEncoder(args.model, threads=args.threads)
    release = threading.Event()
    entered = {"on": threading.Event(), "off": threading.Event()}

    def hook(name: str) -> Any:
        def held(jobs: list[Any]) -> None:
            entered[name].set()
            release.wait()
        return held

    apps = {name: create_app(model, score_cache_bytes=cache, scoring_nice=0, default_deadline_ms=10_000,
                             round_hook=hook(name)) for name, cache in (("on", 64 << 20), ("off", 0))}

    async def go() -> dict[str, list[float]]:
        from contextlib import AsyncExitStack

        times: dict[str, list[float]] = {"on": [], "off": []}
        async with AsyncExitStack() as stack:
            clients = {}
            holds = []
            for name, app in apps.items():
                await stack.enter_async_context(app.router.lifespan_context(app))
                await asyncio.to_thread(app.state.tailrank.wait_ready, 300)
                c = await stack.enter_async_context(httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120))
                clients[name] = c
                holds.append(asyncio.ensure_future(c.post("/rerank", json={"query": "hold", "documents": ["x"]})))
                await asyncio.to_thread(entered[name].wait, 120)
                app.state.tailrank.admission.tokens_per_s = 1.0  # any request would miss its deadline
            for i in range(args.reject_repeats + 5):
                query, docs = requests[1 + i % (len(requests) - 1)]
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    t = time.perf_counter()
                    r = await clients[name].post("/rerank", json={"query": query, "documents": docs})
                    dt = time.perf_counter() - t
                    assert r.status_code == 429, r.text
                    if i >= 5:  # warm-up
                        times[name].append(dt)
            release.set()
            await asyncio.gather(*holds)
        return times

    times = asyncio.run(go())
    return [{"config": f"cache {name}", "refusals": len(t), **pct_ms(t)} for name, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--model", default=DEFAULT_MODEL, help="exported ONNX model directory (tailrank export)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per Zipf configuration (the two run interleaved)")
    p.add_argument("--miss-repeats", type=int, default=10)
    p.add_argument("--hit-repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--reject-repeats", type=int, default=200)
    p.add_argument("--phases", default="hit,zipf,steady,overhead,reject", help="comma-separated subset to run")
    args = p.parse_args(argv)
    phases = set(args.phases.split(","))

    env = environment()
    corpus = load_corpus(args.data)
    rng = random.Random(args.seed)
    claims = select_queries(args.data, args.queries, None)
    requests = [(text, [corpus.texts[i] for i in sample_candidates(len(corpus.texts), args.candidates, rng)])
                for _, text in claims]
    print(environment_line(env), flush=True)
    hm = hit_vs_miss(args, *requests[0]) if "hit" in phases else []
    zm = zipf_mix(args, requests) if "zipf" in phases else []
    ss = steady_state(args, requests, hm) if "steady" in phases and hm else []
    oh = overhead(args, *requests[0]) if "overhead" in phases else None
    rj = reject_path(args, requests) if "reject" in phases else []
    load_end = [round(x, 2) for x in os.getloadavg()]
    payload = {"environment": env, "loadavg_at_end": load_end, "args": vars(args), "hit_vs_miss": hm, "zipf": zm,
               "steady_state": ss, "overhead": oh, "reject": rj}
    write_json(Path(args.out) / "cache.json", payload)
    t1 = markdown_table(
        ["path", "miss p50 ms", "miss p99 ms", "hit p50 ms", "hit p99 ms", "speed-up (p50)"],
        [[r["path"], r["miss"]["p50_ms"], r["miss"]["p99_ms"], r["hit"]["p50_ms"], r["hit"]["p99_ms"],
          f"{r['miss']['p50_ms'] / r['hit']['p50_ms']:.0f}x"] for r in hm],
    )
    t2 = markdown_table(
        ["config", "requests", "distinct claims", "requests/s", "pair hit rate", "p50 ms", "p99 ms", "cache MiB"],
        [[r["config"], r["requests"], r["distinct_claims"], r["requests_per_s"], r["pair_hit_rate"], r["p50_ms"],
          r["p99_ms"], r["cache_bytes"] / 2**20] for r in zm],
    )
    t3 = markdown_table(
        ["cache MiB", "requests", "distinct claims", "pair hit rate", "evictions", "derived req/s", "derived speed-up"],
        [[r["cache_mib"], r["requests"], r["distinct_claims"], r["pair_hit_rate"], r["evictions"],
          r["derived_requests_per_s"], f"{r['derived_speedup']:.1f}x"] for r in ss],
    )
    md = (f"{environment_line(env)}; load average at start {env['loadavg_at_start']}, at end {load_end}\n\n"
          f"{t1}\n\n{t2}\n\n{t3}\n")
    if oh is not None:
        md += (f"\ncache work per {oh['pairs']}-pair request ({oh['tokens']} document tokens): all-miss "
               f"p50 {oh['miss_overhead']['p50_ms']:.3f} ms (p99 {oh['miss_overhead']['p99_ms']:.3f}), "
               f"all-hit lookup p50 {oh['hit_lookup']['p50_ms']:.3f} ms (p99 {oh['hit_lookup']['p99_ms']:.3f})\n")
    if rj:
        md += "\n" + markdown_table(["in-process 429", "refusals", "p50 ms", "p99 ms", "mean ms"],
                                    [[r["config"], r["refusals"], r["p50_ms"], r["p99_ms"], r["mean_ms"]]
                                     for r in rj]) + "\n"
    write_text(Path(args.out) / "cache.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
