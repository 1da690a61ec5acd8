"""Range methods: turn one tensor's streaming statistics into a symmetric clipping threshold (amax).

All methods read the same :class:`TensorStats`, so several can be computed from one collection pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from calibrators.fp8 import quantization_mse_fp8
from calibrators.histogram import TRT_BINS, TensorStats
from trtbuild.core.errors import TrtbuildError

QUANT_LEVELS = 128  # 8-bit signed: 127 levels + zero per side, as TensorRT quantizes |x|
START_BIN = 128  # smallest candidate threshold, in histogram bins
DEFAULT_PERCENTILE = 99.99
# The default range method. Measured in bench/bench_quantize.py (same data, logit SQNR vs FP32):
# EfficientNet-Lite0 mse 21.5 dB vs entropy 15.3, MiniLM 14.4 vs 7.2, PP-OCR detector a tie. TensorRT's
# entropy clips the saturated ReLU6 tails that feed the project convs, and those values matter most.
DEFAULT_METHOD = "mse"
# The grid a range is chosen for: only the MSE search depends on it (FP8's steps grow with the magnitude);
# entropy, percentile and minmax read the distribution alone, as for INT8.
GRIDS = ("int8", "fp8")


def entropy_divergences(
    bins: np.ndarray, start_bin: int = START_BIN, levels: int = QUANT_LEVELS
) -> np.ndarray:
    """KL(P‖Q) for every candidate i = start_bin..len(bins) (TensorRT's entropy calibration), vectorized.

    For candidate i: P = bins[:i] with the outliers bins[i:] folded into P[i-1]; Q = bins[:i] quantized into
    ``levels`` groups (group l holds bins j with floor(levels*j/i) == l), each group's count spread evenly
    over its non-empty bins, empty bins kept empty. Both normalized. Instead of building P and Q per
    candidate, the sum is expanded so it needs only prefix sums of b, b*log(b) and non-empty counts:
        T*KL = sum_{j<i-1} b_j log b_j - sum_l c_l log(c_l/n_l) + b_{i-1} log(c_L/n_L)
               + (S_i - b_{i-1}) log(S_i/T) + P_{i-1} (log P_{i-1} - log(c_L/n_L) + log(S_i/T))
    with S_i = sum(bins[:i]), T = sum(bins), c_l/n_l the count/non-empty bins of group l, L the last group.
    """
    b = np.asarray(bins, dtype=np.float64)
    nbins = b.size
    total = b.sum()
    candidates = np.arange(start_bin, nbins + 1)
    prefix = np.concatenate(([0.0], np.cumsum(b)))
    nonzero = np.concatenate(([0], np.cumsum(b > 0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        blogb = np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0)
    prefix_blogb = np.concatenate(([0.0], np.cumsum(blogb)))

    # Group boundaries per candidate: start of group l is ceil(l*i/levels).
    group = np.arange(levels + 1)
    bounds = -((-group[None, :] * candidates[:, None]) // levels)  # (K, levels+1) ceil division
    counts = prefix[bounds[:, 1:]] - prefix[bounds[:, :-1]]
    filled = (nonzero[bounds[:, 1:]] - nonzero[bounds[:, :-1]]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(counts > 0, counts / np.where(filled > 0, filled, 1.0), 1.0)
        group_terms = np.where(counts > 0, counts * np.log(mean), 0.0).sum(axis=1)
        kept = prefix[candidates]
        last = b[candidates - 1]
        folded = last + (total - kept)
        last_mean = mean[:, -1]
        log_ratio = np.log(np.where(kept > 0, kept, 1.0) / total)
        body = (
            prefix_blogb[candidates - 1]
            - group_terms
            + np.where(last > 0, last * np.log(last_mean), 0.0)
            + (kept - last) * log_ratio
        )
        tail = np.where(
            folded > 0,
            np.where(
                last > 0,
                folded * (np.log(np.where(folded > 0, folded, 1.0)) - np.log(last_mean) + log_ratio),
                np.inf,
            ),
            0.0,
        )
    divergence = (body + tail) / total
    return np.asarray(np.maximum(divergence, 0.0))  # tiny negatives are rounding


def entropy_amax(stats: TensorStats, bins: int = TRT_BINS, start_bin: int = START_BIN) -> float:
    """TensorRT's entropy (KL) threshold: right edge of the bin count that minimizes KL(P‖Q)."""
    counts, edges = stats.trt_histogram(bins)
    if stats.absmax == 0.0:
        return 0.0
    counts = counts.copy()
    # As NVIDIA's pytorch-quantization does: exact zeros (ReLU outputs, padding) would otherwise make
    # bin 0 a spike that no coarse level can represent, and dominate the divergence.
    counts[0] = counts[1]
    if counts.sum() <= 0:
        return float(edges[-1])
    divergence = entropy_divergences(counts, start_bin)
    best = divergence.size - 1 - int(np.argmin(divergence[::-1]))  # last minimum, as pytorch-quantization
    return float(edges[best + start_bin])


def percentile_amax(stats: TensorStats, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The given percentile of |x| (interpolated within the fine histogram)."""
    if not 0.0 < percentile <= 100.0:
        raise TrtbuildError(
            f"percentile {percentile} is out of range", "pass a value in (0, 100], e.g. 99.99"
        )
    if stats.absmax == 0.0:
        return 0.0
    points, cumulative = stats.abs_cdf()
    target = percentile / 100.0 * cumulative[-1]
    k = int(np.searchsorted(cumulative, target, side="left"))
    if k == 0:
        return 0.0
    k = min(k, points.size - 1)
    span = cumulative[k] - cumulative[k - 1]
    frac = 0.0 if span <= 0 else (target - cumulative[k - 1]) / span
    return float(min(points[k - 1] + frac * (points[k] - points[k - 1]), stats.absmax))


def minmax_amax(stats: TensorStats) -> float:
    return float(stats.absmax)


def quantization_mse(counts: np.ndarray, centers: np.ndarray, amaxes: np.ndarray) -> np.ndarray:
    """Expected squared error of symmetric INT8 fake-quantization of |x| (given as a histogram) per amax."""
    errors = np.empty(amaxes.size)
    total = max(counts.sum(), 1.0)
    for lo in range(0, amaxes.size, 256):  # chunks keep the (candidates x bins) temporary small
        amax = amaxes[lo : lo + 256, None]
        step = amax / 127.0
        quantized = np.minimum(np.round(centers[None, :] / step), 127.0) * step
        errors[lo : lo + 256] = ((centers[None, :] - quantized) ** 2 * counts[None, :]).sum(axis=1) / total
    return errors


def mse_amax(
    stats: TensorStats, bins: int = TRT_BINS, start_bin: int = START_BIN, grid: str = "int8"
) -> float:
    """The amax (a histogram edge from ``start_bin`` on) that minimizes the expected quantization MSE on
    ``grid`` (int8: 127 uniform steps; fp8: the E4M3 grid scaled by amax/448)."""
    if stats.absmax == 0.0:
        return 0.0
    counts, edges = stats.trt_histogram(bins)
    centers = (edges[1:] + edges[:-1]) / 2
    candidates = edges[start_bin:]
    mse = quantization_mse_fp8 if grid == "fp8" else quantization_mse
    errors = mse(counts, centers, candidates)
    return float(candidates[int(np.argmin(errors))])


METHODS: dict[str, Callable[..., float]] = {
    "entropy": entropy_amax,
    "percentile": percentile_amax,
    "minmax": minmax_amax,
    "mse": mse_amax,
}


def amax_for(
    stats: TensorStats, method: str, percentile: float = DEFAULT_PERCENTILE, grid: str = "int8"
) -> float:
    if method not in METHODS:
        raise TrtbuildError(f"unknown calibration method '{method}'", f"use one of {', '.join(METHODS)}")
    if grid not in GRIDS:
        raise TrtbuildError(f"unknown quantization grid '{grid}'", f"use one of {', '.join(GRIDS)}")
    if method == "mse":
        return mse_amax(stats, grid=grid)
    if method == "percentile":
        return percentile_amax(stats, percentile)
    return METHODS[method](stats)
