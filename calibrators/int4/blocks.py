"""Symmetric block-wise INT4 of a weight matrix along its reduction axis, by round-to-nearest (RTN).

Weights are handled as [K, N] (K: the reduction axis, the MatMul layout); each run of ``block`` rows of one
column shares one scale. TensorRT's INT4 is symmetric with no zero point, so values are round(w / s)
clipped to [-8, 7] with s = max|w| / 7 over the block (the -8 code stays unused: the grid is symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK_SIZE = 128
QMIN, QMAX = -8, 7


@dataclass(frozen=True)
class BlockQuant:
    """INT4 codes [K, N] (int8 storage) and per-block scales [K / block, N]."""

    codes: np.ndarray
    scales: np.ndarray
    block: int

    def dequantized(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.block)


def block_scales(weight: np.ndarray, block: int, clip: np.ndarray | float = 1.0) -> np.ndarray:
    """max|w| / 7 per block ([K / block, N]); ``clip`` shrinks the range (AWQ's clip search)."""
    k, n = weight.shape
    peak = np.abs(weight.reshape(k // block, block, n)).max(axis=1) * clip
    return np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)


def quantize_with(weight: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """INT4 codes of ``weight`` for given per-block ``scales``."""
    expanded = np.repeat(scales, block, axis=0)
    return np.clip(np.rint(weight / expanded), QMIN, QMAX).astype(np.int8)


def dequantize(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """What DequantizeLinear(axis=0, block_size=block) computes, in float32."""
    return (codes.astype(np.float32) * np.repeat(scales, block, axis=0)).astype(np.float32)


def quantize_blocks(weight: np.ndarray, block: int, clip: np.ndarray | float = 1.0) -> BlockQuant:
    """Round-to-nearest INT4 of ``weight`` [K, N] in blocks of ``block`` rows (K % block == 0)."""
    w = np.asarray(weight, np.float32)
    if w.ndim != 2 or w.shape[0] % block:
        raise ValueError(f"weight {w.shape} cannot be split into blocks of {block} along axis 0")
    scales = block_scales(w, block, clip)
    return BlockQuant(quantize_with(w, scales, block), scales, block)
