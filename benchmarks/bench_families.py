"""The scorer suite on DeBERTa-v3 and ModernBERT cross-encoders (issue 16): tailrank against
sentence-transformers' CrossEncoder on the same seeded models, pairs and threads.

    PYTHONPATH=python python benchmarks/bench_families.py --queries 10 --threads 2 --work .cache/bench-families

No checkpoint of these families is on this machine (nothing is downloaded), so each is a seeded
random model of the real layout, built as the tests build theirs (tests/python/models.py) at a
benchmark size, with its tokenizer trained on the SciFact corpus (so pair lengths in tokens are
realistic):

  deberta-v3   mxbai-rerank-xsmall-v1's layout and width (DebertaV2ForSequenceClassification:
               hidden 384, 6 heads, FFN 1536, relative attention with 256 position buckets, no
               token types), 4 layers instead of 12; DebertaV2Tokenizer (Unigram, 8,000 pieces);
               max_length 512 (its own).
  modernbert   gte-reranker-modernbert-base's layout (ModernBertForSequenceClassification: RoPE,
               a global layer every 3, local window 128, GeGLU, CLS pooling) at hidden 256, 4 heads,
               FFN 384, 4 layers; byte-level BPE (8,000 tokens); max_length 8192 (its own).

Each family runs benchmarks/bench_scorer.py's workload and systems (``--systems``; SciFact
claims x seeded samples of abstracts, two untimed warm-up requests per system, one request at a
time); ``uptime`` load averages are recorded before and after each family.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DEFAULT_DATA, DEFAULT_OUT, REPO_ROOT, environment_line, markdown_table, write_json, write_text  # noqa: E402

import bench_scorer  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))
import models as seeded  # noqa: E402  (the tests' seeded model builders)

# Benchmark sizes of each family (config fields over the tests' tiny defaults).
SIZES: dict[str, dict[str, Any]] = {
    "deberta-v3": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
                       max_position_embeddings=512, position_buckets=256, initializer_range=0.02),
    "modernbert": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
                       local_attention=128, initializer_range=0.02),
}
MAX_LENGTH = {"deberta-v3": 512, "modernbert": 8192}
VOCAB = 8000
DEFAULT_SYSTEMS = "tailrank-fp32-docstore,tailrank-fp32-texts,tailrank-opt-fp32,st-fp32"


def scifact_texts(data: str) -> list[str]:
    with gzip.open(Path(data) / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r.get("title", "") + " " + r.get("text", "")).strip() for r in rows]


def build(family: str, work: Path, texts: list[str]) -> Path:
    """The seeded checkpoint of ``family`` under ``work`` (built once)."""
    out = work / family / "hf"
    if not (out / "config.json").is_file():
        seeded.build_checkpoint(family, out, sizes=SIZES[family], texts=texts, vocab_size=VOCAB,
                                model_max_length=MAX_LENGTH[family])
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def markdown(results: dict[str, Any]) -> str:
    parts = []
    for family, res in results.items():
        w, sysres = res["workload"], res["systems"]
        st = sysres.get("st-fp32", {}).get("latency_ms", {}).get("p50")
        rows = []
        for name, r in sysres.items():
            if "skipped" in r:
                rows.append([name, "skipped: " + r["skipped"]] + [""] * 6)
                continue
            lat, fid = r["latency_ms"], r.get("fidelity_vs_fp32", {})
            rows.append([
                name, f"{lat['p50']:.0f}", f"{lat['p99']:.0f}", f"{lat['p99'] / lat['p50']:.2f}",
                f"{r['pairs_per_s']:.0f}", f"{st / lat['p50']:.2f}x" if st else "",
                f"{fid.get('kendall_tau_mean', float('nan')):.3f} / {fid.get('top10_overlap_mean', float('nan')):.2f}",
                str(r["requests"]),
            ])
        opt = res["optimize_fidelity"].get("opt-fp32", {})
        parts.append(
            f"#### {family}: {w['requests']} requests x {w['candidates']} candidates, median pair "
            f"{w['median_pair_tokens']:.0f} tokens, max_length {res['settings']['max_length']}; "
            f"{res['settings']['threads']} threads for every system\n\n"
            f"{environment_line(res['environment'])}; load average after {res['load_after']}\n\n"
            f"`tailrank optimize` (fp32) fused: {opt.get('fused_operators', {})}, Kendall tau vs fp32 "
            f"{opt.get('kendall_tau', float('nan')):.4f}\n\n"
            + markdown_table(["system", "p50 ms", "p99 ms", "p99/p50", "pairs/s", "vs st-fp32",
                              "tau / top-10 vs fp32", "timed requests"], rows)
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--families", default=",".join(SIZES))
    bench_scorer.add_arguments(p)
    p.set_defaults(systems=DEFAULT_SYSTEMS, queries=10)
    args = p.parse_args(argv)
    work = Path(args.work or ".cache/bench-families")
    texts = scifact_texts(args.data)
    results: dict[str, Any] = {}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        hf_dir = build(family, work, texts)
        fam_args = argparse.Namespace(**{**vars(args), "model": str(hf_dir), "work": str(work / family)})
        res = bench_scorer.run(fam_args)
        res["load_after"] = load_average()
        res["family"] = family
        results[family] = res
        print(f"[families] {family} done; load average {res['load_after']}", file=sys.stderr)
    md = markdown(results)
    write_json(Path(args.out) / "families.json", results)
    write_text(Path(args.out) / "families.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
