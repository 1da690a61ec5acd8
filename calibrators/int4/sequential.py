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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from calibrators.int4 import awq, gptq
from calibrators.int4.blocks import BlockQuant
from calibrators.int4.graph import WeightLayer, weight_kn

# rows of one activation in a model, aligned with the FP32 rows (same samples, same selection)
RowSource = Callable[[onnx.ModelProto, str], np.ndarray]


@dataclass(frozen=True)
class GroupResult:
    quants: list[BlockQuant]
    scale: np.ndarray  # AWQ's s of the group's activation
    alpha: float
    error_rtn: float  # || X_f (RTN(W) - W) ||^2, each layer's error alone on FP32 inputs
    error: float  # || X_f W - X_q Q(W*) / s ||^2 of the group, with the errors before it


def fit_group(xf: np.ndarray, xq: np.ndarray, weights: Sequence[np.ndarray], block: int) -> GroupResult:
    """AWQ scale + GPTQ rounding of the layers reading one activation: FP32 rows ``xf``, the quantized
    model's rows ``xq`` (same rows) [rows, K]; weights [K, N] each."""
    scale, alpha, error_rtn = awq.search_scale(xf, weights, block)
    s = scale.astype(np.float64)
    xq64 = xq.astype(np.float64)
    hq = xq64.T @ xq64
    cross = xq64.T @ xf.astype(np.float64)
    damp = gptq.DAMP * float(np.mean(np.diag(hq))) * np.eye(len(hq))
    h_scaled = hq / np.outer(s, s)
    quants, error = [], 0.0
    for w in weights:
        w64 = w.astype(np.float64)
        target = np.linalg.solve(hq + damp, cross @ w64 + damp @ w64)
        quant = gptq.gptq_hessian(h_scaled, (target * s[:, None]).astype(np.float32), block)
        quants.append(quant)
        delta = xq64 @ (quant.dequantized() / s[:, None]) - xf.astype(np.float64) @ w64
        error += float(np.sum(delta * delta))
    return GroupResult(quants, scale, alpha, error_rtn, error)


def fake_quantized(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    quants: Mapping[str, BlockQuant],
    scales: Mapping[str, np.ndarray],
) -> onnx.ModelProto:
    """A float copy of ``model`` whose quantized layers hold Q(s W) / s: what the INT4 graph computes (the
    Mul by 1/s and the dequantization folded into the weight), for collecting the next group's inputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: t for t in copy.graph.initializer}
    for layer in layers:
        quant = quants.get(layer.node)
        if quant is None:
            continue
        scale = scales.get(layer.activation)
        w = quant.dequantized() / (scale[:, None] if scale is not None else 1.0)
        w = w.T if layer.transposed else w
        tensor = numpy_helper.from_array(np.ascontiguousarray(w, np.float32), layer.weight)
        inits[layer.weight].CopyFrom(tensor)
    return copy


def quantize_sequential(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    fp32_rows: Mapping[str, np.ndarray],
    rows_in: RowSource,
    block: int,
) -> tuple[dict[str, BlockQuant], dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """(quantized weights per node, AWQ scale per activation, per-node details), groups in graph order."""
    groups: dict[str, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.activation, []).append(layer)
    quants: dict[str, BlockQuant] = {}
    scales: dict[str, np.ndarray] = {}
    details: dict[str, dict[str, float]] = {}
    for activation, group in groups.items():
        xf = fp32_rows[activation]
        xq = rows_in(fake_quantized(model, layers, quants, scales), activation) if quants else xf
        result = fit_group(xf, xq, [weight_kn(model, layer) for layer in group], block)
        scales[activation] = result.scale
        for layer, quant in zip(group, result.quants, strict=True):
            quants[layer.node] = quant
            details[layer.node] = {
                "alpha": result.alpha,
                "error_rtn": result.error_rtn,
                "error": result.error,
            }
    return quants, scales, details
