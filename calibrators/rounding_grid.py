"""The two grid neighbours of each scaled weight, for learned rounding (calibrators/adaround.py).

Learned rounding chooses, per weight, the grid value just below or just above ``w / s``. On the INT8 grid
those are floor and floor + 1 (clipped to ±127; ±63 on the int7 grid of ORT-CPU graphs); on the FP8 E4M3
grid the step grows with the magnitude (1/8 of the binade, 2^-9 below the normal range), so the neighbours
come from the sorted table of every finite E4M3 value instead. Either way the learned value is a grid
value, so the Q/DQ graph stores it exactly (int8, or float8e4m3fn).
"""

from __future__ import annotations

import numpy as np

from calibrators import fp8
from calibrators import weights as wq

GRIDS = ("int8", "int7", wq.FP8)  # int7: ±63 stored in int8, ORT's CPUs whose u8 x s8 pairs saturate


def _fp8_values() -> np.ndarray:
    """Every finite E4M3 value, sorted (253 codes: the 256 bit patterns less the two NaNs and -0)."""
    codes = np.arange(256, dtype=np.uint8).view(fp8.FP8_DTYPE).astype(np.float32)
    return np.unique(codes[np.isfinite(codes)])


_FP8_VALUES = _fp8_values()


def neighbours(scaled: np.ndarray, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """(below, above): the largest grid value <= ``scaled`` and the smallest >= it (equal on the grid),
    float32, saturated to the grid's range as the Q/DQ does."""
    x = np.asarray(scaled, np.float32)
    if grid in ("int8", "int7"):
        qmax = wq.weight_qmax(grid)
        lo = np.clip(np.floor(x), -qmax, qmax)
        hi = np.clip(np.floor(x) + 1, -qmax, qmax)
        return lo.astype(np.float32), hi.astype(np.float32)
    if grid != wq.FP8:
        raise ValueError(f"unknown rounding grid {grid!r}")
    x = np.clip(x, -fp8.E4M3_MAX, fp8.E4M3_MAX)
    above = np.searchsorted(_FP8_VALUES, x, side="left")
    below = np.clip(np.searchsorted(_FP8_VALUES, x, side="right") - 1, 0, _FP8_VALUES.size - 1)
    return _FP8_VALUES[below], _FP8_VALUES[np.clip(above, 0, _FP8_VALUES.size - 1)]


def nearest(scaled: np.ndarray, grid: str) -> np.ndarray:
    """Round to nearest (even) on the grid, as the Q/DQ plan does without learned rounding, float32."""
    if grid == wq.FP8:
        return fp8.round_fp8(scaled)
    qmax = wq.weight_qmax(grid)
    return np.clip(np.rint(scaled), -qmax, qmax).astype(np.float32)


def stored(values: np.ndarray, grid: str) -> np.ndarray:
    """Grid values (float32) in the weight's storage type: int8, or float8e4m3fn (exact: on the grid)."""
    return fp8.to_fp8(values) if grid == wq.FP8 else np.asarray(values).astype(np.int8)
