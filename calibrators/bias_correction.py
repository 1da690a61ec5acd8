"""Bias correction: cancel the mean output shift that rounding a layer's weights to INT8 causes.

Rounding W to W_q changes a layer's output by (W_q - W) x. Its mean over the data, (W_q - W) E[x] per output
channel, is not noise that averages away: in depthwise and linear-bottleneck convs of mobile CNNs (weights
scaled up by folded BatchNorm, summing to almost zero over the kernel, fed by saturated ReLU6 outputs) it
is a systematic offset of the same size as the signal, and it compounds through the network. Subtracting
it from the (float) bias costs nothing at run time: TensorRT keeps a Q/DQ conv's bias in float and fuses
it, so the corrected graph is as fast as the uncorrected one. (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", 2019: the empirical variant, with E[x] per input
channel measured on the calibration data.)

Known limit: E[x] is the float model's. Where activation quantization dominates the error (a graph whose
INT8 output SQNR is under ~10 dB, e.g. the PP-OCR detector before fallback), the quantized inputs' means
drift and correcting only the weight term measured ~1 dB worse there; QdqOptions(bias_correction=False)
turns it off. Implicit conv padding (``pads``) is treated as if the border saw the channel mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from calibrators.histogram import TensorStats

CHANNEL_MEANS_KEY = "channel_means"  # RangeSet.meta key: activation name -> mean per channel (axis 1)


def channel_means(stats: Mapping[str, TensorStats]) -> dict[str, list[float]]:
    """Per-channel means of the collected tensors that have them, as JSON-ready lists (7 digits)."""
    out: dict[str, list[float]] = {}
    for name, s in stats.items():
        mean = s.channel_mean
        if mean is not None:
            out[name] = [float(f"{v:.7g}") for v in mean]
    return out


def means_from(ranges: Any) -> Mapping[str, Any]:
    """The channel means stored with a RangeSet (empty for plain mappings or ranges saved without them)."""
    meta = getattr(ranges, "meta", None)
    means = meta.get(CHANNEL_MEANS_KEY) if isinstance(meta, Mapping) else None
    return means if isinstance(means, Mapping) else {}


def output_shift(
    weight_error: np.ndarray,
    input_mean: np.ndarray,
    op_type: str,
    attrs: Mapping[str, Any],
) -> np.ndarray | None:
    """E[(W_q - W) x] per output channel, or None when this layer's layout is not handled.

    Conv: weight [O, I/group, k...], input channels I. Gemm: alpha * x @ op(W) with op = transpose when
    transB; a transposed A (transA) has no per-feature channel axis 1 and is skipped.
    """
    d = np.asarray(weight_error, dtype=np.float64)
    mu = np.asarray(input_mean, dtype=np.float64)
    if op_type == "Conv":
        group = int(attrs.get("group", 1))
        out_ch, in_per_group = d.shape[0], d.shape[1]
        if mu.size != in_per_group * group or out_ch % group:
            return None
        per_input = d.reshape(out_ch, in_per_group, -1).sum(axis=2)  # kernel taps see the same mean
        grouped = per_input.reshape(group, out_ch // group, in_per_group)
        return np.einsum("goi,gi->go", grouped, mu.reshape(group, in_per_group)).reshape(out_ch)
    if op_type == "Gemm" and d.ndim == 2 and not int(attrs.get("transA", 0)):
        weight = d.T if int(attrs.get("transB", 0)) else d  # [K, N]
        if mu.size != weight.shape[0]:
            return None
        return float(attrs.get("alpha", 1.0)) * (mu @ weight)
    return None


def corrected_bias(bias: np.ndarray, shift: np.ndarray, op_type: str, attrs: Mapping[str, Any]) -> np.ndarray:
    """The bias that cancels ``shift`` (Gemm scales its C by beta)."""
    b = np.asarray(bias, dtype=np.float64)
    beta = float(attrs.get("beta", 1.0)) if op_type == "Gemm" else 1.0
    return (b - np.broadcast_to(shift, b.shape) / beta).astype(np.float32)
