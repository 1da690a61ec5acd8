"""Per-channel symmetric INT8 weight quantization (TensorRT's: zero point 0, range ±127)."""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def per_channel_scales(weight: np.ndarray, axis: int) -> np.ndarray:
    """max|w| / 127 per slice along ``axis`` (float32); an all-zero channel gets scale 1 (quantizes to 0)."""
    w = np.asarray(weight, dtype=np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce_axes) if reduce_axes else np.abs(w)
    scales = amax / INT8_MAX
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


def _broadcast(scales: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scales.reshape(shape)


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """round(w / scale) clipped to ±127, as int8."""
    w = np.asarray(weight, dtype=np.float32)
    q = np.rint(w / _broadcast(np.asarray(scales, np.float32), w.ndim, axis))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)


def dequantize_weight(q: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    return (q.astype(np.float32) * _broadcast(np.asarray(scales, np.float32), q.ndim, axis)).astype(
        np.float32
    )


def quantize_bias(
    bias: np.ndarray, input_scale: float, weight_scales: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bias as int32, scale = input scale x weight scale per channel (what ORT's QLinearConv fusion wants)."""
    scales = (np.float32(input_scale) * np.asarray(weight_scales, np.float32)).astype(np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    b = np.asarray(bias, dtype=np.float64)
    q = np.clip(np.rint(b / np.broadcast_to(scales, b.shape)), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    return q, scales
