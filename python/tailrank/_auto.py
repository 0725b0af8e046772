"""``tailrank optimize --auto``: the fastest precision that keeps rankings, chosen on this machine.

Every candidate this machine can run is built, gated on fidelity (the same gate as ``optimize``)
and timed on sample requests; the fastest passing one is written with a ``tailrank.json`` that
records the decision, the ISA it was made on and every candidate's time and fidelity. A candidate
that needs an ISA (int8 dot products, bf16 arithmetic) also gets the fastest portable passing
graph as ``onnx/fallback.onnx``, which CrossEncoder scores on CPUs without that ISA.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _ort
from .errors import ModelError
from .export import atomic_output_dir, copy_model_files
from .optimize import FidelityError, SampleSet, _gate, _load_samples, fidelity, optimize

__all__ = ["optimize_auto", "CANDIDATES", "time_candidate"]

# name -> (optimize precision, device it runs on, ISA it needs: a key of _ort.ISA_FLAGS or None)
CANDIDATES: dict[str, tuple[str, str, str | None]] = {
    "fp32": ("fp32", "cpu", None),
    "fp32-openvino": ("fp32", "openvino", None),
    "bf16-openvino": ("bf16", "openvino", "bf16"),
    "int8": ("int8", "cpu", "int8"),
    "int8-static": ("int8-static", "cpu", "int8"),
    "int8-smooth": ("int8-smooth", "cpu", "int8"),
    "int8-openvino": ("int8-openvino", "openvino", "int8"),
    "fp16-cuda": ("fp16", "cuda", None),
}
_TIMED_REQUESTS = 8

Timer = Callable[[Path, SampleSet, "int | None"], float]


def time_candidate(model_dir: Path, samples: SampleSet, threads: int | None) -> float:
    """Seconds to score up to ``_TIMED_REQUESTS`` sample requests one at a time (after one
    untimed warm-up request), on the device the directory's ``tailrank.json`` asks for."""
    from .cross_encoder import CrossEncoder

    ce = CrossEncoder(model_dir, threads=threads)
    ce.rank(*samples[0])
    total = 0.0
    for query, docs in samples[:_TIMED_REQUESTS]:
        t = time.perf_counter()
        ce.rank(query, docs)
        total += time.perf_counter() - t
    return total


def _unavailable(name: str, flags: frozenset[str], providers: list[str]) -> str | None:
    """Why this machine cannot run candidate ``name``, or None."""
    _, device, isa = CANDIDATES[name]
    if device == "openvino" and "OpenVINOExecutionProvider" not in providers:
        return "needs onnxruntime-openvino (the OpenVINO execution provider)"
    if device == "cuda" and "CUDAExecutionProvider" not in providers:
        return "fp16 runs on CUDA only (no CUDA execution provider here)"
    if isa is not None and not flags & set(_ort.ISA_FLAGS[isa]):
        return f"this CPU has none of {', '.join(_ort.ISA_FLAGS[isa])}"
    return None


def _runtime(name: str) -> dict[str, Any]:
    precision, device, _ = CANDIDATES[name]
    return {"device": device, "precision": "bf16" if precision == "bf16" else "fp32"}


def _built_runtime(path: Path, name: str) -> dict[str, Any]:
    """The device and precision a built candidate runs with: its own tailrank.json's where it wrote
    one (int8-openvino picks the precision of its float ops on this CPU), else the candidate's."""
    own = path / _ort.RUNTIME_FILE
    if own.is_file():
        cfg = _ort.read_runtime(path)
        return {"device": cfg["device"], "precision": cfg["precision"]}
    return _runtime(name)


def _build(name: str, src_dir: Path, out: Path, samples: SampleSet, min_tau: float, min_top1: float,
           threads: int | None) -> dict[str, Any]:
    """Writes candidate ``name`` into ``out`` (below the gate too) and returns its fidelity report."""
    precision, device, _ = CANDIDATES[name]
    if name == "fp32-openvino":  # the exported graph as it is, on OpenVINO in fp32
        (out / "onnx").mkdir(parents=True)
        shutil.copy2(_ort.find_onnx(src_dir), out / "onnx" / "model.onnx")
        copy_model_files(src_dir, out)
        (out / _ort.RUNTIME_FILE).write_text(json.dumps(_runtime(name)) + "\n", encoding="utf-8")
        report = fidelity(src_dir, out, samples, threads=threads, candidate_device="openvino")
        report.update(precision="fp32", thresholds={"kendall_tau": min_tau, "top1_kept": min_top1})
        _gate(report, "fp32 (OpenVINO)", min_tau, min_top1, force=True)
        return report
    report = optimize(src_dir, out, precision=precision, force=True, sample_pairs=samples,  # type: ignore[arg-type]
                      min_tau=min_tau, min_top1=min_top1, threads=threads)
    if device == "cpu":  # timed on the CPU provider: run there even where a GPU is visible
        (out / _ort.RUNTIME_FILE).write_text(json.dumps(_runtime(name)) + "\n", encoding="utf-8")
    return report


def optimize_auto(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    sample_pairs: str | os.PathLike[str] | SampleSet | None = None,
    min_tau: float = 0.95,
    min_top1: float = 0.95,
    threads: int | None = None,
    candidates: list[str] | None = None,
    cpu_flags: frozenset[str] | None = None,
    providers: list[str] | None = None,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Builds, gates and times every candidate this machine can run; writes the fastest passing.

    Args:
        model_dir: A model directory made by ``tailrank export`` (fp32).
        out_dir: The directory to create (atomically): the chosen candidate's files, its
            ``fidelity.json`` and a ``tailrank.json`` with the decision under ``"auto"``.
        force: Write the fastest candidate even when none passes (and replace ``out_dir``).
        sample_pairs: As for :func:`tailrank.optimize.optimize`: the fidelity gate's pairs, the
            timed requests and the static int8 calibration; pairs from the user's own corpus.
        min_tau, min_top1: The fidelity gate.
        threads: ONNX Runtime intra-op threads for the checks and the timing.
        candidates: Names of :data:`CANDIDATES` to consider (default all).
        cpu_flags: This CPU's flags (default: read from /proc/cpuinfo).
        providers: ONNX Runtime's execution providers (default: this onnxruntime's).
        timer: ``(model_dir, samples, threads) -> seconds`` (default :func:`time_candidate`).

    Returns:
        The decision record (also in ``tailrank.json`` under ``"auto"``).

    Raises:
        FidelityError: No candidate passes the gate and ``force`` is off (nothing written).
    """
    src_dir = Path(model_dir)
    _ort.find_onnx(src_dir)
    names = list(CANDIDATES) if candidates is None else candidates
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise ModelError(f"unknown candidate(s) {unknown}; use some of {', '.join(CANDIDATES)}")
    flags = _ort.cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    if providers is None:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    samples = _load_samples(sample_pairs, src_dir)
    timer = timer or time_candidate

    record: dict[str, Any] = {
        "isa": sorted(f for isa in _ort.ISA_FLAGS.values() for f in isa if f in flags),
        "cpu_flags_considered": {k: list(v) for k, v in _ort.ISA_FLAGS.items()},
        "providers": providers,
        "threads": threads,
        "thresholds": {"kendall_tau": min_tau, "top1_kept": min_top1},
        "timed_requests": min(len(samples), _TIMED_REQUESTS),
        "candidates": {},
    }
    with tempfile.TemporaryDirectory(prefix="tailrank-auto-") as scratch:
        built: dict[str, Path] = {}
        for name in names:
            why = _unavailable(name, flags, providers)
            if why is not None:
                record["candidates"][name] = {"skipped": why}
                continue
            path = Path(scratch) / name
            try:
                report = _build(name, src_dir, path, samples, min_tau, min_top1, threads)
            except ModelError as e:  # a recipe this graph or onnxruntime cannot take
                shutil.rmtree(path, ignore_errors=True)
                record["candidates"][name] = {"skipped": str(e)}
                continue
            entry = {k: report[k] for k in ("passed", "kendall_tau", "kendall_tau_min", "top1_kept", "top10_overlap",
                                            "max_abs_logit_diff") if k in report}
            entry["seconds"] = float(timer(path, samples, threads))
            record["candidates"][name] = entry
            built[name] = path
        timed = {n: record["candidates"][n] for n in built}
        passing = [n for n, c in timed.items() if c["passed"]]
        if not passing and not (force and timed):
            summary = "; ".join(f"{n}: {c.get('skipped') or 'tau %.4f, top-1 %.3f' % (c['kendall_tau'], c['top1_kept'])}"
                                for n, c in record["candidates"].items())
            raise FidelityError(f"no candidate passes the fidelity gate (tau >= {min_tau}, top-1 >= {min_top1}); "
                                f"nothing written (pass --force to write the fastest anyway). {summary}", record)
        pool = passing or list(timed)
        chosen = min(pool, key=lambda n: timed[n]["seconds"])
        isa = CANDIDATES[chosen][2]
        portable = [n for n in passing if CANDIDATES[n][2] is None and CANDIDATES[n][1] == "cpu"]
        fallback = min(portable, key=lambda n: timed[n]["seconds"]) if isa and portable else None
        record["decision"] = chosen
        record["reason"] = (f"fastest of the candidates passing the gate ({', '.join(passing)})" if passing else
                            "forced: no candidate passes the gate; the fastest is written")
        record["fallback"] = fallback
        runtime: dict[str, Any] = _built_runtime(built[chosen], chosen)
        if isa:
            runtime["requires_cpu_flags"] = list(_ort.ISA_FLAGS[isa])
        if fallback:
            runtime["fallback"] = {"onnx": "onnx/fallback.onnx", **_runtime(fallback)}
        runtime["auto"] = record
        with atomic_output_dir(out_dir, force=force) as tmp:
            shutil.copytree(built[chosen], tmp, dirs_exist_ok=True)
            if fallback:
                shutil.copy2(built[fallback] / "onnx" / "model.onnx", tmp / "onnx" / "fallback.onnx")
            (tmp / _ort.RUNTIME_FILE).write_text(json.dumps(runtime, indent=1) + "\n", encoding="utf-8")
    return record
