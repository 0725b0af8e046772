"""The manifest (format, metric, dim, chunking, model fingerprints, the default score fusion)
and the models it names.

``fusion`` (optional, added in format 2 without a version change: a manifest without it has no
stored default) is written by :meth:`Collection.set_default_fusion` / ``tailrank tune``:
``{"method": "none"|"rrf"|"linear", "weight": float|null, "rrf_k": int, "tuned": {...}|null}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._fileio import read_json_checked
from ..cross_encoder import CrossEncoder
from ..embedder import Embedder
from ..errors import CorruptFileError, FusionError, ModelError, ModelMismatchError
from ._fusion import Fusion, from_manifest

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


def as_embedder(src: Any, threads: int | None) -> Embedder:
    if isinstance(src, Embedder):
        return src
    if isinstance(src, (str, os.PathLike)):
        return Embedder(src, threads=threads)
    raise TypeError(f"embedder must be a model directory or an Embedder, got {type(src).__name__}")


def as_reranker(src: Any, threads: int | None) -> CrossEncoder | None:
    if src is None or isinstance(src, CrossEncoder):
        return src
    if isinstance(src, (str, os.PathLike)):
        return CrossEncoder(src, threads=threads)
    raise TypeError(f"reranker must be a model directory or a CrossEncoder, got {type(src).__name__}")


def model_entry(model: Any) -> dict[str, Any]:
    return {"fingerprint": model.fingerprint, "path": str(Path(model.model_dir).resolve())}


def recorded_dir(manifest: dict[str, Any], what: str) -> Path:
    rec = Path(manifest[what]["path"])
    if not rec.is_dir():
        raise ModelError(f"the collection's {what} {rec} is gone; pass {what}= explicitly")
    return rec


def check_model(entry: dict[str, Any], model: Any, what: str, root: Path) -> None:
    if entry["fingerprint"] != model.fingerprint:
        raise ModelMismatchError(
            f"the {what} {model.model_dir} is not the one the collection at {root} was built with "
            f"(fingerprint {model.fingerprint[:12]} != {entry['fingerprint'][:12]}, recorded from {entry['path']})"
        )


MAX_DIM = 1 << 16  # far above any embedder; a crafted dim must not size allocations
MAX_GRAPH = 1 << 16  # M and ef_construction


def _count(m: dict[str, Any], key: str, lo: int, hi: int, where: Path, *, optional: bool = False) -> None:
    v = m.get(key)
    if optional and v is None:
        return
    if type(v) is not int or not lo <= v <= hi:
        raise CorruptFileError(f"{where}: {key} must be an int in [{lo}, {hi}], got {v!r}")


def _model(m: dict[str, Any], what: str, where: Path, *, optional: bool) -> None:
    if what not in m:
        raise CorruptFileError(f"{where} has no {what} entry")
    e = m[what]
    if optional and e is None:
        return
    if not isinstance(e, dict) or not all(isinstance(e.get(k), str) and e[k] for k in ("fingerprint", "path")):
        raise CorruptFileError(f"{where}: {what} must be {{'fingerprint': str, 'path': str}}, got {e!r}")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, every field checked (the one validator of this file): CorruptFileError if
    any is missing or malformed, even under a valid checksum (a crafted file)."""
    where = root / MANIFEST
    m = read_json_checked(where, "collection manifest")
    if m.get("format") != "tailrank.collection":
        raise CorruptFileError(f"{where} is not a tailrank collection manifest")
    if type(m.get("format_version")) is not int or m["format_version"] != FORMAT_VERSION:
        raise CorruptFileError(
            f"{where} has format version {m.get('format_version')!r}; this tailrank reads "
            f"{FORMAT_VERSION} (version 1 collections kept whole-file generations: ingest the corpus again)"
        )
    if m.get("metric") not in ("cosine", "ip", "l2") or not isinstance(m["metric"], str):
        raise CorruptFileError(f"{where}: metric must be \"cosine\", \"ip\" or \"l2\", got {m.get('metric')!r}")
    _count(m, "dim", 1, MAX_DIM, where)
    _count(m, "M", 2, MAX_GRAPH, where)
    _count(m, "ef_construction", 1, MAX_GRAPH, where)
    _count(m, "chunk_tokens", 2, 1 << 30, where, optional=True)
    top = m["chunk_tokens"] - 1 if m.get("chunk_tokens") is not None else 0
    _count(m, "chunk_overlap", 0, top, where)
    _model(m, "embedder", where, optional=False)
    _model(m, "reranker", where, optional=True)
    stored_fusion(m, root)
    return m


def stored_fusion(manifest: dict[str, Any], root: Path) -> Fusion | None:
    """The collection's default fusion (None: none stored)."""
    try:
        return from_manifest(manifest.get("fusion"), str(root / MANIFEST))
    except FusionError as e:
        raise CorruptFileError(str(e)) from None
