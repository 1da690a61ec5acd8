"""Scales for a placement: per-tensor activation scales, per-channel weight scales, bias correction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from calibrators import bias_correction as bc
from calibrators import qdq_rules as rules
from calibrators import rounding_grid
from calibrators import weights as wq
from calibrators.graph_index import GraphIndex, check_qdq_opset, ensure_node_names
from calibrators.ort_depthwise import is_depthwise
from calibrators.qdq_select import select_qdq
from calibrators.qdq_types import ActivationQdq, Exclusion, QdqOptions, QdqPlan, WeightQdq
from calibrators.ranges import TensorRange
from trtbuild.core.errors import TrtbuildError


def _activation_scale(members: Sequence[TensorRange], activation_type: str) -> tuple[float, int]:
    if activation_type in ("int8", wq.FP8):  # symmetric: amax / 127, or amax / 448 on the E4M3 grid
        amax = max(r.amax for r in members)
        return amax / wq.weight_qmax(activation_type), 0
    lo = min(r.clipped()[0] for r in members)
    hi = max(r.clipped()[1] for r in members)
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(round(-lo / scale), 0, 255)) if scale > 0 else 0
    return scale, zero_point


class GraphCache:
    """A named copy of a model and its lookup tables, reused when planning many variants (auto-fallback)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = ensure_node_names(model)
        check_qdq_opset(self.model)
        self.graph = GraphIndex(self.model)


def plan_qdq(
    model: onnx.ModelProto | GraphCache, ranges: Mapping[str, TensorRange], options: QdqOptions | None = None
) -> QdqPlan:
    """Decide every Q/DQ (tensors, consumers, scales, groups, weights) and every exclusion with its reason."""
    options = options or QdqOptions()
    cache = model if isinstance(model, GraphCache) else GraphCache(model)
    model, g = cache.model, cache.graph
    sel = select_qdq(model, options, ranges, g)
    missing = [t for t in sel.activations if t not in ranges]
    if missing:
        raise TrtbuildError(
            f"no calibrated range for {len(missing)} tensor(s) that get Q/DQ (e.g. '{missing[0]}')",
            "calibrate with the same model and exclusions (ranges come from quantizable_activations)",
        )
    excluded = list(sel.excluded)
    dropped: set[str] = set()
    for t in sel.activations:
        r = ranges[t]
        reason = None
        if r.amax > options.huge_range and not _conv_output_for_ort(g, t, options):
            reason = f"input '{t}' has range ±{r.amax:.3g} (a mask or overflow, not an INT8 range)"
        elif r.amax == 0.0 or (options.activation_type == "uint8" and r.clipped()[0] == r.clipped()[1]):
            reason = f"input '{t}' is constant zero on the calibration data"
        if reason:
            dropped.add(t)
            for node_name, _ in sel.activations[t]:
                node = g.by_name[node_name]
                excluded.append(Exclusion(node_name, node.op_type, reason))
    dropped_nodes = {e.node for e in excluded}
    activations = {t: c for t, c in sel.activations.items() if t not in dropped}
    # A weighted node that lost an activation input to a range exclusion stays float entirely.
    activations = {
        t: [
            (n, i)
            for n, i in c
            if not (n in dropped_nodes and rules.ROLES.get(g.by_name[n].op_type) is rules.Role.WEIGHTED)
        ]
        for t, c in activations.items()
    }
    activations = {t: c for t, c in activations.items() if c}
    members: dict[str, list[TensorRange]] = {}
    for t in activations:
        members.setdefault(sel.groups[t], []).append(ranges[t])
    plan = QdqPlan(activation_type=options.activation_type, excluded=excluded)
    for t, consumers in activations.items():
        group = sel.groups[t]
        scale, zp = _activation_scale(members[group], options.activation_type)
        plan.activations[t] = ActivationQdq(
            t, tuple(consumers), group, float(scale), zp, options.activation_type
        )
    quantized_nodes = [n for n in sel.quantized_nodes if n not in dropped_nodes]
    keep = set(quantized_nodes)
    means = bc.means_from(ranges)
    for w_name, (consumers, axis, bias) in sel.weights.items():
        live = tuple(c for c in consumers if c[0] in keep)
        if not live:
            continue
        fmt = _weight_format(g, w_name, live, options)
        scales = wq.per_channel_scales(g.constant(w_name), axis, wq.weight_qmax(fmt))
        learned = options.learned_rounding if fmt in rounding_grid.GRIDS else None
        rounded = learned.get(w_name) if learned else None
        if rounded is not None:
            plan.rounded_weights[w_name] = rounded
        use_bias = bias if options.activation_type == "uint8" and len(live) == 1 else None
        correction = None
        if options.bias_correction and rounded is None:  # learned rounding already targets W x_fp
            correction = _bias_correction(g, w_name, live, axis, scales, means, fmt, rounded)
            correction = _with_input_shift(g, correction, live, axis, scales, fmt, plan, ranges)
        plan.weights[w_name] = WeightQdq(
            w_name,
            live,
            axis,
            tuple(float(s) for s in scales),
            use_bias,
            correction[0] if correction else None,
            correction[1] if correction else None,
            fmt,
        )
    plan.quantized_nodes = quantized_nodes
    plan.node_types = {n: g.by_name[n].op_type for n in quantized_nodes}
    return plan


def _weight_format(
    g: GraphIndex, w_name: str, consumers: Sequence[tuple[str, int]], options: QdqOptions
) -> str:
    """The graph's weight format, or the depthwise one for a weight only depthwise convs read."""
    if options.depthwise_weight_format is None:
        return options.weight_format
    shape = g.constant(w_name).shape
    if all(is_depthwise(g.by_name[n], shape) for n, _ in consumers):
        return options.depthwise_weight_format
    return options.weight_format


def _conv_output_for_ort(g: GraphIndex, tensor: str, options: QdqOptions) -> bool:
    """A conv's raw output (e.g. before a BatchNormalization, ±1e4 in Paddle exports) is never a mask: the
    ORT-CPU graph quantizes it anyway, since without that Q ORT runs the conv in float."""
    node = g.producer.get(tensor)
    return options.activation_type == "uint8" and node is not None and node.op_type == "Conv"


def _with_input_shift(
    g: GraphIndex,
    correction: tuple[str, tuple[float, ...]] | None,
    consumers: Sequence[tuple[str, int]],
    axis: int,
    scales: np.ndarray,
    weight_format: str,
    plan: QdqPlan,
    ranges: Mapping[str, TensorRange],
) -> tuple[str, tuple[float, ...]] | None:
    """``correction`` plus W_q (E[Q(x)] - E[x]): the mean shift rounding the layer's input causes, where
    it was measured at the plan's scale (calibrators/bias_correction.py ``activation_shifts``)."""
    if correction is None:
        return None
    node = g.by_name[consumers[0][0]]
    act = plan.activations.get(node.input[0])
    if act is None or (node.name, 0) not in act.consumers:
        return correction
    d = bc.input_shift_for(ranges, act.tensor, act.scale, act.zero_point)
    if d is None:
        return correction
    w = g.constant(node.input[1]).astype(np.float32)
    w_q = wq.dequantize_weight(wq.quantize_weight(w, scales, axis, weight_format), scales, axis)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    extra = bc.output_shift(w_q, d, node.op_type, attrs)
    if extra is None or extra.size != len(correction[1]) or not np.all(np.isfinite(extra)):
        return correction
    return correction[0], tuple(float(v) for v in np.asarray(correction[1]) + extra)


def _bias_correction(
    g: GraphIndex,
    w_name: str,
    consumers: Sequence[tuple[str, int]],
    axis: int,
    scales: np.ndarray,
    means: Mapping[str, Any],
    weight_format: str = "int8",
    rounded: np.ndarray | None = None,
) -> tuple[str, tuple[float, ...]] | None:
    """(bias name, shift) for a weight read by one node whose own constant bias can absorb the shift."""
    if len(consumers) != 1 or not means:
        return None
    node = g.by_name[consumers[0][0]]
    mean = means.get(node.input[0])
    if mean is None or len(node.input) < 3 or not node.input[2] or not g.is_constant(node.input[2]):
        return None
    bias = node.input[2]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(g.consumers.get(bias, [])) != 1 or float(attrs.get("beta", 1.0)) == 0.0:
        return None  # a shared bias (or one Gemm ignores) cannot take one layer's correction
    w = g.constant(w_name).astype(np.float32)
    q = rounded if rounded is not None else wq.quantize_weight(w, scales, axis, weight_format)
    error = wq.dequantize_weight(q, scales, axis) - w
    shift = bc.output_shift(error, np.asarray(mean, np.float64), node.op_type, attrs)
    b = g.constant(bias)
    if shift is None or b.ndim != 1 or b.size != shift.size or not np.all(np.isfinite(shift)):
        return None
    return bias, tuple(float(v) for v in shift)
