"""AWQ (activation-aware weight quantization, Lin et al. 2023) on the calibration inputs.

For the layers that read one activation X (Q, K and V share theirs), one per-input-channel scale
s = mean|X|^alpha (normalized to geometric mean 1) is searched over a grid of alpha, minimising the summed
output error || X W - (X / s) Q(diag(s) W) ||^2 of the group. alpha = 0 is plain RTN, so AWQ never does
worse than RTN on the calibration data. Then each block's range is shrunk by the clip ratio (searched per
block and output column) that minimises that block's own output error, as AWQ's clip step does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibrators.int4.blocks import BlockQuant, block_scales, dequantize, quantize_blocks, quantize_with

ALPHA_GRID = tuple(i / 10 for i in range(11))
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass(frozen=True)
class AwqChoice:
    scale: np.ndarray  # s per input channel: weights were multiplied by it, the input must be divided
    alpha: float
    error_rtn: float  # group output error with plain RTN (alpha 0, no clip)
    error: float  # with the chosen scale and clip


def output_error(gram: np.ndarray, delta: np.ndarray) -> float:
    """||X delta||^2 from the Gram matrix X^T X: K x K x N work instead of rows x K x N."""
    return float(np.sum(delta * (gram @ delta)))


def per_weight(block: int | Sequence[int], count: int) -> list[int]:
    """One block size per weight of a group (a byte budget may give each its own: budget.py)."""
    return [block] * count if isinstance(block, int) else list(block)


def search_scale(
    x: np.ndarray,
    weights: Sequence[np.ndarray],
    block: int | Sequence[int],
    gram: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """(s, alpha, RTN error) minimising the group's output error over ALPHA_GRID; ``gram``: X^T X if known;
    ``block``: one size for all weights or one per weight."""
    gram = x.T @ x if gram is None else gram
    blocks = per_weight(block, len(weights))
    mean_abs = np.maximum(np.abs(x).mean(axis=0), 1e-8)
    best: tuple[float, np.ndarray, float] | None = None
    error_rtn = 0.0
    for alpha in ALPHA_GRID:
        s = mean_abs**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        # (X / s) Q(s W) - X W = X (Q(s W) / s - W)
        error = sum(
            output_error(gram, quantize_blocks(w * s[:, None], b).dequantized() / s[:, None] - w)
            for w, b in zip(weights, blocks, strict=True)
        )
        if alpha == 0:
            error_rtn = error
        if best is None or error < best[0]:
            best = (error, s, alpha)
    assert best is not None
    return best[1], best[2], error_rtn


def search_clip(x: np.ndarray, weight: np.ndarray, block: int) -> BlockQuant:
    """Per (block, column) clip ratio from CLIP_GRID minimising that block's output error on ``x``."""
    k, n = weight.shape
    groups = k // block
    # the diagonal blocks of X^T X: each block's own output error is delta_b^T G_bb delta_b per column
    gram = (x.T @ x).reshape(groups, block, groups, block)[np.arange(groups), :, np.arange(groups), :]
    best_err = np.full((k // block, n), np.inf)
    best_scales = block_scales(weight, block)
    for ratio in CLIP_GRID:
        scales = block_scales(weight, block, ratio)
        delta = (weight - dequantize(quantize_with(weight, scales, block), scales, block)).reshape(
            groups, block, n
        )
        err = np.sum(delta * np.matmul(gram, delta), axis=1)  # [groups, N]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scales = np.where(better, scales, best_scales)
    return BlockQuant(quantize_with(weight, best_scales, block), best_scales.astype(np.float32), block)


def awq_group(
    x: np.ndarray, weights: Sequence[np.ndarray], block: int | Sequence[int]
) -> tuple[list[BlockQuant], AwqChoice]:
    """AWQ of the layers that share input ``x`` [rows, K]; weights [K, N] each; ``block``: one size or one
    per weight."""
    blocks = per_weight(block, len(weights))
    scale, alpha, error_rtn = search_scale(x, weights, blocks)
    scaled_x = x / scale
    quants = [search_clip(scaled_x, w * scale[:, None], b) for w, b in zip(weights, blocks, strict=True)]
    gram = x.T @ x
    error = sum(
        output_error(gram, q.dequantized() / scale[:, None] - w) for q, w in zip(quants, weights, strict=True)
    )
    return quants, AwqChoice(scale, alpha, error_rtn, error)
