"""What ``tailrank bench`` needs installed, checked before any work.

A run that dies after minutes of measuring on a missing import writes nothing; so the modules a
run needs are looked up first (``importlib.util.find_spec``: nothing is imported) and every
missing one is named in one message with the extra that installs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence

__all__ = ["BENCH_EXTRA", "DependencyError", "Missing", "check", "have"]

BENCH_EXTRA = 'pip install "tailrank[bench]"'


class DependencyError(RuntimeError):
    """A module the run cannot do without is missing (raised before any measurement)."""


@dataclasses.dataclass
class Missing:
    """The optional parts a run will leave out, module -> what it would have given."""

    optional: dict[str, str]

    def note(self) -> str:
        """One line for stderr and the report, or "" when nothing is missing."""
        if not self.optional:
            return ""
        parts = "; ".join(f"{m} ({what})" for m, what in self.optional.items())
        return f"not installed, left out of this run: {parts}. Install them with {BENCH_EXTRA}"


def have(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module stubbed out as None
        return False


def check(*, export_needed: bool, precisions: Sequence[str], peers: Sequence[str], serve: bool,
          quality: bool) -> Missing:
    """Raises DependencyError naming every missing required module (and the extra) at once;
    returns the optional ones the run will skip (plots, quality, peers, serve, the floor probe)."""
    required: dict[str, str] = {"onnxruntime": "scoring", "tokenizers": "tokenization", "tqdm": "progress"}
    if export_needed:
        required |= {"torch": "exporting the checkpoint", "transformers": "exporting the checkpoint",
                     "onnx": "exporting the checkpoint"}
    if any(p != "fp32" for p in precisions):
        required["onnx"] = "tailrank optimize for " + ",".join(p for p in precisions if p != "fp32")
    optional: dict[str, str] = {"matplotlib": "the PNG plots", "torch": "the compute-floor probe"}
    if quality:
        optional["pytrec_eval"] = "nDCG / recall"
    for p in peers:
        if p.startswith("st"):
            optional["sentence_transformers"] = "the sentence-transformers peers"
        if p.startswith(("st-onnx", "st-openvino")):
            optional["optimum"] = "sentence-transformers' ONNX / OpenVINO backends"
        if p == "flashrank":
            optional["flashrank"] = "the FlashRank peer"
    if serve:
        optional |= {"fastapi": "serve mode", "uvicorn": "serve mode"}
    missing_required = {m: why for m, why in required.items() if not have(m)}
    if missing_required:
        parts = "; ".join(f"{m} (for {why})" for m, why in missing_required.items())
        raise DependencyError(f"missing {parts}. Install them with {BENCH_EXTRA}")
    return Missing({m: why for m, why in optional.items() if m not in required and not have(m)})
