"""Runs every benchmark suite with one seed and writes results/<suite>.json, <suite>.md and summary.md.

    PYTHONPATH=python python benchmarks/run_all.py --data ../shared/data/scifact --seed 0

Every option of the suites can be passed here (see ``--help``); the defaults are the published
configuration (about 3-5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import DEFAULT_DATA, DEFAULT_OUT, write_json, write_text

import bench_assembly
import bench_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="a BEIR folder for the assembly suite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--only", choices=("index", "assembly"), default=None, help="run one suite")
    idx = p.add_argument_group("index suite")
    bench_index.add_arguments(idx)
    bench_assembly.add_arguments(p.add_argument_group("assembly suite"), prefix="asm_")
    args = p.parse_args(argv)

    out = Path(args.out)
    t0 = time.perf_counter()
    sections = []
    if args.only in (None, "index"):
        res = bench_index.run(args)
        md = bench_index.markdown(res)
        write_json(out / "index.json", res)
        write_text(out / "index.md", md)
        sections.append(md)
    if args.only in (None, "assembly"):
        asm_args = argparse.Namespace(
            data=args.data,
            seed=args.seed,
            **{k[len("asm_"):]: v for k, v in vars(args).items() if k.startswith("asm_")},
        )
        res = bench_assembly.run(asm_args)
        md = bench_assembly.markdown(res)
        write_json(out / "assembly.json", res)
        write_text(out / "assembly.md", md)
        sections.append(md)
    summary = "\n".join(sections)
    write_text(out / "summary.md", summary)
    write_json(out / "run.json", {"argv": sys.argv[1:], "seed": args.seed, "wall_seconds": time.perf_counter() - t0})
    print(summary)
    print(f"[run_all] {time.perf_counter() - t0:.0f} s; results in {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
