"""tailrank serve with an LLM reranker (issue 16): 4 concurrent /rerank requests, each 1 SciFact claim
x 100 SciFact abstracts with its own instruction, through the in-process ASGI app, vs the same 4
requests as sequential CrossEncoder.rank calls (the library baseline), vs the server over a
full-prompt model (prefix_reuse=False). Same model, data, max_length and threads for all.

    PYTHONPATH=python python benchmarks/bench_serve_llm.py --threads 2 --reps 3 --work .cache/bench-llm

The model is bench_llm_rerank.py's seeded Qwen3-architecture reranker (built in --work when
missing). Systems run interleaved, rotating order per round, after one untimed warm-up each;
``uptime`` is recorded before and after. Also counted (no clock): tokens per request as the
server's budget counts them (prefix once + document/suffix rows) vs whole prompts, and the
prefix-graph runs per round.
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
from _common import DEFAULT_DATA, DEFAULT_OUT, environment, markdown_table, write_json, write_text  # noqa: E402
from bench_llm_rerank import MAX_LENGTH, build, scifact, uptime  # noqa: E402

INSTRUCTIONS = [
    "Given a web search query, retrieve relevant passages that answer the query",
    "Given a scientific claim, retrieve documents that support or refute the claim",
    "Find the abstract whose findings bear on the claim",
    "Judge whether the study measures what the claim is about",
]


async def served(app: Any, bodies: list[dict[str, Any]]) -> tuple[float, list[float]]:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=600) as c:
        async def one(body: dict[str, Any]) -> float:
            t = time.perf_counter()
            r = await c.post("/rerank", json=body)
            assert r.status_code == 200, r.text
            return time.perf_counter() - t

        t0 = time.perf_counter()
        lat = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, list(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--work", default=".cache/bench-llm")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from tailrank import CrossEncoder
    from tailrank.serve import create_app
    from tailrank.serve.validate import Limits, RerankSpec, tokenize_pairs

    abstracts, claims = scifact(args.data)
    _, out = build(Path(args.work), abstracts)
    load0 = uptime()
    kw = dict(threads=args.threads, max_length=MAX_LENGTH, spin=False)
    reuse = CrossEncoder(out, **kw)
    full = CrossEncoder(out, prefix_reuse=False, **kw)
    apps = {name: create_app(m, scoring_nice=0, default_deadline_ms=600_000, score_cache_bytes=0,
                             max_batch_tokens=64 * MAX_LENGTH)
            for name, m in (("served, prefix reuse", reuse), ("served, full prompt", full))}
    rng = random.Random(args.seed)

    def request_set() -> list[dict[str, Any]]:
        return [{"query": rng.choice(claims), "documents": rng.sample(abstracts, 100), "instruction": inst}
                for inst in INSTRUCTIONS]

    # Counted: the server's tokens for one request vs its whole prompts.
    b = request_set()[1]
    spec = RerankSpec(b["query"], b["documents"], True, False, None, b["instruction"])
    pairs = tokenize_pairs(reuse, None, spec, Limits())
    whole = sum(reuse.prompt_ids(b["query"], d, instruction=b["instruction"]).size for d in b["documents"])
    counted = {"prefix_tokens": pairs.prompt_tokens, "request_tokens": pairs.tokens, "whole_prompt_tokens": whole}
    print(counted)

    async def run() -> dict[str, list[float]]:
        totals: dict[str, list[float]] = {k: [] for k in (*apps, "library, 4 sequential rank calls")}
        lats: dict[str, list[float]] = {k: [] for k in totals}
        ctxs = [a.router.lifespan_context(a) for a in apps.values()]
        for c in ctxs:
            await c.__aenter__()
        for a in apps.values():
            await asyncio.to_thread(a.state.tailrank.wait_ready, 600)
        systems = list(totals)
        for rep in range(args.reps + 1):
            bodies = request_set()
            for name in systems[rep % len(systems):] + systems[: rep % len(systems)]:
                if name in apps:
                    total, lat = await served(apps[name], bodies)
                else:
                    t0, lat = time.perf_counter(), []
                    for body in bodies:
                        t = time.perf_counter()
                        await asyncio.to_thread(reuse.rank, body["query"], body["documents"],
                                                instruction=body["instruction"])
                        lat.append(time.perf_counter() - t)
                    total = time.perf_counter() - t0
                if rep:  # rep 0 is the warm-up
                    totals[name].append(total)
                    lats[name].extend(lat)
        for c in ctxs:
            await c.__aexit__(None, None, None)
        return {"totals": totals, "lats": lats}  # type: ignore[dict-item]

    got = asyncio.run(run())
    load1 = uptime()
    base = float(np.median(got["totals"]["library, 4 sequential rank calls"]))
    rows = []
    for name, totals in got["totals"].items():
        lat = np.asarray(got["lats"][name]) * 1000
        rows.append({"system": name, "4 requests p50 s": round(float(np.median(totals)), 2),
                     "request p50 ms": round(float(np.percentile(lat, 50))),
                     "request p99 ms": round(float(np.percentile(lat, 99))),
                     "vs library": f"{float(np.median(totals)) / base:.2f}x"})
    result = {"environment": environment(), "threads": args.threads, "reps": args.reps, "max_length": MAX_LENGTH,
              "uptime_before": load0, "uptime_after": load1, "counted": counted, "rows": rows}
    table = markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    print(table)
    print("load:", load0, "->", load1)
    outdir = Path(args.out)
    write_json(outdir / "serve_llm.json", result)
    write_text(outdir / "serve_llm.md", table)


if __name__ == "__main__":
    main()
