"""Learned activation step sizes (LSQ: Esser et al., "Learned Step Size Quantization", ICLR 2020) for the
symmetric int8 activation Q/DQ, and how a learned step gets into every artifact.

The fake quantizer is the reference Q/DQ (round half to even, saturate to [-128, 127], zero point 0) with a
straight-through round, so d out / d scale is round(x/s) - x/s inside the grid and -128 / 127 outside it:
LSQ's gradient. A learned step is written back as a *range* (amax = 127 * scale): plan_qdq then computes
the same scale TensorRT's rule gives (amax / 127), and the Q/DQ graph, ranges.json and the calibration
cache all come from that one RangeSet, as for calibrated ranges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from calibrators.ranges import RangeSet

QMIN, QMAX = -128, 127  # int8 activations (TensorRT: symmetric, zero point 0)


def fake_quant(x: Any, scale: Any) -> Any:
    """x through QuantizeLinear/DequantizeLinear at ``scale`` (torch), differentiable in x and scale."""
    import torch

    q = torch.clamp(x / scale, QMIN, QMAX)
    return (q + (torch.round(q) - q).detach()) * scale


def with_scales(ranges: RangeSet, scales: Mapping[str, float]) -> RangeSet:
    """A copy of ``ranges`` whose tensors in ``scales`` get amax = 127 * scale (float32 scale, as the graph
    stores it); min/max (the observed extremes) and the meta (channel means for bias correction) stay."""
    out = RangeSet(method=ranges.method, ranges=dict(ranges.ranges), meta=dict(ranges.meta))
    for name, scale in scales.items():
        amax = float(np.float32(scale)) * float(QMAX)
        out.ranges[name] = replace(out.ranges[name], amax=amax)
    if scales:
        out.meta["learned_steps"] = sorted(scales)  # said in ranges.json: these amax were learned
    return out
