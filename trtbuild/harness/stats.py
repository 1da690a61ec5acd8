"""Latency statistics: percentiles, throughput and a verdict on whether the machine was too noisy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# A run whose tail is far from its middle measured the machine, not the model.
SPREAD_LIMIT = 1.5  # p99 / median
CV_LIMIT = 0.25  # standard deviation / mean


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies in milliseconds (trtexec's set, plus spread)."""

    count: int
    min_ms: float
    max_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    std_ms: float
    batch: int
    throughput: float  # samples per second at the mean latency, back-to-back

    @property
    def cv(self) -> float:
        return self.std_ms / self.mean_ms if self.mean_ms > 0 else 0.0

    @property
    def spread(self) -> float:
        return self.p99_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_LIMIT or self.cv > CV_LIMIT

    def spread_warning(self, label: str) -> str | None:
        if not self.noisy:
            return None
        return (
            f"{label}: latency spread is large (p99/median {self.spread:.2f}, CV {self.cv:.2f}); "
            "the machine is noisy, so compare medians and rerun with more iterations on a quiet machine"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(cv=self.cv, spread=self.spread, noisy=self.noisy)
        return data


def latency_stats(latencies_ms: Sequence[float] | np.ndarray, batch: int = 1) -> LatencyStats:
    """Summarise latencies; throughput counts ``batch`` samples per iteration."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("latency_stats needs a non-empty 1-D sequence of latencies")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("latencies must be finite and non-negative")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    p90, p95, p99, median = np.percentile(values, [90, 95, 99, 50])
    mean = float(values.mean())
    return LatencyStats(
        count=int(values.size),
        min_ms=float(values.min()),
        max_ms=float(values.max()),
        mean_ms=mean,
        median_ms=float(median),
        p90_ms=float(p90),
        p95_ms=float(p95),
        p99_ms=float(p99),
        std_ms=float(values.std()),
        batch=batch,
        throughput=batch * 1000.0 / mean if mean > 0 else float("inf"),
    )
