"""The profile report: one row per (model, batch), ratios against the FP32 baseline, accuracy in the same
row; rendered as a rich table, saved as JSON (and a PNG plot) atomically."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trtbuild.core.atomic import write_text
from trtbuild.harness.accuracy import AccuracyResult
from trtbuild.harness.stats import LatencyStats

SCHEMA = "trtbuild.profile/1"


@dataclass
class CandidateResult:
    name: str
    model: str
    runtime: str
    device: str
    batch: int
    size_bytes: int
    stats: LatencyStats
    latencies_ms: list[float]
    split: dict[str, LatencyStats] = field(default_factory=dict)  # h2d / compute / d2h / host (GPU)
    peak_host_bytes: int | None = None
    device_bytes: int | None = None
    warmup_iterations: int = 0
    wall_s: float = 0.0
    accuracy: AccuracyResult | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch}"

    @property
    def memory_bytes(self) -> int | None:
        """The memory that matters for this runner: device memory on GPU, host RSS growth on CPU."""
        return self.device_bytes if self.device == "cuda" else self.peak_host_bytes


@dataclass
class ProfileReport:
    candidates: list[CandidateResult]
    baseline: str  # name of the baseline model (the FP32 reference)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def baseline_for(self, cand: CandidateResult) -> CandidateResult | None:
        """The baseline model's row at the same batch size (ratios only compare like with like)."""
        for c in self.candidates:
            if c.name == self.baseline and c.batch == cand.batch:
                return c
        return None

    def ratios(self, cand: CandidateResult) -> dict[str, float | None]:
        """speedup = baseline median / candidate median; size and memory as candidate / baseline."""
        base = self.baseline_for(cand)
        if base is None:
            return {"speedup": None, "size_ratio": None, "memory_ratio": None}
        mem_c, mem_b = cand.memory_bytes, base.memory_bytes
        return {
            "speedup": base.stats.median_ms / cand.stats.median_ms if cand.stats.median_ms > 0 else None,
            "size_ratio": cand.size_bytes / base.size_bytes if base.size_bytes else None,
            "memory_ratio": mem_c / mem_b if mem_c is not None and mem_b else None,
        }

    # -- output -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        rows = []
        for c in self.candidates:
            rows.append(
                {
                    "name": c.name,
                    "model": c.model,
                    "runtime": c.runtime,
                    "device": c.device,
                    "batch": c.batch,
                    "size_bytes": c.size_bytes,
                    "latency": c.stats.to_dict(),
                    "split": {k: v.to_dict() for k, v in c.split.items()},
                    "peak_host_bytes": c.peak_host_bytes,
                    "device_bytes": c.device_bytes,
                    "warmup_iterations": c.warmup_iterations,
                    "wall_s": c.wall_s,
                    "accuracy": c.accuracy.to_dict() if c.accuracy else None,
                    "vs_baseline": self.ratios(c),
                    "warnings": c.warnings,
                    "latencies_ms": c.latencies_ms,
                }
            )
        return {
            "schema": SCHEMA,
            "baseline": self.baseline,
            "settings": self.settings,
            "environment": self.environment,
            "warnings": self.all_warnings(),
            "candidates": rows,
        }

    def all_warnings(self) -> list[str]:
        return self.warnings + [w for c in self.candidates for w in c.warnings]

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2)

    def save(self, json_path: str | Path | None = None, png_path: str | Path | None = None) -> list[Path]:
        """Write the JSON report and/or the latency plot, each atomically; returns the paths written."""
        written = []
        if json_path is not None:
            written.append(write_text(json_path, self.to_json() + "\n"))
        if png_path is not None:
            from trtbuild.harness.plot import save_latency_plot

            written.append(save_latency_plot(self, png_path))
        return written

    def print(self, out: Console | None = None) -> None:
        """Print the tables and warnings. Piped or in CI, rich would squeeze 17 columns into 80, so a
        non-terminal gets a wide console; a terminal keeps its own width."""
        from trtbuild.core import console

        for w in self.warnings:
            console.warn(w)
        if out is None:
            out = console.out if console.out.is_terminal else Console(width=220)
        out.print(self.table())
        split = self.split_table()
        if split is not None:
            out.print(split)

    def table(self) -> Table:
        t = Table(title=f"trtbuild profile (baseline: {self.baseline})", title_justify="left")
        for col in (
            "model",
            "runtime",
            "batch",
            "size MB",
            "median ms",
            "p90",
            "p95",
            "p99",
            "items/s",
            "mem MB",
            "speedup",
            "size ×",
            "mem ×",
            "max abs err",
            "err/range",
            "cosine",
            "top-1",
        ):
            t.add_column(col, justify="left" if col in ("model", "runtime") else "right", no_wrap=True)
        for c in self.candidates:
            r, s, a = self.ratios(c), c.stats, c.accuracy
            mem = c.memory_bytes
            t.add_row(
                c.name + (" [dim](base)[/dim]" if c.name == self.baseline else ""),
                f"{c.runtime}/{c.device}",
                str(c.batch),
                f"{c.size_bytes / 1e6:.2f}",
                f"{s.median_ms:.3f}",
                f"{s.p90_ms:.3f}",
                f"{s.p95_ms:.3f}",
                f"{s.p99_ms:.3f}",
                f"{s.throughput:.1f}",
                "-" if mem is None else f"{mem / 1e6:.1f}",
                _x(r["speedup"]),
                _x(r["size_ratio"]),
                _x(r["memory_ratio"]),
                "-" if a is None else f"{a.max_abs:.3g}",
                "-" if a is None else f"{a.err_over_range:.2%}",
                "-" if a is None else f"{a.cosine:.5f}",
                "-" if a is None or a.top1_agreement is None else f"{a.top1_agreement:.1%}",
            )
        return t

    def split_table(self) -> Table | None:
        """GPU rows: median H2D / compute / D2H from CUDA events, as trtexec reports them."""
        rows = [c for c in self.candidates if c.split]
        if not rows:
            return None
        t = Table(title="GPU time split (median ms, CUDA events)", title_justify="left")
        for col in ("model", "batch", "H2D", "compute", "D2H", "host"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for c in rows:
            t.add_row(
                c.name,
                str(c.batch),
                *(
                    f"{c.split[k].median_ms:.3f}" if k in c.split else "-"
                    for k in ("h2d", "compute", "d2h", "host")
                ),
            )
        return t


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
