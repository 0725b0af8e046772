"""Pair assembly of two builds of tailrank, interleaved in one run (a core change's speed check).

Each build runs in its own process (``PYTHONPATH`` = its package folder), alternating
baseline / candidate ``--rounds`` times, so both see the same machine load. One trial assembles
seeded pairs shaped like a rerank round: ``--queries`` queries x ``--candidates`` documents of
20-300 tokens, max_length 256, int64, once through ``assemble_multi`` (the server's call) and
once through ``assemble_from_store`` (the library's); per build and call the p50 of all trials.
Only the API both builds share is used (right truncation, no per-pair sides), plus, for the
candidate when it has it, ``keep_ends`` on every pair (left truncation, for information).

    python benchmarks/bench_assembly_ab.py --baseline /tmp/base/python --candidate python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np


def trial(args: argparse.Namespace) -> dict[str, list[float]]:
    """Runs in a child process: times per call, in seconds."""
    import tailrank
    from tailrank import DocStore, PairBatcher, PairTemplate

    rng = np.random.default_rng(args.seed)
    n = args.queries * args.candidates
    docs = [rng.integers(1000, 30000, size=int(k), dtype=np.int32) for k in rng.integers(20, 300, size=n)]
    queries = [rng.integers(1000, 30000, size=int(k), dtype=np.int32) for k in rng.integers(5, 40, size=args.queries)]
    query_index = np.repeat(np.arange(args.queries, dtype=np.int64), args.candidates)
    store = DocStore(vocab_size=30522)
    flat = np.concatenate(docs).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum([d.size for d in docs]))).astype(np.int64)
    store.add(np.arange(n, dtype=np.int64), (flat, offsets))
    ids = np.arange(args.candidates, dtype=np.int64)
    batcher = PairBatcher(PairTemplate.bert(101, 102), max_length=256, batch_tokens=16384, max_batch_size=256)
    left = np.ones(n, dtype=bool)
    has_sides = "keep_ends" in PairBatcher.assemble_multi.__code__.co_varnames
    out: dict[str, list[float]] = {"multi": [], "store": [], "multi_left": []}
    calls = {"multi": lambda: batcher.assemble_multi(queries, query_index, docs),
             "store": lambda: batcher.assemble_from_store(queries[0], store, ids)}
    if has_sides:
        calls["multi_left"] = lambda: batcher.assemble_multi(queries, query_index, docs, keep_ends=left)
    # Each result is dropped at once: every call reuses the same buffers (as in a server round).
    for i in range(args.warmup + args.iters):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                out[name].append(dt)
    print(json.dumps({"times": out, "module": tailrank.__file__}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="PYTHONPATH folder of the baseline build")
    p.add_argument("--candidate", required=True, help="PYTHONPATH folder of the candidate build")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        trial(args)
        return
    times: dict[str, dict[str, list[float]]] = {"baseline": {}, "candidate": {}}
    child = [sys.executable, os.path.abspath(__file__), "--child", "--baseline", "-", "--candidate", "-",
             "--queries", str(args.queries), "--candidates", str(args.candidates), "--iters", str(args.iters),
             "--warmup", str(args.warmup), "--seed", str(args.seed)]
    order = [("baseline", args.baseline), ("candidate", args.candidate)]
    per_round: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for r in range(args.rounds):
        for name, path in order if r % 2 == 0 else order[::-1]:  # ABBA: neither always goes first
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path), OMP_NUM_THREADS="1")
            res = json.loads(subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout)
            for k, v in res["times"].items():
                times[name].setdefault(k, []).extend(v)
            per_round[name].append(float(np.median(res["times"]["multi"])) * 1e3)
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for call in ("multi", "store", "multi_left"):
        b, c = times["baseline"].get(call, []), times["candidate"].get(call, [])
        if not c:
            continue
        row = {"call": call, "candidate_p50_ms": float(np.median(c)) * 1e3,
               "candidate_p99_ms": float(np.percentile(c, 99)) * 1e3}
        if b:
            row.update(baseline_p50_ms=float(np.median(b)) * 1e3, baseline_p99_ms=float(np.percentile(b, 99)) * 1e3,
                       ratio_p50=float(np.median(c) / np.median(b)))
        rows.append(row)
    print(json.dumps({"pairs_per_call": args.queries * args.candidates, "store_pairs": args.candidates,
                      "rounds": args.rounds, "iters": args.iters, "loadavg": load, "results": rows,
                      "multi_p50_ms_per_round": per_round}, indent=1))


if __name__ == "__main__":
    main()
