"""Range methods on known distributions, and the histogram's invariance to batch split and order."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from calibrators import histogram, methods
from calibrators.histogram import FINE_BINS, TRT_BINS, TensorStats


def _stats(values: np.ndarray, batches: int = 1, name: str = "t") -> TensorStats:
    stats = TensorStats(name)
    for part in np.array_split(values, batches):
        stats.update(part)
    return stats


@pytest.fixture(scope="module")
def gaussian_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, 400_000).astype(np.float32)
    x[:40] = rng.choice([-1.0, 1.0], 40) * rng.uniform(40.0, 60.0, 40)  # 0.01 % far outliers
    return x


def _reference_kl(bins: np.ndarray, i: int, levels: int = 128) -> float:
    """TensorRT's published steps for one candidate, written plainly (loops, no algebra)."""
    p = bins[:i].astype(np.float64).copy()
    p[i - 1] += bins[i:].sum()
    q = np.zeros(i)
    for level in range(levels):
        members = [j for j in range(i) if (j * levels) // i == level]
        nonempty = [j for j in members if bins[j] > 0]
        for j in nonempty:
            q[j] = bins[members].sum() / len(nonempty)
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def test_vectorized_kl_matches_the_published_steps(gaussian_outliers: np.ndarray) -> None:
    counts, _ = _stats(gaussian_outliers).trt_histogram()
    counts[0] = counts[1]
    fast = methods.entropy_divergences(counts)
    for i in (128, 129, 200, 255, 256, 1000, 1537, 2047, 2048):
        expected = _reference_kl(counts, i)
        got = fast[i - methods.START_BIN]
        if np.isinf(expected):
            assert np.isinf(got)
        else:
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_entropy_gaussian_with_outliers_clips_at_the_bulk(gaussian_outliers: np.ndarray) -> None:
    stats = _stats(gaussian_outliers)
    amax = methods.entropy_amax(stats)
    assert stats.absmax > 40
    assert 2.5 < amax < 6.0  # a few sigma, nowhere near the outliers at 40-60
    # The threshold is a right bin edge of the 2048-bin histogram over [0, max|x|].
    width = stats.absmax / TRT_BINS
    assert amax / width == pytest.approx(round(amax / width), abs=1e-6)


def test_entropy_uniform_keeps_nearly_the_whole_range() -> None:
    x = np.random.default_rng(1).uniform(-3.0, 3.0, 300_000).astype(np.float32)
    amax = methods.entropy_amax(_stats(x))
    assert 0.97 * 3.0 < amax <= 3.0 + 1e-6


def test_entropy_ignores_the_relu_zero_spike() -> None:
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(0, 1, 300_000), 0).astype(np.float32)  # half exact zeros
    amax = methods.entropy_amax(_stats(x))
    assert 2.0 < amax <= float(x.max())


def test_histogram_is_exactly_invariant_to_batch_split_and_order(gaussian_outliers: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    x = gaussian_outliers
    growing = np.sort(np.abs(x)) * rng.choice([-1.0, 1.0], x.size).astype(
        np.float32
    )  # max grows batch by batch
    one = _stats(growing, 1)
    cuts = [1, 10, 1000, 50_000, 50_001, 300_000]  # 7 uneven batches, the first ones tiny
    seven = TensorStats("t")
    for part in np.split(growing, cuts):
        seven.update(part)
    shuffled = _stats(rng.permutation(growing), 5)
    for other in (seven, shuffled):
        assert other.exponent == one.exponent
        np.testing.assert_array_equal(other.fine, one.fine)
        assert (other.min, other.max, other.count) == (one.min, one.max, one.count)
        for method in methods.METHODS:
            assert methods.amax_for(other, method) == methods.amax_for(one, method)


def test_merge_equals_one_pass(gaussian_outliers: np.ndarray) -> None:
    whole = _stats(gaussian_outliers)
    for first, second in ((slice(1000, None), slice(0, 1000)), (slice(0, 1000), slice(1000, None))):
        a, b = _stats(gaussian_outliers[first]), _stats(gaussian_outliers[second])  # different bin widths
        a.merge(b)
        assert a.exponent == whole.exponent
        np.testing.assert_array_equal(a.fine, whole.fine)


def test_stats_size_is_independent_of_sample_count() -> None:
    rng = np.random.default_rng(4)
    few, many = TensorStats("t"), TensorStats("t")
    few.update(rng.normal(size=1000).astype(np.float32))
    for _ in range(200):
        many.update(rng.normal(size=20_000).astype(np.float32))
    assert many.count == 200 * few.count * 20
    assert many.fine.shape == few.fine.shape == (FINE_BINS,)
    assert abs(len(pickle.dumps(many)) - len(pickle.dumps(few))) < 1024


def test_minmax_and_percentile(gaussian_outliers: np.ndarray) -> None:
    stats = _stats(gaussian_outliers)
    absx = np.abs(gaussian_outliers.astype(np.float64))
    assert methods.minmax_amax(stats) == pytest.approx(absx.max())
    resolution = stats.bin_width
    for pct in (50.0, 99.0, 99.9):
        assert methods.percentile_amax(stats, pct) == pytest.approx(
            np.percentile(absx, pct), abs=2 * resolution
        )
    assert methods.percentile_amax(stats, 100.0) == pytest.approx(absx.max())
    p9999 = methods.percentile_amax(stats)
    assert 3.5 < p9999 < 40  # above the bulk's 99.99 % point (~3.9), below the outliers


def test_mse_is_between_bulk_and_max_and_minimizes_error(gaussian_outliers: np.ndarray) -> None:
    stats = _stats(gaussian_outliers)
    amax = methods.mse_amax(stats)
    assert 2.0 < amax <= stats.absmax

    def true_mse(a: float) -> float:  # direct fake-quantization of the raw data
        step = a / 127
        q = np.clip(np.round(gaussian_outliers / step), -127, 127) * step
        return float(np.mean((gaussian_outliers - q) ** 2))

    assert true_mse(amax) < true_mse(stats.absmax)
    assert true_mse(amax) < true_mse(1.0)
    uniform = _stats(np.random.default_rng(5).uniform(-1, 1, 200_000).astype(np.float32))
    assert methods.mse_amax(uniform) > 0.97


def test_all_zero_and_nonfinite() -> None:
    zeros = _stats(np.zeros(1000, np.float32))
    assert all(methods.amax_for(zeros, m) == 0.0 for m in methods.METHODS)
    stats = TensorStats("t")
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.array([1.0, np.inf], np.float32))


@pytest.mark.skipif(histogram.numba is None, reason="numba is not installed: only the numpy kernels exist")
def test_numba_and_numpy_kernels_agree_exactly(
    monkeypatch: pytest.MonkeyPatch, gaussian_outliers: np.ndarray
) -> None:
    data = [
        gaussian_outliers,
        gaussian_outliers.astype(np.float64) * 3,
        np.abs(gaussian_outliers[:5000]) * 1e-3,
    ]
    results = []
    for kernels in (
        (histogram._numpy_range, histogram._numpy_accumulate),
        (histogram._fast_range, histogram._fast_accumulate),
    ):
        monkeypatch.setattr(histogram, "_range", kernels[0])
        monkeypatch.setattr(histogram, "_accumulate", kernels[1])
        stats = TensorStats("t")
        for values in data:
            stats.update(values.copy(), overwrite=True)
        results.append(stats)
        with pytest.raises(ValueError, match="non-finite"):
            TensorStats("n").update(np.array([np.nan, 1.0, 2.0], np.float32))
    numpy_stats, numba_stats = results
    np.testing.assert_array_equal(numba_stats.fine, numpy_stats.fine)
    assert (numba_stats.min, numba_stats.max, numba_stats.exponent) == (
        numpy_stats.min,
        numpy_stats.max,
        numpy_stats.exponent,
    )
