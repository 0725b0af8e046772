"""The trusted core against the previous release, in one run: index load time, peak RSS and
$TMPDIR bytes of a saved index, build time and single-query search latency, each system in
its own fresh process (peak RSS is the process's), interleaved.

Peak RSS during the load is VmHWM after resetting it just before the load (``/proc/self/clear_refs``);
bytes written during the load are ``wchar`` of ``/proc/self/io`` (a temporary copy of the file shows there).

The previous release is any importable tailrank tree (``--baseline DIR`` put on PYTHONPATH:
e.g. ``pip install --target DIR`` of the previous commit). Vectors are seeded Gaussians.

    python benchmarks/bench_release.py --baseline /path/prev-site --n 200000 --dim 384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
import tailrank
mode, path, n, dim, seed, ef_c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
out = {"tailrank": tailrank.__file__}

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

def wchar():
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])

if mode == "build":
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    index = tailrank.VectorIndex(dim, "cosine", M=16, ef_construction=ef_c)
    t = time.perf_counter(); index.add(vecs, np.arange(n), threads=2); out["build_s"] = time.perf_counter() - t
    index.save(path)
elif mode == "convert":  # load a file of the previous format and save it in the current one
    tailrank.VectorIndex.load(path).save(sys.argv[7])
else:
    tmp = os.environ["TMPDIR"]
    out["rss_before_load_mb"] = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    w0 = wchar()
    t = time.perf_counter(); index = tailrank.VectorIndex.load(path); out["load_s"] = time.perf_counter() - t
    out["bytes_written_during_load"] = wchar() - w0  # a temporary copy of the file shows here
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_rss_during_load_mb"] = status("VmHWM:")
    out["rss_after_load_mb"] = status("VmRSS:")
    out["tmpdir_bytes_after_load"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    q = np.random.default_rng(seed + 1).standard_normal((2000, dim), dtype=np.float32)
    lat = []
    for row in q:
        t = time.perf_counter_ns(); index.search(row, k=10); lat.append(time.perf_counter_ns() - t)
    lat = np.asarray(lat[200:]) / 1e3
    out["search_p50_us"] = float(np.percentile(lat, 50)); out["search_p99_us"] = float(np.percentile(lat, 99))
print(json.dumps(out))
"""


def run(pythonpath: str, mode: str, path: Path, n: int, dim: int, seed: int, tmp: str, ef_c: int = 64,
        *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, TMPDIR=tmp)
    got = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(n), str(dim), str(seed), str(ef_c), *extra],
                         env=env, check=True, capture_output=True, text=True)
    lines = got.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="directory holding the previous release's tailrank package")
    ap.add_argument("--current", default=str(Path(__file__).resolve().parent.parent / "python"))
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--build", choices=("both", "previous"), default="both",
                    help="previous: build once with the previous release; the current release loads that file "
                         "(migration) and the v2 file it converts it to (the same graph: a large n in half the time)")
    ap.add_argument("--work", default=None, help="folder for the index files (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        w = Path(work)
        res: dict = {"n": args.n, "dim": args.dim, "ef_construction": args.ef_construction, "systems": {}}
        runs = [("previous", args.baseline, "previous.bin"), ("current", args.current, "current.bin")]
        for name, pp, fname in runs:
            (w / f"tmp-{name}").mkdir()
        for name, pp, fname in runs[: 1 if args.build == "previous" else 2]:
            res["systems"][name] = {"build": run(pp, "build", w / fname, args.n, args.dim, args.seed,
                                                 str(w / f"tmp-{name}"), args.ef_construction)}
        if args.build == "previous":
            run(args.current, "convert", w / "previous.bin", args.n, args.dim, args.seed, str(w / "tmp-current"),
                args.ef_construction, str(w / "current.bin"))
            runs.append(("current, previous file", args.current, "previous.bin"))
            (w / "tmp-current, previous file").mkdir()
        for name, pp, fname in runs:
            res["systems"].setdefault(name, {}).update(file_bytes=(w / fname).stat().st_size, loads=[])
        for _ in range(args.repeats):  # interleaved
            for name, pp, fname in runs:
                res["systems"][name]["loads"].append(run(pp, "load", w / fname, args.n, args.dim, args.seed,
                                                         str(w / f"tmp-{name}"), args.ef_construction))
                print(name, res["systems"][name]["loads"][-1], file=sys.stderr, flush=True)
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
