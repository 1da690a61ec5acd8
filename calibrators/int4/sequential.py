"""AWQ scales + GPTQ rounding, layer group by layer group in graph order, each group fitted to the FP32
model's output on the inputs the already-quantized layers before it really produce (``--int4-algorithm
awq-gptq``).

Per group of layers reading one activation (Q, K and V share theirs): X_f are its rows in the FP32 model,
X_q the same rows with every earlier group quantized. The weight that best restores the FP32 output from
the quantized input is the least-squares W* = (X_q^T X_q + l I)^-1 (X_q^T X_f W + l W) (l: GPTQ's
damping), since || X_f W - X_q V ||^2 = || X_q (W* - V) ||^2 + const; GPTQ then rounds W* with the
Hessian X_q^T X_q. Before rounding, AWQ's per-input-channel scale s (searched on X_f, calibrators/int4/
awq.py) is applied: GPTQ rounds diag(s) W* with the Hessian of X_q / s, and 1/s goes to the graph as for
AWQ. So each group also corrects the error the earlier groups left, which per-layer AWQ or GPTQ cannot.

X_q comes from calibrators/int4/segments.py: the graph runs piece by piece between the groups' inputs,
so all groups together cost one forward pass (the same X_q as a full pass of the partly quantized model).
Everything is computed from the three Gram matrices X_f^T X_f, X_q^T X_q, X_q^T X_f (float32 products,
float64 solves): the rows are touched three times per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from calibrators.int4 import awq, gptq, ridge
from calibrators.int4.blocks import BlockQuant
from calibrators.int4.graph import WeightLayer, weight_kn
from calibrators.int4.segments import SegmentRunner


@dataclass(frozen=True)
class GroupResult:
    quants: list[BlockQuant]
    scale: np.ndarray  # AWQ's s of the group's activation
    alpha: float
    error_rtn: float  # || X_f (RTN(W) - W) ||^2, each layer's error alone on FP32 inputs
    error: float  # || X_f W - X_q Q(W*) / s ||^2 of the group, with the errors before it
    ridges: list[float | None]  # per layer: the least-squares target's ridge (None: W itself)


def fit_group(
    xf: np.ndarray, xq: np.ndarray, weights: Sequence[np.ndarray], block: int | Sequence[int]
) -> GroupResult:
    """AWQ scale + GPTQ rounding of the layers reading one activation: FP32 rows ``xf``, the quantized
    model's rows ``xq`` (same rows) [rows, K]; weights [K, N] each; ``block``: one size or one per weight.
    The least-squares target's ridge is chosen per layer on held-out rows (ridge.py)."""
    blocks = awq.per_weight(block, len(weights))
    hf32 = xf.T @ xf  # float32: AWQ's grid search multiplies it 11 times per layer
    scale, alpha, error_rtn = awq.search_scale(xf, weights, blocks, hf32)
    s = scale.astype(np.float64)
    # float64 products: in float32, awq-gptq at 64 MiniLM sentences moved from 0.9791 to 0.9775 (the
    # Hessian is near singular there)
    full = ridge.grams(xq, xf)
    h_scaled = full.hq / np.outer(s, s)
    quants, error, ridges = [], 0.0, []
    for w, b in zip(weights, blocks, strict=True):
        w64 = w.astype(np.float64)
        chosen = ridge.choose_ridge(xq, xf, full, w64) if xq is not xf else ridge.RIDGES[0]
        ridges.append(chosen)
        target = ridge.target(full, w64, chosen)
        quant = gptq.gptq_hessian(h_scaled, (target * s[:, None]).astype(np.float32), b)
        quants.append(quant)
        error += ridge.error(full, quant.dequantized().astype(np.float64) / s[:, None], w64)
    return GroupResult(quants, scale, alpha, error_rtn, max(error, 0.0), ridges)


def stored_weight(layer: WeightLayer, quant: BlockQuant, scale: np.ndarray | None) -> np.ndarray:
    """Q(s W) / s in the initializer's layout: what the INT4 graph computes (the Mul by 1/s and the
    dequantization folded into the weight)."""
    w = quant.dequantized() / (scale[:, None] if scale is not None else 1.0)
    return np.ascontiguousarray(w.T if layer.transposed else w, np.float32)


def quantize_sequential(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    fp32_rows: Mapping[str, np.ndarray],
    runner: SegmentRunner,
    block: int | Mapping[str, int],
) -> tuple[dict[str, BlockQuant], dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """(quantized weights per node, AWQ scale per activation, per-node details), groups in graph order;
    ``runner`` runs the calibration batches through ``model`` (segments.py); ``block``: one size, or one
    per node (a byte budget's choice, budget.py)."""
    groups: dict[str, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.activation, []).append(layer)
    quants: dict[str, BlockQuant] = {}
    scales: dict[str, np.ndarray] = {}
    details: dict[str, dict[str, float]] = {}
    weights: dict[str, np.ndarray] = {}  # initializer -> its fake-quantized value, for the runner
    for activation in sorted(groups, key=runner.position):
        group = groups[activation]
        xf = fp32_rows[activation]
        xq = runner.rows(activation, weights) if quants else xf
        blocks = [block if isinstance(block, int) else block[layer.node] for layer in group]
        result = fit_group(xf, xq, [weight_kn(model, layer) for layer in group], blocks)
        scales[activation] = result.scale
        for layer, quant in zip(group, result.quants, strict=True):
            quants[layer.node] = quant
            weights[layer.weight] = stored_weight(layer, quant, result.scale)
            details[layer.node] = {
                "alpha": result.alpha,
                "error_rtn": result.error_rtn,
                "error": result.error,
            }
    return quants, scales, details
