"""How much a held-out measurement can be trusted: 95% intervals and the default held-out size.

A gate decided on 32 samples cannot tell a model that agrees with FP32 on 97% of inputs from one that
agrees on all of them (P(32 of 32 agree | p = 0.97) = 38%). The report therefore carries the held-out
count, a Wilson interval for top-1 agreement and a t-interval for the mean cosine, and warns when the
gate is decided on fewer than ``MIN_TRUSTED_SAMPLES`` samples.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
MIN_TRUSTED_SAMPLES = 32  # below this the report says the gate is decided on too few samples
# Default held-out size (docs/fidelity-gate.md): the calibration part keeps at least half of the data up
# to MIN_CALIBRATION samples (entropy ranges barely move beyond that), the held-out part gets the rest up
# to MAX_AUTO_HOLDOUT (at 200, a 99% gate allows 2 disagreements: a 97% model passes 6% of the time).
MIN_CALIBRATION = 64
MAX_AUTO_HOLDOUT = 200
STREAM_HOLDOUT = 32  # a stream's length is unknown: hold out what the old default did


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good at p near 1, unlike the normal interval)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _t_quantile(df: int, z: float = Z95) -> float:
    """Student-t quantile from the normal one (Cornish-Fisher, 3 terms): within 1% for df >= 3."""
    if df <= 0:
        return math.inf
    if df == 1:
        return 12.706
    if df == 2:
        return 4.303
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def mean_interval(values: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> tuple[float, float]:
    """95% t-interval of the mean of ``values``, clipped to [lo, hi] (cosines live in [-1, 1])."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return (lo, hi)
    mean = float(v.mean())
    if v.size == 1:
        return (lo, hi)
    half = _t_quantile(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return (max(lo, mean - half), min(hi, mean + half))


def auto_holdout(available: int | None, calibration: int | None = None) -> int:
    """The default held-out size for ``available`` samples (None: a stream of unknown length).

    ``calibration``: the samples asked for with --samples; the held-out part then takes what is left (up
    to the cap) so both fit."""
    if available is None:
        return STREAM_HOLDOUT
    if available < 2:
        return 1  # the split then says there is nothing left to calibrate on
    if calibration is not None and 0 < calibration < available:
        return max(1, min(MAX_AUTO_HOLDOUT, available - calibration))
    return min(MAX_AUTO_HOLDOUT, max(available - MIN_CALIBRATION, available // 2))


def small_sample_warning(n: int) -> str | None:
    """The line to print when a gate is decided on fewer than ``MIN_TRUSTED_SAMPLES`` samples."""
    if n >= MIN_TRUSTED_SAMPLES:
        return None
    lo, _ = wilson_interval(n, n)
    return (
        f"the fidelity gate is decided on only {n} held-out samples (< {MIN_TRUSTED_SAMPLES}): even "
        f"{n} of {n} agreeing only shows top-1 agreement >= {lo:.1%} (95% interval); hold out more "
        "samples (--holdout) for a gate that means something"
    )
