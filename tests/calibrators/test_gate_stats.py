"""Held-out statistics of the fidelity gate: Wilson and t intervals against published values, the
default held-out size, and the small-sample warning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibrators import fidelity, gate_stats
from calibrators.output_kinds import OutputKind


@pytest.mark.parametrize(
    ("successes", "n", "lo", "hi"),
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(successes: int, n: int, lo: float, hi: float) -> None:
    got = gate_stats.wilson_interval(successes, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_all_agreeing_on_32_samples_only_shows_89_percent() -> None:
    lo, hi = gate_stats.wilson_interval(32, 32)
    assert lo == pytest.approx(32 / (32 + gate_stats.Z95**2)) and hi == 1.0
    assert lo < 0.9  # why 32 samples cannot back a 99% gate
    assert gate_stats.wilson_interval(200, 200)[0] > 0.98


def test_mean_cosine_t_interval() -> None:
    values = np.array([0.9] * 5 + [1.0] * 5)
    half = 2.2622 * values.std(ddof=1) / math.sqrt(10)  # t(0.975, 9 df) = 2.2622
    lo, hi = gate_stats.mean_interval(values)
    assert (lo, hi) == pytest.approx((0.95 - half, 0.95 + half), rel=2e-3)
    assert gate_stats.mean_interval(np.array([0.999, 1.0, 1.0]))[1] == 1.0  # clipped to a cosine


@pytest.mark.parametrize(
    ("available", "samples", "expected"),
    [(40, None, 20), (100, None, 50), (128, None, 64), (264, None, 200), (5000, None, 200), (40, 24, 16)],
)
def test_default_holdout_splits_the_data(available: int, samples: int | None, expected: int) -> None:
    assert gate_stats.auto_holdout(available, samples) == expected
    assert gate_stats.auto_holdout(None) == gate_stats.STREAM_HOLDOUT


def test_reports_carry_intervals_and_warn_below_32_samples() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 10))
    test = ref + rng.normal(scale=0.3, size=ref.shape)
    kind = OutputKind("classification", "test")
    report = fidelity.compare({"logits": ref}, {"logits": test}, kinds={"logits": kind})
    out = report.outputs[0]
    agree = int(round(out.top1_agreement * 20))
    assert out.top1_interval == gate_stats.wilson_interval(agree, 20)
    assert out.cosine_interval[0] <= out.cosine <= out.cosine_interval[1]
    assert report.sample_warning and "only 20 held-out samples" in report.sample_warning
    assert report.to_json()["sample_warning"] == report.sample_warning
    big = fidelity.compare({"logits": ref[:1].repeat(40, 0)}, {"logits": ref[:1].repeat(40, 0)})
    assert big.sample_warning is None and big.outputs[0].cosine_interval == (1.0, 1.0)
