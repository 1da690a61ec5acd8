"""Latency plot (PNG, Agg backend): histogram per candidate and latency-by-percentile curves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trtbuild.core.atomic import atomic_path

if TYPE_CHECKING:
    from trtbuild.harness.report import ProfileReport


def save_latency_plot(report: ProfileReport, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, no GUI backend

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    hist_ax, pct_ax = fig.subplots(1, 2)
    pct = np.linspace(0, 100, 201)
    everything = np.concatenate([np.asarray(c.latencies_ms) for c in report.candidates])
    edges = np.linspace(everything.min(), everything.max(), 61)  # shared bins: bars compare directly
    for c in report.candidates:
        lat = np.asarray(c.latencies_ms)
        label = f"{c.label} (median {c.stats.median_ms:.2f} ms)"
        hist_ax.hist(lat, bins=edges, alpha=0.55, label=label)
        line = pct_ax.plot(pct, np.percentile(lat, pct), label=c.label)[0]
        for q in (50, 90, 99):
            pct_ax.plot([q], [np.percentile(lat, q)], "o", color=line.get_color(), markersize=4)
    hist_ax.set(title="Latency histogram", xlabel="latency (ms)", ylabel="iterations")
    pct_ax.set(
        title="Latency by percentile (dots: p50, p90, p99)", xlabel="percentile", ylabel="latency (ms)"
    )
    hist_ax.legend(fontsize="small")
    pct_ax.legend(fontsize="small")
    pct_ax.grid(alpha=0.3)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
