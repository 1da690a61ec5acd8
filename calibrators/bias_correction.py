"""Bias correction: cancel the mean output shift that rounding a layer's weights to INT8 causes.

Rounding W to W_q changes a layer's output by (W_q - W) x. Its mean over the data, (W_q - W) E[x] per output
channel, is not noise that averages away: in depthwise and linear-bottleneck convs of mobile CNNs (weights
scaled up by folded BatchNorm, summing to almost zero over the kernel, fed by saturated ReLU6 outputs) it
is a systematic offset of the same size as the signal, and it compounds through the network. Subtracting
it from the (float) bias costs nothing at run time: TensorRT keeps a Q/DQ conv's bias in float and fuses
it, so the corrected graph is as fast as the uncorrected one. (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", 2019: the empirical variant, with E[x] per input
channel measured on the calibration data.)

Rounding the layer's *input* to its INT8 grid shifts the mean too: E[Q(x)] - E[x] per input channel is
not zero where most of a channel's values sit in one rounding cell (a SiLU output's negative part,
-0.28..0, is all 0 on a grid of step 0.78) or where clipping cuts one tail. The full expected output error
is E[W_q Q(x) - W x] = (W_q - W) E[x] + W_q (E[Q(x)] - E[x]); ``activation_shifts`` measures the second
mean on calibration data at the plan's scales (one float pass) and the plan subtracts both. On NudeNet's
YOLOv8n (docs/int8-accuracy.md) the stem's SiLU output (±146, step 0.78) alone took the score cosine from
1 to 0.968; the input term lifts the whole graph's from 0.950 to 0.98. It rests on float means, so
``quantize`` keeps it only where the held-out gate measures it better.

Known limit: E[x] is the float model's, so upstream corrections are not seen downstream. Implicit conv
padding (``pads``) is treated as if the border saw the channel mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from calibrators.collect import instrument
from calibrators.data import first_samples
from calibrators.histogram import TensorStats
from calibrators.qdq_types import QdqPlan
from trtbuild.core import ort as ort_core

CHANNEL_MEANS_KEY = "channel_means"  # RangeSet.meta key: activation name -> mean per channel (axis 1)
# RangeSet.meta key: activation name -> {"scale", "zero_point", "shift": E[Q(x)] - E[x] per channel}
INPUT_SHIFTS_KEY = "input_rounding_shifts"
SHIFT_SAMPLES = 16  # calibration samples E[Q(x)] - E[x] is measured on
# Symmetric int8 (TensorRT) only: on the asymmetric uint8 ORT-CPU graph the zero point already covers a
# SiLU's negative part, and the correction measured worse there (YOLOv8n scores 0.956 -> 0.946).
_GRIDS = {"int8": (-128, 127)}


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


def activation_shifts(
    model: onnx.ModelProto,
    plan: QdqPlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    threads: int | None = None,
    samples: int = SHIFT_SAMPLES,
) -> dict[str, dict[str, Any]]:
    """E[Q(x)] - E[x] per channel (axis 1) of each int8 activation of ``plan`` read by a weighted layer,
    at the plan's scale and zero point, over the first ``samples`` samples of ``batches`` (float pass)."""
    weighted = set(plan.node_types)
    tensors = {
        t: a
        for t, a in plan.activations.items()
        if a.dtype in _GRIDS and any(node in weighted for node, _ in a.consumers)
    }
    if not tensors:
        return {}
    inputs = {i.name for i in model.graph.input}
    wanted = [t for t in tensors if t not in inputs]
    sess = ort_core.cpu_session(instrument(model, wanted), ort_core.REFERENCE, threads) if wanted else None
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(tensors, 0)
    for batch in first_samples(batches, samples):
        values = dict(zip(wanted, sess.run(wanted, batch), strict=True)) if sess else {}
        values.update({k: np.asarray(v) for k, v in batch.items()})
        for t, a in tensors.items():
            x = np.asarray(values[t], np.float32)
            if x.ndim < 2:
                continue
            lo, hi = _GRIDS[a.dtype]
            q = (np.clip(np.rint(x / a.scale) + a.zero_point, lo, hi) - a.zero_point) * np.float32(a.scale)
            axes = tuple(i for i in range(x.ndim) if i != 1)
            d = (q - x).astype(np.float64).sum(axis=axes)
            sums[t] = d if t not in sums else sums[t] + d
            counts[t] += x.size // x.shape[1]
    return {
        t: {"scale": tensors[t].scale, "zero_point": tensors[t].zero_point, "shift": (d / counts[t]).tolist()}
        for t, d in sums.items()
        if counts[t]
    }


def input_shift_for(ranges: Any, tensor: str, scale: float, zero_point: int) -> np.ndarray | None:
    """The measured E[Q(x)] - E[x] of ``tensor`` if it was measured at this scale and zero point."""
    meta = getattr(ranges, "meta", None)
    shifts = meta.get(INPUT_SHIFTS_KEY) if isinstance(meta, Mapping) else None
    entry = shifts.get(tensor) if isinstance(shifts, Mapping) else None
    if not isinstance(entry, Mapping) or int(entry.get("zero_point", 0)) != zero_point:
        return None
    if not np.isclose(float(entry.get("scale", 0.0)), scale, rtol=1e-9, atol=0.0):
        return None  # another grid (a group that lost a member, other ranges): the mean no longer holds
    return np.asarray(entry["shift"], np.float64)
