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


def read_manifest(root: Path) -> dict[str, Any]:
    m = read_json_checked(root / MANIFEST, "collection manifest")
    if m.get("format") != "tailrank.collection":
        raise CorruptFileError(f"{root / MANIFEST} is not a tailrank collection manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(
            f"{root / MANIFEST} has format version {m.get('format_version')}; this tailrank reads "
            f"{FORMAT_VERSION} (version 1 collections kept whole-file generations: ingest the corpus again)"
        )
    return m


def stored_fusion(manifest: dict[str, Any], root: Path) -> Fusion | None:
    """The collection's default fusion (None: none stored)."""
    try:
        return from_manifest(manifest.get("fusion"), str(root / MANIFEST))
    except FusionError as e:
        raise CorruptFileError(str(e)) from None
