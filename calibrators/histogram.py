"""Streaming statistics of one activation tensor: min, max and a histogram of |x| that is exact under any
batch split or order.

Why not TensorRT's "2048 bins over [0, max]" directly: the max is only known after the last batch.
pytorch-quantization appends bins of the first batch's width, so its resolution depends on which batch came
first. Here the fine histogram has ``FINE_BINS`` bins whose width is a power of two, the smallest one that
covers the running max. When a later batch has a larger max, the width doubles and adjacent pairs merge;
since ``floor(floor(|x| / w) / 2) == floor(|x| / 2w)`` and dividing by a power of two is exact in floating
point, the merged histogram equals the one binned directly at the new width. The final histogram therefore
depends only on the set of values, never on batching. The 2048-bin histogram over [0, max] that the range
methods use is re-binned from it at the end (at least FINE_BINS / 2 / 2048 = 8 fine bins per coarse bin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

numba: ModuleType | None
try:  # optional: fused one-pass kernels, many times faster per element than numpy's passes; same results
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

FINE_BINS = 1 << 15  # 256 KiB of int64 counts per tensor, independent of the number of samples
TRT_BINS = 2048  # TensorRT's entropy histogram size


def _numpy_range(x: np.ndarray) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def _numpy_accumulate(flat: np.ndarray, scale: float, fine: np.ndarray, overwrite: bool) -> None:
    magnitude = np.abs(flat, out=flat if overwrite and flat.flags.writeable else None)
    magnitude *= magnitude.dtype.type(scale)  # exact: a power of two
    fine += np.bincount(magnitude.astype(np.int64), minlength=fine.size)


_range: Callable[[np.ndarray], tuple[float, float]] = _numpy_range
_accumulate: Callable[[np.ndarray, float, np.ndarray, bool], None] = _numpy_accumulate


def _jit(function: Callable[..., Any]) -> Callable[..., Any]:
    """``numba.njit(nogil=True)``, cached on disk where numba finds a writable cache folder.

    numba looks for one when the decorator runs (NUMBA_CACHE_DIR, the package's __pycache__, then
    ~/.cache/numba) and raises if none is writable, which made every command fail for users without a
    writable HOME and a read-only install. Then the kernels are compiled per process instead (a second or
    so, once, on first use) and never written anywhere.
    """
    assert numba is not None
    try:
        return numba.njit(nogil=True, cache=True)(function)  # type: ignore[no-any-return]
    except (RuntimeError, OSError):  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)  # type: ignore[no-any-return]


if numba is not None:

    @_jit
    def _numba_range(flat):  # type: ignore[no-untyped-def]
        lo, hi = flat[0], flat[0]
        for v in flat:
            if v < lo:
                lo = v
            elif v > hi:
                hi = v
            elif v != v:  # NaN compares false everywhere: report it through min
                return np.nan, np.nan
        return lo, hi

    @_jit
    def _numba_accumulate(flat, scale, fine):  # type: ignore[no-untyped-def]
        s = flat.dtype.type(scale)
        for v in flat:
            fine[np.int64(abs(v) * s)] += 1  # truncation == floor for |v| >= 0, as astype(int64)

    def _fast_range(x: np.ndarray) -> tuple[float, float]:
        lo, hi = _numba_range(x.reshape(-1))
        return float(lo), float(hi)

    def _fast_accumulate(flat: np.ndarray, scale: float, fine: np.ndarray, overwrite: bool) -> None:
        _numba_accumulate(flat, scale, fine)

    _range, _accumulate = _fast_range, _fast_accumulate


def _width_exponent(absmax: float) -> int:
    """Smallest e with absmax < FINE_BINS * 2**e (exact: frexp gives absmax/FINE_BINS = f * 2**e, f < 1)."""
    _, exponent = np.frexp(absmax / FINE_BINS)
    return int(exponent)


@dataclass
class TensorStats:
    """Running statistics of one tensor. Its size does not grow with the data it has seen."""

    name: str
    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    exponent: int | None = None  # fine bin width = 2**exponent; None until a non-zero value arrives
    fine: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, dtype=np.int64))
    # Sum of x per channel (axis 1) over everything else, for bias correction of the consumer's quantized
    # weights; None until a batch of rank >= 2 arrives, or when batches disagree on the channel count.
    channel_sum: np.ndarray | None = None
    channel_count: int = 0  # values summed into each channel
    channels_consistent: bool = True

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def bin_width(self) -> float:
        return 0.0 if self.exponent is None else float(np.ldexp(1.0, self.exponent))

    def update(self, values: np.ndarray, overwrite: bool = False) -> None:
        """Add a batch of values. ``overwrite`` lets it reuse ``values`` as scratch space (saves a copy).

        Raises ValueError on NaN/Inf (the caller names the tensor). Releases the GIL in numpy, so different
        tensors can be updated from different threads.
        """
        x = np.asarray(values)
        if x.size == 0:
            return
        if x.dtype != np.float32 and x.dtype != np.float64:
            x, overwrite = x.astype(np.float32), True
        lo, hi = _range(x)
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN propagates into min/max, Inf shows there
            raise ValueError("non-finite values (NaN or Inf)")
        self._add_channel_sums(x)  # before the histogram: that may overwrite x with |x|
        self.count += int(x.size)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        absmax = self.absmax
        if absmax == 0.0:  # all zeros so far: bin 0 at any width
            self.fine[0] += x.size
            return
        exponent = _width_exponent(absmax)
        if self.exponent is None:
            self.exponent = exponent
        elif exponent > self.exponent:
            self._coarsen(exponent - self.exponent)
        _accumulate(x.reshape(-1), float(np.ldexp(1.0, -self.exponent)), self.fine, overwrite)

    def _add_channel_sums(self, x: np.ndarray) -> None:
        if x.ndim < 2 or not self.channels_consistent:
            self.channel_sum, self.channels_consistent = None, False
            return
        # Contiguous rows first (pairwise float32 sums, ~4x faster than a float64 reduction), then batch.
        sums = x.reshape(x.shape[0], x.shape[1], -1).sum(axis=2).sum(axis=0, dtype=np.float64)
        if self.channel_sum is None and self.count == 0:  # called before count is updated
            self.channel_sum = sums
        elif self.channel_sum is not None and self.channel_sum.shape == sums.shape:
            self.channel_sum += sums
        else:  # channel count changed between batches (or earlier batches were rank < 2): no means
            self.channel_sum, self.channels_consistent = None, False
            return
        self.channel_count += x.size // x.shape[1]

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Mean of x per channel (axis 1), or None when unknown."""
        if self.channel_sum is None or self.channel_count == 0:
            return None
        return self.channel_sum / self.channel_count

    def _coarsen(self, doublings: int) -> None:
        factor = 1 << doublings
        merged = (
            self.fine.reshape(-1, factor).sum(axis=1) if factor <= FINE_BINS else self.fine.sum(keepdims=True)
        )
        self.fine = np.zeros(FINE_BINS, dtype=np.int64)
        self.fine[: merged.size] = merged
        self.exponent = (self.exponent or 0) + doublings

    def merge(self, other: TensorStats) -> None:
        """Combine with statistics of the same tensor gathered elsewhere (e.g. another process)."""
        if other.count == 0:
            return
        self._merge_channel_sums(other)
        if self.count == 0:
            self.count, self.min, self.max = other.count, other.min, other.max
            self.exponent, self.fine = other.exponent, other.fine.copy()
            return
        theirs = other.fine.copy()
        exponents = [e for e in (self.exponent, other.exponent) if e is not None]
        if exponents:
            target = max(exponents)
            if self.exponent is not None and self.exponent < target:
                self._coarsen(target - self.exponent)
            self.exponent = target
            if other.exponent is not None and other.exponent < target:
                factor = 1 << (target - other.exponent)
                merged = theirs.reshape(-1, factor).sum(axis=1)
                theirs = np.zeros(FINE_BINS, dtype=np.int64)
                theirs[: merged.size] = merged
        self.fine += theirs
        self.count += other.count
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def _merge_channel_sums(self, other: TensorStats) -> None:
        if self.count == 0:
            self.channels_consistent = other.channels_consistent
            self.channel_sum = None if other.channel_sum is None else other.channel_sum.copy()
            self.channel_count = other.channel_count
        elif (
            self.channel_sum is not None
            and other.channel_sum is not None
            and self.channel_sum.shape == other.channel_sum.shape
        ):
            self.channel_sum = self.channel_sum + other.channel_sum
            self.channel_count += other.channel_count
        else:
            self.channel_sum, self.channels_consistent = None, False

    def abs_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """Piecewise-linear CDF of |x|: (strictly increasing points from 0 to absmax, cumulative counts).

        Values are taken as uniform within a fine bin; the last occupied bin ends at absmax, not beyond.
        """
        absmax = self.absmax
        if absmax == 0.0 or self.exponent is None:
            return np.array([0.0, 0.0]), np.array([0.0, float(self.count)])
        width = self.bin_width
        last = min(int(absmax / width), FINE_BINS - 1)  # bin holding absmax
        counts = self.fine[: last + 1].astype(np.float64)
        points = np.arange(last + 1, dtype=np.float64) * width
        cumulative = np.concatenate(([0.0], np.cumsum(counts)))
        if absmax > points[-1]:
            points = np.append(points, absmax)
        else:  # absmax sits exactly on the last bin's left edge: that bin holds only |x| == absmax
            cumulative = cumulative[:-1]
            cumulative[-1] += counts[-1]
        return points, cumulative[: points.size]

    def trt_histogram(self, bins: int = TRT_BINS) -> tuple[np.ndarray, np.ndarray]:
        """The histogram TensorRT's entropy method works on: ``bins`` equal bins of |x| over [0, absmax].

        Returns (counts as float64, edges). Re-binned from the fine histogram.
        """
        absmax = self.absmax
        edges = np.linspace(0.0, absmax, bins + 1)
        if absmax == 0.0:
            counts = np.zeros(bins)
            counts[0] = self.count
            return counts, edges
        points, cumulative = self.abs_cdf()
        at_edges = np.interp(edges, points, cumulative)
        at_edges[0], at_edges[-1] = 0.0, float(self.count)
        return np.diff(at_edges), edges
