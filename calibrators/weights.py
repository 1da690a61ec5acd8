"""Per-channel symmetric weight quantization: TensorRT's INT8 (zero point 0, range ±127) and the two
storage formats ONNX Runtime's x86 kernels need on CPUs without VNNI (docs/ort-cpu-int8.md):

- ``int8``: ±127, zero point 0. TensorRT, and ORT CPU where u8 x s8 products do not saturate (VNNI, ARM).
- ``int7``: ±63 stored as int8 (ORT's "reduce_range"): a pair of u8 x s7 products fits the int16 that
  AVX2's VPMADDUBSW sums into, so it cannot saturate; costs one bit of weight resolution.
- ``uint8``: the int8 grid shifted by 128 (values 1..255, zero point 128): ORT then runs its u8 x u8
  kernels, which widen to int16 before multiplying (VPMADDWD) and cannot saturate either; full resolution.
- ``fp8``: float8e4m3fn, scale max|w| / 448 per channel, saturating (TensorRT FP8, calibrators/fp8.py).
"""

from __future__ import annotations

import numpy as np

from calibrators import fp8

INT8_MAX = 127
WEIGHT_FORMATS = ("int8", "int7", "uint8")  # the integer formats (ORT CPU's --ort-weights choices)
FP8 = "fp8"
_QMAX: dict[str, float] = {"int8": 127, "int7": 63, "uint8": 127, "fp8": fp8.E4M3_MAX}
UINT8_ZERO_POINT = 128


def weight_qmax(weight_format: str) -> float:
    """Largest quantized magnitude of a weight format (its grid is -qmax..qmax around the zero point)."""
    return _QMAX[weight_format]


def per_channel_scales(weight: np.ndarray, axis: int, qmax: float = INT8_MAX) -> np.ndarray:
    """max|w| / qmax per slice along ``axis`` (float32); an all-zero channel gets scale 1 (quantizes to 0)."""
    w = np.asarray(weight, dtype=np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce_axes) if reduce_axes else np.abs(w)
    scales = amax / qmax
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


def _broadcast(scales: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scales.reshape(shape)


def quantize_weight(
    weight: np.ndarray, scales: np.ndarray, axis: int, weight_format: str = "int8"
) -> np.ndarray:
    """round(w / scale) clipped to ±127, as int8; for ``fp8`` w / scale on the E4M3 grid, as float8."""
    w = np.asarray(weight, dtype=np.float32)
    if weight_format == "fp8":
        return fp8.to_fp8(w / _broadcast(np.asarray(scales, np.float32), w.ndim, axis))
    q = np.rint(w / _broadcast(np.asarray(scales, np.float32), w.ndim, axis))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)


def stored_weight(q: np.ndarray, weight_format: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored values, per-channel zero points) of the symmetric grid ``q`` in ``weight_format``."""
    if weight_format == "fp8":
        return q, fp8.fp8_zeros(channels)
    if weight_format == "uint8":
        stored = (q.astype(np.int16) + UINT8_ZERO_POINT).astype(np.uint8)
        return stored, np.full(channels, UINT8_ZERO_POINT, np.uint8)
    return q.astype(np.int8), np.zeros(channels, np.int8)


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
