"""GPTQ (Frantar et al. 2022): quantize a weight column by column along the reduction axis and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
calibration inputs (H = X^T X). Columns go in decreasing order of H's diagonal ("act order": the inputs
that matter most are quantized first, while there is the most freedom left to compensate). The block
scales are fixed up front from the FP32 weights ("static groups"), so act order keeps TensorRT's
contiguous block layout. Updates are applied lazily per 128 columns for speed.
"""

from __future__ import annotations

import numpy as np

from calibrators.int4.blocks import QMAX, QMIN, BlockQuant, block_scales

DAMP = 0.01  # share of the mean Hessian diagonal added for numerical stability (GPTQ's default)
LAZY = 128  # columns per lazy update


def _inverse_hessian_upper(h: np.ndarray) -> np.ndarray:
    h = h + DAMP * float(np.mean(np.diag(h))) * np.eye(h.shape[0])
    inverse = np.linalg.inv(h)
    return np.asarray(np.linalg.cholesky(inverse).T)  # upper-triangular factor, as GPTQ uses


def gptq(x: np.ndarray, weight: np.ndarray, block: int, act_order: bool = True) -> BlockQuant:
    """GPTQ of ``weight`` [K, N] with calibration inputs ``x`` [rows, K]."""
    h = x.astype(np.float64).T @ x.astype(np.float64)
    return gptq_hessian(h, weight, block, act_order)


def gptq_hessian(h: np.ndarray, weight: np.ndarray, block: int, act_order: bool = True) -> BlockQuant:
    """GPTQ of ``weight`` [K, N] given the Hessian ``h`` = X^T X [K, K] of its inputs."""
    k, n = weight.shape
    scales = block_scales(weight, block)  # [K / block, N], static groups
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w = weight.T.astype(np.float64).copy()  # [N, K]: columns are input channels, as in the paper
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[:, order], h[np.ix_(order, order)]
    column_scale = scales.T.astype(np.float64)[:, order // block]  # [N, K] scale of each permuted column
    hinv = _inverse_hessian_upper(h)
    codes = np.zeros((n, k), np.int8)
    for start in range(0, k, LAZY):
        end = min(start + LAZY, k)
        chunk = w[:, start:end].copy()
        errors = np.zeros_like(chunk)
        local = hinv[start:end, start:end]
        for i in range(end - start):
            s = column_scale[:, start + i]
            q = np.clip(np.rint(chunk[:, i] / s), QMIN, QMAX)
            codes[:, start + i] = q
            err = (chunk[:, i] - q * s) / local[i, i]
            chunk[:, i:] -= np.outer(err, local[i, i:])
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    unpermuted = np.empty_like(codes)
    unpermuted[:, order] = codes
    return BlockQuant(np.ascontiguousarray(unpermuted.T), scales, block)
