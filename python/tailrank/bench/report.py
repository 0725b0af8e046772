"""Benchmark outputs: JSON, markdown tables and PNG plots (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .machine import environment_line

__all__ = ["markdown_table", "write_json", "write_text", "markdown", "plot_latency_cdf", "plot_latency_vs_load",
           "plot_speed_vs_quality"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:,.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    """The report of ``tailrank bench``: settings, library-mode latency, floor, quality, serve."""
    s, w = res["settings"], res["workload"]
    out = [
        "# tailrank bench",
        "",
        environment_line(res["machine"]),
        f"CPU flags: {' '.join(res['machine'].get('cpu_flags', [])) or 'unknown'}",
        "",
        f"Workload: {w['requests']} requests ({w['source']}), {w['pairs']} pairs, median pair "
        f"{_fmt(w.get('median_pair_tokens'), 0)} tokens, {_fmt(w.get('median_request_gflop'), 3)} GFLOP of real-token "
        f"matmuls per request (median); {s['threads']} thread(s) for every system; {s['warmup']} warm-up requests "
        f"excluded, then {s['repeats']} pass(es) over the requests, one at a time.",
        "",
        "## Library mode",
        "",
    ]
    if res.get("not_installed"):
        out += [f"Note: {res['not_installed']}.", ""]
    rates = res.get("matmul_gflops") or {}
    if rates:
        kernels = res.get("floor_kernels") or {}
        out += ["Matmul rate measured in this run (GFLOP/s; the fastest kernel installed for each precision sets its "
                "floor): " + ", ".join(f"{k} {v:,.0f}" + (f" ({kernels[k]['kernel']})" if k in kernels else "")
                                       for k, v in rates.items()), ""]
    else:
        out += [f"Compute floor not measured: {res.get('floor_skipped', 'no matmul rate')}", ""]
    rows = []
    for name, r in res["systems"].items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"]] + [""] * 10)
            continue
        lat, short = r["latency_ms"], set(r["insufficient_samples"])
        cells = [_fmt(lat[k]) + (" (n<%d)" % _need(k) if k in short else "") for k in ("min", "p50", "p90", "p99", "p99.9", "max")]
        fid = r.get("fidelity_vs_fp32", {})
        rows.append([
            name, r["precision"] + ("" if r.get("fidelity_gate_passed", True) else " (below gate)"), r["samples"], *cells,
            _fmt(r["pairs_per_s"], 0), _fmt(r.get("ratio_to_floor"), 2),
            f"{_fmt(fid.get('kendall_tau_mean'), 3)} / {_fmt(fid.get('top10_overlap_mean'), 2)}" if fid else "",
        ])
    out += [
        markdown_table(["system", "precision", "n", "min ms", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "pairs/s",
                        "p50 / floor", "tau / top-10 vs fp32"], rows),
        "",
        "A percentile marked (n<N) needs N samples to be more than the slowest few requests; it is shown, not trusted.",
        "`p50 / floor`: median latency over the median request's real-token FLOPs at the measured matmul rate of the "
        "system's precision (or fp32's, when faster).",
        "",
        "## Quality",
        "",
    ]
    q = res["quality"]
    if "skipped" in q:
        out += [f"Not measured: {q['skipped']}", ""]
    else:
        fs = q["first_stage"]
        out.append(f"First stage: {fs['skipped']}" if "skipped" in fs else "")
        metrics = [k for k in (q.get("systems") or {}).get(next(iter(q.get("systems") or {"": {}})), {}) if k != "queries"]
        qrows = []
        if "skipped" not in fs:
            qrows.append(["first stage", *[_fmt(fs.get(m), 4) for m in metrics]])
        for name, m in (q.get("systems") or {}).items():
            qrows.append([name, *[_fmt(m.get(k), 4) for k in metrics]])
        if metrics:
            out += ["", markdown_table(["ranking", *metrics], qrows), ""]
    fids = res.get("optimize_fidelity") or {}
    frows = [[p, "skipped: " + f["skipped"]] + [""] * 4 if "skipped" in f else
             [p, f.get("passed"), _fmt(f.get("kendall_tau"), 4), _fmt(f.get("top10_overlap"), 3), _fmt(f.get("top1_kept"), 3),
              f.get("queries")] for p, f in fids.items() if not f.get("reference")]
    if frows:
        out += ["`tailrank optimize` fidelity vs fp32 on held-out queries (its gate):", "",
                markdown_table(["precision", "passed", "kendall tau", "top-10 overlap", "top-1 kept", "queries"], frows), ""]
    out += ["## Serve mode", ""]
    sv = res.get("serve")
    if sv is None:
        out.append("Not run (pass --serve).")
    elif "skipped" in sv:
        out.append(f"Skipped: {sv['skipped']}")
    else:
        srows = []
        for r in sv["rates"]:
            lat = r.get("latency_ms") or {}
            srows.append([_fmt(r["rate"], 1), r["offered"], r["ok"], _fmt(r["rate_429"], 3), _fmt(r["goodput_rps"], 2),
                          *[_fmt(lat.get(k)) for k in ("p50", "p90", "p99", "max")]])
        out += [f"Open-loop Poisson load ({sv['threads']} thread(s)), {sv['duration_s']} s per rate, one request = one query "
                "x its candidates. Goodput: full (not degraded) 200 responses per second.", "",
                markdown_table(["rate req/s", "offered", "ok", "429 rate", "goodput req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                               srows)]
    if res.get("plots_skipped"):
        out += ["", f"Plots: none, {res['plots_skipped']}."]
    else:
        out += ["", "Plots: " + ", ".join(res.get("plots", [])) if res.get("plots") else ""]
    return "\n".join(out).rstrip() + "\n"


def _need(k: str) -> int:
    from .measure import MIN_SAMPLES

    return MIN_SAMPLES[k]


def _canvas(width: float = 7.0, height: float = 4.5) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_latency_cdf(systems: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Empirical CDF of per-request latency, one line per system that ran."""
    from matplotlib.ticker import ScalarFormatter

    fig, ax = _canvas()
    for name, r in systems.items():
        if "raw_ns" in r:
            ms = np.sort(np.asarray(r["raw_ns"], dtype=np.float64) / 1e6)
            share = np.arange(0, ms.size + 1) / ms.size
            ax.step(np.concatenate([ms[:1], ms]), share, where="post", label=f"{name} (n={ms.size})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("latency per request (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_title("Latency CDF (library mode)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(os.fspath(path), format="png")


def plot_latency_vs_load(serve: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """p50 / p99 latency and goodput against the offered rate (serve mode)."""
    fig, ax = _canvas()
    rates = [r["rate"] for r in serve["rates"]]
    for key in ("p50", "p99"):
        ax.plot(rates, [(r.get("latency_ms") or {}).get(key, np.nan) for r in serve["rates"]], marker="o", label=f"{key} latency")
    ax.set_xlabel("offered load (requests/s, open-loop Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(rates, [r["goodput_rps"] for r in serve["rates"]], color="gray", linestyle="--", marker="s", label="goodput")
    ax2.set_ylabel("goodput (requests/s)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(h.get_label()) for h in lines], fontsize=8, loc="upper left")
    ax.set_title("Latency vs load (tailrank serve)")
    fig.savefig(os.fspath(path), format="png")


def plot_speed_vs_quality(points: list[tuple[str, float, float]], quality_label: str, path: str | os.PathLike[str]) -> None:
    """One point per system: throughput (pairs/s) against a quality measure."""
    fig, ax = _canvas()
    for name, speed, quality in points:
        ax.scatter([speed], [quality])
        ax.annotate(name, (speed, quality), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("pairs/s (library mode)")
    ax.set_ylabel(quality_label)
    ax.set_title("Speed vs quality")
    ax.grid(True, alpha=0.3)
    fig.savefig(os.fspath(path), format="png")
