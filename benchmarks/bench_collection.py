#!/usr/bin/env python3
"""Collection store benchmark: write cost against collection size, ingest time, bytes written,
filtered first stage and open time / peak RSS, for the current design ("after") and the
whole-file-generation design of commit ba898a3 ("before"), in the same run.

    python benchmarks/bench_collection.py --work .cache/bench-collection --out benchmarks/results

The "before" Collection is taken from git at run time (``git show ba898a3:...collection.py``)
and imported as a private module of the installed package; nothing of it is committed here.
Vectors are seeded random 384-d float32 (embedding is excluded: ``add(..., vectors=)``), no
reranker (as in issue 13's measurement). The query embedder is the default all-MiniLM-L6-v2.
Each phase can run alone (``--phases``); results are merged into one JSON file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BEFORE_REF = "ba898a3"
DIM = 384


def load_before() -> Any:
    """The ba898a3 Collection as module ``tailrank._collection_before``."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_REF}:python/tailrank/collection.py"],
                         check=True, capture_output=True, text=True).stdout
    import tailrank

    path = Path(tempfile.mkdtemp(prefix="tailrank-before-")) / "_collection_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("tailrank._collection_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = tailrank.__name__
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.Collection


def after_cls() -> Any:
    from tailrank.collection import Collection

    return Collection


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)


def meta(i: int) -> dict[str, Any]:
    return {"grp": i % 100, "dec": i % 10}


def wchar() -> int:
    """Bytes this process handed to write() so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return -1


def build(cls: Any, path: Path, emb: Any, n: int, ef_c: int, batch: int = 100_000) -> Any:
    shutil.rmtree(path, ignore_errors=True)
    col = cls.create(path, embedder=emb, ef_construction=ef_c)
    for s in range(0, n, batch):
        m = min(batch, n - s)
        col.add([f"doc {i}" for i in range(s, s + m)], ids=list(range(s, s + m)),
                metadata=[meta(i) for i in range(s, s + m)], vectors=vectors(m, seed=s))
    return col


def settle(col: Any) -> None:
    """After a build: the new design's checkpoint of it, so measured writes do not overlap one."""
    if hasattr(col, "checkpoint"):
        t = col._ckpt_thread
        if t is not None:
            t.join()
        col.checkpoint()


def time_adds(col: Any, n0: int, reps: int, per: int = 10) -> dict[str, float]:
    times, written = [], []
    for r in range(reps):
        s = n0 + 10_000_000 + r * per
        v = vectors(per, seed=s)
        w0 = wchar()
        t = time.perf_counter()
        col.add([f"new {i}" for i in range(s, s + per)], ids=list(range(s, s + per)),
                metadata=[meta(i) for i in range(s, s + per)], vectors=v)
        times.append((time.perf_counter() - t) * 1000)
        written.append(wchar() - w0)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "median_bytes_written": statistics.median(written), "reps": reps}


def phase_write(args: argparse.Namespace, emb: Any, out: dict[str, Any]) -> None:
    res = out.setdefault("write", {})
    for n in args.sizes:
        ef_c = args.ef_construction if n < 1_000_000 else args.ef_construction_1m
        for name, cls in (("before", load_before()), ("after", after_cls())):
            path = args.work / f"w-{name}-{n}"
            t = time.perf_counter()
            col = build(cls, path, emb, n, ef_c)
            settle(col)
            built = time.perf_counter() - t
            reps = args.reps if not (name == "before" and n >= 1_000_000) else max(3, args.reps // 3)
            r = time_adds(col, n, reps) | {"build_s": built, "ef_construction": ef_c}
            if name == "after":
                t = time.perf_counter()
                col.checkpoint()
                r["checkpoint_s"] = time.perf_counter() - t
                col.close()
            res.setdefault(str(n), {})[name] = r
            print(f"write n={n} {name}: {r}", flush=True)
            del col
            shutil.rmtree(path, ignore_errors=True)
            save(args, out)


def phase_ingest(args: argparse.Namespace, emb: Any, out: dict[str, Any]) -> None:
    res = out.setdefault("ingest", {})
    n = args.ingest
    for name, cls in (("after", after_cls()), ("before", load_before())):
        for batch in (1000, 10):
            path = args.work / f"i-{name}-{batch}"
            shutil.rmtree(path, ignore_errors=True)
            col = cls.create(path, embedder=emb, ef_construction=args.ef_construction)
            # The old design rewrites everything per write: batches of 10 are capped (see cap_s).
            cap_s = args.before_cap_s if name == "before" and batch == 10 else float("inf")
            v = vectors(n, seed=1)
            w0, t, done = wchar(), time.perf_counter(), 0
            for s in range(0, n, batch):
                col.add([f"doc {i}" for i in range(s, s + batch)], ids=list(range(s, s + batch)),
                        metadata=[meta(i) for i in range(s, s + batch)], vectors=v[s : s + batch])
                done = s + batch
                if time.perf_counter() - t > cap_s:
                    break
            if hasattr(col, "close"):
                col.close()  # the final checkpoint counts: it is part of the ingest
            total = time.perf_counter() - t
            r = {"chunks": done, "total_s": total, "bytes_written": wchar() - w0, "complete": done >= n}
            res.setdefault(name, {})[str(batch)] = r
            print(f"ingest {name} batch={batch}: {r}", flush=True)
            del col
            shutil.rmtree(path, ignore_errors=True)
            save(args, out)


def _allow_fn(col: Any) -> Any:
    if hasattr(col, "_allow_set"):
        return col._allow_set
    from tailrank.collection import _filters, _log

    def allow(flt: dict[str, Any]) -> np.ndarray:
        sql, params = _filters.to_sql(_filters.parse(flt))
        with col._snapshot() as db:
            return _log.allowed_keys(db, sql, params)

    return allow


def phase_filter(args: argparse.Namespace, emb: Any, out: dict[str, Any]) -> None:
    res = out.setdefault("filter", {})
    n = args.filter_n
    queries = [f"query about topic {i}" for i in range(args.queries)]
    for name, cls in (("before", load_before()), ("after", after_cls())):
        path = args.work / f"f-{name}"
        col = build(cls, path, emb, n, args.ef_construction)
        settle(col)
        allow = _allow_fn(col)
        for label, flt in (("1%", {"grp": 7}), ("10%", {"dec": 3}), ("none", None)):
            a_ms, fs_ms, ann_ms = [], [], []
            for q in queries:
                if flt is not None:
                    t = time.perf_counter()
                    keys = allow(flt)
                    a_ms.append((time.perf_counter() - t) * 1000)
                r = col.search(q, k=10, candidates=100, rerank=False, filter=flt)
                fs_ms.append(r.timings["total"] - r.timings["embed"])
                ann_ms.append(r.timings["ann"])
            row = {"first_stage_ms_p50": statistics.median(fs_ms), "ann_ms_p50": statistics.median(ann_ms)}
            if flt is not None:
                row |= {"allow_set_ms_p50": statistics.median(a_ms), "allowed": int(len(keys))}
            res.setdefault(label, {})[name] = row
            print(f"filter {label} {name}: {row}", flush=True)
        del col
        shutil.rmtree(path, ignore_errors=True)
        save(args, out)


_OPEN = """
import resource, sys, time
sys.path[:0] = {path!r}
t = time.perf_counter()
if {before!r}:
    sys.path.insert(0, {bench!r}); from bench_collection import load_before; C = load_before()
else:
    from tailrank.collection import Collection as C
import tailrank, json
from tailrank import Embedder
from tailrank.embedder import default_embedder_dir
e = Embedder(default_embedder_dir())
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
rss0 = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
def wchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("wchar:")).split()[1])
w0 = wchar()
t = time.perf_counter()
col = C.open({col!r}, embedder=e)
dt = time.perf_counter() - t
print(json.dumps({{"open_s": dt, "rss_before_open_mib": rss0, "rss_after_open_mib": status("VmRSS:"),
                  "peak_rss_during_open_mib": status("VmHWM:"), "mib_written_during_open": (wchar() - w0) / 2**20}}))
"""


def code_path(args: argparse.Namespace) -> list[str]:
    return [str(REPO / "python")] if args.in_tree else []


def phase_open(args: argparse.Namespace, emb: Any, out: dict[str, Any]) -> None:
    res = out.setdefault("open", {})
    for n in args.open_sizes:
        ef_c = args.ef_construction if n < 1_000_000 else args.ef_construction_1m
        designs = (("before", load_before), ("after", after_cls))
        for name, cls in ((name, make()) for name, make in designs if name in args.designs):
            path = args.work / f"o-{name}-{n}"
            col = build(cls, path, emb, n, ef_c)
            if hasattr(col, "close"):
                col.close()
            del col
            index_bytes = sum(p.stat().st_size for p in path.glob("index-*.bin"))
            db_bytes = (path / "meta.sqlite").stat().st_size
            wal = path / "meta.sqlite-wal"
            wal_bytes = wal.stat().st_size if wal.is_file() else 0
            code = _OPEN.format(path=code_path(args), before=name == "before",
                                bench=str(REPO / "benchmarks"), col=str(path))
            got = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True).stdout.splitlines()[-1])
            r = got | {"index_file_mib": index_bytes / 2**20, "wal_mib": wal_bytes / 2**20,
                       "vectors_mib": n * DIM * 4 / 2**20, "db_mib": db_bytes / 2**20, "ef_construction": ef_c}
            res.setdefault(str(n), {})[name] = r
            print(f"open n={n} {name}: {r}", flush=True)
            shutil.rmtree(path, ignore_errors=True)
            save(args, out)


def save(args: argparse.Namespace, out: dict[str, Any]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_collection.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-collection")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--phases", default="write,ingest,filter,open")
    ap.add_argument("--sizes", default="1000,10000,100000", help="chunks for the write-cost phase")
    ap.add_argument("--open-sizes", default="100000")
    ap.add_argument("--reps", type=int, default=9, help="adds of 10 documents timed per size")
    ap.add_argument("--ingest", type=int, default=100_000)
    ap.add_argument("--before-cap-s", type=float, default=120.0,
                    help="stop the old design's batch-10 ingest after this long (it rewrites everything per write)")
    ap.add_argument("--filter-n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef-construction-1m", type=int, default=40, help="for 1M-chunk builds (time bound)")
    ap.add_argument("--designs", default="before,after", help="designs the open phase builds and opens")
    ap.add_argument("--in-tree", action="store_true", help="subprocesses import tailrank from python/")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.open_sizes = [int(x) for x in args.open_sizes.split(",") if x]
    args.work.mkdir(parents=True, exist_ok=True)
    from tailrank import Embedder
    from tailrank.bench.machine import machine_info
    from tailrank.embedder import default_embedder_dir

    f = args.out / "bench_collection.json"
    out: dict[str, Any] = json.loads(f.read_text()) if f.is_file() else {}
    out["machine"] = machine_info(REPO)
    out["command"] = " ".join(sys.argv)
    emb = Embedder(default_embedder_dir(), threads=1)
    assert emb.dim == DIM
    for ph in args.phases.split(","):
        {"write": phase_write, "ingest": phase_ingest, "filter": phase_filter, "open": phase_open}[ph](args, emb, out)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
