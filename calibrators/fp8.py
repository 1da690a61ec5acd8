"""The FP8 E4M3 grid (``float8e4m3fn``): exact rounding in numpy, as ONNX QuantizeLinear and TensorRT do it.

E4M3 has 4 exponent and 3 mantissa bits, no infinities and a largest finite value of 448; its steps grow
with the magnitude (non-uniform), so the MSE range search must round on this grid, not on INT8's.
ONNX's QuantizeLinear (opset 19, ``saturate=1``) clips to ±448 and rounds to nearest even; ml_dtypes'
cast rounds to nearest even too but turns values past 448 into NaN, hence the clip first.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

E4M3_MAX = 448.0  # the largest finite float8e4m3fn: activation and weight scales are amax / 448
FP8_DTYPE: Any = ml_dtypes.float8_e4m3fn
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear take float8 types from opset 19


def to_fp8(x: np.ndarray) -> np.ndarray:
    """``x`` (already divided by its scale) saturated to ±448 and rounded to the E4M3 grid, as float8."""
    return np.clip(np.asarray(x, np.float32), -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)


def round_fp8(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the E4M3 grid (saturating), back as float32: a Q/DQ round trip with scale 1."""
    return np.asarray(to_fp8(x).astype(np.float32))


def fp8_zeros(shape: int | tuple[int, ...]) -> np.ndarray:
    """float8 zero points: FP8 Q/DQ is symmetric, the zero point only carries the element type."""
    return np.zeros(shape, FP8_DTYPE)


def quantization_mse_fp8(counts: np.ndarray, centers: np.ndarray, amaxes: np.ndarray) -> np.ndarray:
    """Expected squared error of FP8 fake-quantization (scale amax/448) of |x| (a histogram), per amax."""
    errors = np.empty(amaxes.size)
    total = max(float(counts.sum()), 1.0)
    c = centers.astype(np.float32)
    for lo in range(0, amaxes.size, 256):  # chunks keep the (candidates x bins) temporary small
        scale = (amaxes[lo : lo + 256, None] / E4M3_MAX).astype(np.float32)
        quantized = round_fp8(c[None, :] / scale) * scale
        errors[lo : lo + 256] = ((c[None, :] - quantized) ** 2 * counts[None, :]).sum(axis=1) / total
    return errors
