"""A short end-to-end demo of the native core on a BEIR folder (default: SciFact).

Index + DocStore + fused retrieval and pair batching:
  python -m tailrank.demo --data ../shared/data/scifact --docs 500

The first-stage vectors here are hashed bag-of-token embeddings (a lexical stand-in computed in
numpy); a neural embedder plugs into the same VectorIndex.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import tempfile
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from . import DocStore, PairBatcher, PairTemplate, VectorIndex, distance_isa, retrieve_and_assemble
from ._beir import find_tokenizer, iter_corpus, load_qrels, load_queries

DIM = 384


@functools.lru_cache(maxsize=4)
def _hash_table(vocab_size: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Bucket and sign of every token id (seeded): built once per vocabulary."""
    rng = np.random.default_rng(0)
    bucket = rng.integers(0, DIM, size=vocab_size)
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=vocab_size)
    return bucket, sign


def hashed_embedding(token_lists: list[list[int]], idf: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Feature-hashes tf-idf weighted token ids into DIM signed buckets (seeded, deterministic)."""
    bucket, sign = _hash_table(int(idf.shape[0]))
    out = np.zeros((len(token_lists), DIM), dtype=np.float32)
    for i, toks in enumerate(token_lists):
        ids = np.asarray(toks, dtype=np.int64)
        np.add.at(out[i], bucket[ids], sign[ids] * idf[ids])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join("..", "shared", "data", "scifact"), help="BEIR folder")
    ap.add_argument("--docs", type=int, default=500, help="how many corpus documents to load")
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: all-MiniLM-L6-v2's)")
    ap.add_argument(
        "--reranker",
        default=None,
        help="cross-encoder: an exported model dir, or a Hugging Face checkpoint (exported once into "
        "--cache); default: ../shared/models/scifact-minilm-l6-ce when present",
    )
    ap.add_argument("--cache", default=os.path.join(".cache", "models"), help="where exported models are kept")
    ap.add_argument("--threads", type=int, default=None, help="scoring threads (default: the CPU quota)")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    reranker = _load_reranker(args)
    # Documents are pre-tokenized with the reranker's own tokenizer when there is one.
    tok_path = args.tokenizer or (str(reranker.model_dir / "tokenizer.json") if reranker else find_tokenizer())
    tok = Tokenizer.from_file(tok_path)
    tok.no_truncation()
    tok.no_padding()
    print(f"tailrank demo | data={args.data} | tokenizer={tok_path} | distance kernels: {distance_isa()}")

    docs = list(itertools.islice(iter_corpus(args.data), args.docs))
    texts = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in docs]
    t0 = time.perf_counter()
    enc = tok.encode_batch(texts, add_special_tokens=False)
    token_lists = [e.ids[:256] for e in enc]
    t_tok = time.perf_counter() - t0

    vocab = tok.get_vocab_size()
    df = np.zeros(vocab, dtype=np.float32)
    for toks in token_lists:
        df[np.unique(np.asarray(toks, dtype=np.int64))] += 1
    idf = np.log((1 + len(token_lists)) / (1 + df)).astype(np.float32) + 1
    vectors = hashed_embedding(token_lists, idf)
    ids = np.arange(len(docs), dtype=np.int64)

    index = VectorIndex(DIM, "cosine")
    store = DocStore(vocab)
    t0 = time.perf_counter()
    index.add(vectors, ids)
    t_index = time.perf_counter() - t0
    store.add(ids, token_lists)
    print(f"{len(docs)} documents: tokenized in {t_tok * 1e3:.0f} ms, indexed in {t_index * 1e3:.0f} ms; {store!r}")

    with tempfile.TemporaryDirectory() as tmp:
        index.save(os.path.join(tmp, "index.trx"))
        store.save(os.path.join(tmp, "docs.trd"))
        index = VectorIndex.load(os.path.join(tmp, "index.trx"))
        store = DocStore.load(os.path.join(tmp, "docs.trd"))
        sizes = {n: os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)}
    print(f"saved and reloaded (checksummed): {sizes}")

    batcher = PairBatcher(PairTemplate.from_tokenizer(tok), max_length=512, batch_tokens=8192)
    queries = load_queries(args.data)
    qrels = load_qrels(args.data)
    doc_index = {str(d["_id"]): i for i, d in enumerate(docs)}
    chosen = [q for q in qrels if any(d in doc_index for d in qrels[q])][: args.queries]
    for qid in chosen:
        qtext = queries[qid]
        q_ids = tok.encode(qtext, add_special_tokens=False).ids
        qvec = hashed_embedding([q_ids], idf)[0]
        t0 = time.perf_counter()
        hits, scores, assembly = retrieve_and_assemble(index, store, batcher, qvec, q_ids, k=args.candidates)
        us = (time.perf_counter() - t0) * 1e6
        relevant = {doc_index[d] for d in qrels[qid] if d in doc_index}
        rank = next((r + 1 for r, h in enumerate(hits) if int(h) in relevant), None)
        print(f"\nquery {qid}: {qtext[:90]}")
        print(
            f"  fused HNSW top-{args.candidates} + gather + assembly: {us:.0f} us | {assembly!r} | "
            f"padding efficiency {assembly.real_tokens / max(1, assembly.padded_tokens):.1%}"
        )
        print(f"  batches (rows x seq_len): {[b.input_ids.shape for b in assembly.batches]}")
        print(f"  first relevant document at rank {rank}; top hit: {docs[int(hits[0])].get('title', '')[:80]!r}")
        if reranker is not None:
            t0 = time.perf_counter()
            ranked = reranker.rank_ids(qtext, store, hits, top_k=10)
            ms = (time.perf_counter() - t0) * 1e3
            new_rank = next((r + 1 for r, h in enumerate(ranked) if h["corpus_id"] in relevant), None)
            print(
                f"  reranked {len(hits)} pairs in {ms:.0f} ms: first relevant document now at rank "
                f"{new_rank if new_rank else '>10'}; top hit: {docs[ranked[0]['corpus_id']].get('title', '')[:80]!r}"
            )
    return 0


def _load_reranker(args: argparse.Namespace) -> Any:
    """A CrossEncoder for the demo, exporting a Hugging Face checkpoint once when needed."""
    from . import CrossEncoder

    src = args.reranker
    if src is None:
        src = os.path.join(os.path.dirname(os.path.abspath(args.data.rstrip("/"))), "..", "models", "scifact-minilm-l6-ce")
        if not os.path.isdir(src):
            print("no reranker given and none found beside the data: first stage only")
            return None
    src = os.path.normpath(src)
    if not any(os.path.exists(os.path.join(src, p)) for p in ("model.onnx", os.path.join("onnx", "model.onnx"))):
        out = os.path.join(args.cache, os.path.basename(src))
        if not os.path.exists(os.path.join(out, "onnx", "model.onnx")):
            from .export import export

            print(f"exporting {src} to ONNX once (cached in {out}) ...")
            export(src, out, force=True)
        src = out
    ce = CrossEncoder(src, threads=args.threads)
    print(f"reranker: {ce!r}")
    return ce


if __name__ == "__main__":
    raise SystemExit(main())
