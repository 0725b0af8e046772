"""An LLM reranker (issue 16): one request = 1 SciFact claim x 100 SciFact abstracts on a seeded
Qwen3-architecture reranker, tailrank with prefix reuse vs without vs plain transformers the model
card's way (vs sentence-transformers' CrossEncoder where it loads the model), same threads.

    PYTHONPATH=python python benchmarks/bench_llm_rerank.py --threads 2 --reps 15 --work .cache/bench-llm

No Qwen3-Reranker checkpoint is on this machine (nothing is downloaded): the model is a seeded
random Qwen3ForCausalLM (hidden 256, 4 layers, 4 heads / 2 KV heads, head_dim 64, FFN 512) with
the real tokenizer layout (NFC, the Qwen2 split regex, byte-level BPE, the chat tokens) trained on
the SciFact corpus (8,000 tokens), exported with ``--rerank-template qwen3``. Scores are
meaningless; time and tokens are what is measured. Systems run interleaved (one request each per
round, in rotating order) after two untimed warm-up requests; ``uptime`` is recorded before and
after. The saving from prefix reuse is measured at three instruction + query lengths.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DEFAULT_DATA, DEFAULT_OUT, REPO_ROOT, environment, markdown_table, write_json, write_text  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))
import llm_models  # noqa: E402  (the tests' seeded builders and model-card reference)

MAX_LENGTH = 1024
CARD_BATCH = 16  # pairs per forward pass for transformers (the card's one batch of 100 would pad 100 x 1024)


def scifact(data: str) -> tuple[list[str], list[str]]:
    with gzip.open(Path(data) / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    docs = [(r.get("title", "") + " " + r.get("text", "")).strip() for r in rows]
    with open(Path(data) / "queries.jsonl", encoding="utf-8") as f:
        claims = [json.loads(line)["text"] for line in f if line.strip()]
    return docs, claims


def build(work: Path, texts: list[str]) -> tuple[Path, Path]:
    from tailrank.export import export

    hf, out = work / "hf", work / "out"
    if not (out / "rerank_template.json").is_file():
        tok = llm_models.qwen_tokenizer("qwen3", vocab_size=8000, texts=texts)
        llm_models.build_llm_checkpoint("qwen3", hf, hidden=256, layers=4, tokenizer=tok, positions=2048,
                                        weight_std=0.02)
        export(hf, out, rerank_template="qwen3", force=True)
    return hf, out


class CardTransformers:
    """Qwen3-Reranker's model-card code (tests/python/llm_models.py), batches of CARD_BATCH pairs."""

    def __init__(self, hf: Path) -> None:
        import torch
        import transformers as tf

        self.torch = torch
        self.tok = tf.AutoTokenizer.from_pretrained(hf, padding_side="left")
        self.model = tf.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
        t = llm_models.BUILTIN_TEMPLATES["qwen3"]
        self.pre = self.tok.encode(t.prefix, add_special_tokens=False)
        self.suf = self.tok.encode(t.suffix, add_special_tokens=False)
        self.yes, self.no = self.tok.convert_tokens_to_ids("yes"), self.tok.convert_tokens_to_ids("no")
        self.inst = t.default_instruction
        self.tokens = 0

    def __call__(self, query: str, docs: list[str], instruction: str | None = None) -> np.ndarray:
        torch = self.torch
        inst = instruction or self.inst
        out, self.tokens = [], 0
        for i in range(0, len(docs), CARD_BATCH):
            bodies = [f"<Instruct>: {inst}\n<Query>: {query}\n<Document>: {d}" for d in docs[i : i + CARD_BATCH]]
            enc = self.tok(bodies, padding=False, truncation="longest_first", return_attention_mask=False,
                           max_length=MAX_LENGTH - len(self.pre) - len(self.suf))
            enc["input_ids"] = [self.pre + e + self.suf for e in enc["input_ids"]]
            batch = self.tok.pad(enc, padding=True, return_tensors="pt")
            self.tokens += int(batch["input_ids"].numel())
            with torch.no_grad():
                logits = self.model(**batch).logits[:, -1, :]
            two = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
            out.append(torch.nn.functional.log_softmax(two, dim=1)[:, 1].exp().numpy())
        return np.concatenate(out)


def st_system(hf: Path) -> tuple[Any, str]:
    """sentence-transformers' own loading of the checkpoint, and what it does with it."""
    try:
        from sentence_transformers import CrossEncoder as STCrossEncoder

        st = STCrossEncoder(str(hf), device="cpu", local_files_only=True)
    except Exception as e:  # whatever it raises is the finding
        return None, f"cannot load: {type(e).__name__}: {e}"[:300]
    return st, f"loads it as {[type(m).__name__ for m in st]}"


def _table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(list(rows[0]), [list(r.values()) for r in rows])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--work", default=str(REPO_ROOT / ".cache" / "bench-llm"))
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from tailrank import CrossEncoder

    docs_all, claims = scifact(args.data)
    hf, out = build(Path(args.work), docs_all[:3000] + claims)
    rng = random.Random(args.seed)
    queries = rng.sample(claims, args.reps + 2)
    doc_sets = [rng.sample(docs_all, args.docs) for _ in range(args.reps + 2)]

    reuse = CrossEncoder(out, threads=args.threads, max_length=MAX_LENGTH)
    full = CrossEncoder(out, threads=args.threads, max_length=MAX_LENGTH, prefix_reuse=False)
    card = CardTransformers(hf)
    st, st_note = st_system(hf)
    systems: dict[str, Any] = {
        "tailrank-prefix-reuse": lambda q, d, i=None: reuse.predict([(q, x) for x in d], instruction=i),
        "tailrank-full-prompt": lambda q, d, i=None: full.predict([(q, x) for x in d], instruction=i),
        "transformers-model-card": card,
    }
    tokens = {"tailrank-prefix-reuse": lambda: reuse.tokens_computed, "tailrank-full-prompt": lambda: full.tokens_computed,
              "transformers-model-card": lambda: card.tokens}
    if st is not None:
        systems["sentence-transformers"] = lambda q, d, i=None: st.predict([(q, x) for x in d], batch_size=CARD_BATCH)
        tokens["sentence-transformers"] = lambda: -1

    print(f"systems: {list(systems)}; sentence-transformers {st_note}", file=sys.stderr, flush=True)
    load_before = uptime()
    # Fidelity on the first request (and the model-card tokens equal tailrank's by the tests).
    check = {n: np.asarray(f(queries[0], doc_sets[0]), dtype=np.float64) for n, f in systems.items()}
    fidelity = {n: float(np.abs(v - check["transformers-model-card"]).max()) for n, v in check.items()}
    for n, f in systems.items():
        f(queries[1], doc_sets[1])
    times: dict[str, list[float]] = {n: [] for n in systems}
    toks: dict[str, list[int]] = {n: [] for n in systems}
    names = list(systems)
    for r in range(args.reps):
        for n in names[r % len(names):] + names[: r % len(names)]:  # rotating order
            t0 = time.perf_counter()
            systems[n](queries[r + 2], doc_sets[r + 2])
            times[n].append(time.perf_counter() - t0)
            toks[n].append(tokens[n]())
        print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), file=sys.stderr, flush=True)
    rows = []
    for n in names:
        ms = np.asarray(times[n]) * 1e3
        rows.append({"system": n, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "mean_ms": float(ms.mean()), "tokens_per_request": float(np.mean(toks[n])),
                     "max_abs_diff_vs_card": fidelity[n]})
    base = next(r for r in rows if r["system"] == "tailrank-full-prompt")["p50_ms"]
    for r in rows:
        r["p50_vs_full_prompt"] = r["p50_ms"] / base

    # The saving as a function of instruction + query length (tailrank, with vs without reuse).
    sweep = []
    base_inst = llm_models.BUILTIN_TEMPLATES["qwen3"].default_instruction
    for mult in (1, 4, 12):
        inst = " ".join([base_inst] * mult)
        q, d = queries[2], doc_sets[2]
        n_before = reuse._prompts.prompt(q, inst).before.size
        t = {"reuse": [], "full": []}
        for _ in range(3):
            for key, ce in (("reuse", reuse), ("full", full)):
                t0 = time.perf_counter()
                ce.predict([(q, x) for x in d], instruction=inst)
                t[key].append(time.perf_counter() - t0)
        sweep.append({"tokens_before_document": int(n_before), "reuse_p50_ms": float(np.median(t["reuse"]) * 1e3),
                      "full_p50_ms": float(np.median(t["full"]) * 1e3),
                      "reuse_tokens": reuse.tokens_computed, "full_tokens": full.tokens_computed,
                      "time_ratio": float(np.median(t["reuse"]) / np.median(t["full"]))})
    load_after = uptime()
    result = {"env": environment(), "threads": args.threads, "docs": args.docs, "reps": args.reps,
              "max_length": MAX_LENGTH, "rows": rows, "sweep": sweep, "sentence_transformers": st_note,
              "load_before": load_before, "load_after": load_after}
    write_json(Path(args.out) / "llm_rerank.json", result)
    md = _table(rows) + "\n\n" + _table(sweep) + f"\n\nsentence-transformers: {st_note}\n" \
        f"load before: {load_before}\nload after: {load_after}\n"
    write_text(Path(args.out) / "llm_rerank.md", md)
    print(md)


if __name__ == "__main__":
    main()
