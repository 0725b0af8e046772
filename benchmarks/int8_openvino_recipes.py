"""NNCF static int8 variants for OpenVINO (issue 17): fidelity on held-out SciFact claims and the
time per request on the OpenVINO provider, each beside bf16 in the same run.

Calibrates on the even claims, gates on the odd ones (50 documents each), as ``optimize
--int8-openvino`` does; variants: ``all`` (every weight MatMul int8), ``no-ffn2`` (FFN
down-projections kept in float: what ``--int8-openvino`` ships), ``sq05`` (SmoothQuant alpha 0.5).
Needs .venv-openvino (onnxruntime-openvino) with nncf:

    .venv-openvino/bin/python benchmarks/int8_openvino_recipes.py --model-dir MODEL_DIR --work DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from tailrank import optimize as O
from tailrank.bench.workload import random_workload
from tailrank.cross_encoder import CrossEncoder


def quantize(src: Path, out: Path, calibration: list, variant: str) -> None:
    import nncf
    import onnx

    graph = src / "onnx" / "model.onnx"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    (out / "tailrank.json").write_text(json.dumps({"device": "openvino", "precision": "bf16"}))
    if variant == "no-ffn2":  # what optimize --int8-openvino ships: its own quantizer
        O._quantize_nncf(graph, out / "onnx" / "model.onnx", src, calibration)
        return
    kw: dict = {"model_type": nncf.ModelType.TRANSFORMER}
    if variant == "sq05":
        kw["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=0.5))
    feeds = O._calibration_feeds(src, graph, calibration)
    q = nncf.quantize(onnx.load(str(graph)), nncf.Dataset(feeds), subset_size=len(feeds), **kw)
    onnx.save(q, str(out / "onnx" / "model.onnx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="exported fp32 model directory")
    p.add_argument("--data", default="../shared/data/scifact")
    p.add_argument("--work", required=True)
    p.add_argument("--claims", type=int, default=60, help="calibration + gate claims (halves)")
    p.add_argument("--timed", type=int, default=5, help="100-candidate requests timed per system")
    p.add_argument("--variants", default="all,no-ffn2,sq05")
    args = p.parse_args()
    src, work = Path(args.model_dir), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = random_workload(args.data, args.claims, 50, 1, include_relevant=True, skip=20).requests
    calibration, gate = samples[0::2], samples[1::2]
    ref_ce = CrossEncoder(src, activation="none", device="cpu", threads=2)
    ref = [ref_ce.predict([(q, d) for d in docs]) for q, docs in gate]
    bf16 = work / "bf16"
    shutil.rmtree(bf16, ignore_errors=True)
    shutil.copytree(src, bf16)
    (bf16 / "tailrank.json").write_text(json.dumps({"device": "openvino", "precision": "bf16"}))
    dirs = {"bf16": bf16}
    for v in args.variants.split(","):
        dirs[v] = work / v
        quantize(src, dirs[v], calibration, v)
    timed = random_workload(args.data, args.timed + 1, 100, 0, include_relevant=True).requests
    ces = {k: CrossEncoder(d, activation="none", threads=2) for k, d in dirs.items()}
    rows = {}
    for k, ce in ces.items():
        taus, kept = [], []
        for (q, docs), a in zip(gate, ref):
            b = ce.predict([(q, d) for d in docs])
            ra, rb = O._ranking_score(a), O._ranking_score(b)
            taus.append(O.kendall_tau(ra, rb))
            kept.append(int(np.argmax(ra)) == int(np.argmax(rb)))
        rows[k] = {"kendall_tau": float(np.mean(taus)), "tau_min": float(np.min(taus)), "top1_kept": float(np.mean(kept)),
                   "ms": []}
        ce.rank(*timed[0])
    for q, docs in timed[1:]:  # interleaved: load swings hit every system alike
        for k, ce in ces.items():
            t = time.perf_counter()
            ce.rank(q, docs)
            rows[k]["ms"].append((time.perf_counter() - t) * 1000)
    base = float(np.median(rows["bf16"]["ms"]))
    for k, r in rows.items():
        med = float(np.median(r["ms"]))
        print(f"{k:8s} tau {r['kendall_tau']:.4f} (min {r['tau_min']:.3f}) top-1 {r['top1_kept']:.3f} "
              f"p50 {med:,.0f} ms  {base / med:.2f}x bf16")


if __name__ == "__main__":
    main()
