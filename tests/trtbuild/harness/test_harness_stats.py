"""Latency statistics on arrays whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from trtbuild.harness.stats import latency_stats


def test_percentiles_of_one_to_hundred() -> None:
    s = latency_stats(np.arange(1, 101, dtype=float), batch=1)
    assert s.count == 100
    assert (s.min_ms, s.max_ms) == (1.0, 100.0)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.median_ms == pytest.approx(50.5)
    # numpy's linear interpolation: p = 1 + (n-1) * q
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p95_ms == pytest.approx(95.05)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.std_ms == pytest.approx(np.arange(1, 101).std())


def test_throughput_counts_batch_samples() -> None:
    s = latency_stats([10.0] * 20, batch=8)  # 8 samples every 10 ms
    assert s.throughput == pytest.approx(800.0)
    assert s.cv == 0.0 and s.spread == pytest.approx(1.0)
    assert not s.noisy and s.spread_warning("m") is None


def test_spread_warning_on_long_tail() -> None:
    lat = [10.0] * 95 + [40.0] * 5  # p99 is 4x the median
    s = latency_stats(lat)
    assert s.spread > 1.5 and s.noisy
    warning = s.spread_warning("model.onnx")
    assert warning is not None and "model.onnx" in warning and "p99/median" in warning


def test_high_cv_alone_is_noisy() -> None:
    s = latency_stats([5.0, 15.0] * 50)  # median 10, p99 15 (spread 1.5 exactly), CV 0.5
    assert s.spread == pytest.approx(1.5)
    assert s.cv == pytest.approx(0.5)
    assert s.noisy


def test_to_dict_has_derived_fields() -> None:
    d = latency_stats([1.0, 2.0, 3.0]).to_dict()
    assert {"median_ms", "p99_ms", "throughput", "cv", "spread", "noisy"} <= d.keys()


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [-1.0, 2.0]])
def test_rejects_empty_nan_negative(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        latency_stats(bad)
