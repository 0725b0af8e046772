"""The trusted core against the previous release, in one run: index load time, peak RSS and
$TMPDIR bytes of a saved index, build time and single-query search latency, each system in
its own fresh process (peak RSS is the process's), interleaved.

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
mode, path, n, dim, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out = {"tailrank": tailrank.__file__}
if mode == "build":
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    index = tailrank.VectorIndex(dim, "cosine", M=16, ef_construction=64)
    t = time.perf_counter(); index.add(vecs, np.arange(n), threads=2); out["build_s"] = time.perf_counter() - t
    index.save(path)
else:
    tmp = os.environ["TMPDIR"]
    t = time.perf_counter(); index = tailrank.VectorIndex.load(path); out["load_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["tmpdir_bytes_after_load"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    q = np.random.default_rng(seed + 1).standard_normal((2000, dim), dtype=np.float32)
    lat = []
    for row in q:
        t = time.perf_counter_ns(); index.search(row, k=10); lat.append(time.perf_counter_ns() - t)
    lat = np.asarray(lat[200:]) / 1e3
    out["search_p50_us"] = float(np.percentile(lat, 50)); out["search_p99_us"] = float(np.percentile(lat, 99))
print(json.dumps(out))
"""


def run(pythonpath: str, mode: str, path: Path, n: int, dim: int, seed: int, tmp: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, TMPDIR=tmp)
    got = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(n), str(dim), str(seed)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="directory holding the previous release's tailrank package")
    ap.add_argument("--current", default=str(Path(__file__).resolve().parent.parent / "python"))
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        res: dict = {"n": args.n, "dim": args.dim, "systems": {}}
        for name, pp in (("previous", args.baseline), ("current", args.current)):
            tmp = w / f"tmp-{name}"
            tmp.mkdir()
            res["systems"][name] = {"build": run(pp, "build", w / f"{name}.bin", args.n, args.dim, args.seed, str(tmp)),
                                    "file_bytes": (w / f"{name}.bin").stat().st_size, "loads": []}
        for _ in range(args.repeats):  # interleaved
            for name, pp in (("previous", args.baseline), ("current", args.current)):
                tmp = w / f"tmp-{name}"
                res["systems"][name]["loads"].append(run(pp, "load", w / f"{name}.bin", args.n, args.dim, args.seed, str(tmp)))
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
