"""Structural Q/DQ placement (no scales): which tensors get Q/DQ, shared-scale groups, which nodes stay float.

The rules and where each comes from: docs/qdq-placement.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from calibrators import qdq_residual
from calibrators import qdq_rules as rules
from calibrators import qdq_select_ort as ort_placement
from calibrators.graph_index import GraphIndex, ensure_node_names
from calibrators.qdq_types import QDQ_TYPES, Exclusion, QdqOptions
from calibrators.ranges import TensorRange
from calibrators.weights import FP8


def _mask_path(g: GraphIndex, magnitude: float) -> set[str]:
    """Tensors on attention-mask paths: from a constant of huge magnitude (-10000, -1e9, float32 min) forward
    through mask arithmetic, up to and including the Add that joins the scores and the Softmax input."""
    seeds = []
    for node in g.nodes:
        if node.op_type not in rules.MASK_PATH_OPS:
            continue
        for name in node.input:
            if name and g.is_constant(name):
                value = g.constant(name)
                if (
                    value.size
                    and np.issubdtype(value.dtype, np.floating)
                    and (not np.all(np.isfinite(value)) or float(np.abs(value).max()) >= magnitude)
                ):
                    seeds.append(node)
                    break
    tensors: set[str] = set()
    frontier = list(seeds)
    visited: set[str] = set()
    while frontier:
        node = frontier.pop()
        if node.name in visited:
            continue
        visited.add(node.name)
        tensors.update(node.output)
        if node.op_type in ("Softmax", "LogSoftmax"):
            continue
        for out in node.output:
            for consumer, _ in g.consumers.get(out, []):
                if consumer.op_type in rules.MASK_PATH_OPS or consumer.op_type in ("Softmax", "LogSoftmax"):
                    frontier.append(consumer)
    return tensors


def _is_score_branch(g: GraphIndex, name: str) -> bool:
    node = g.origin(name)
    return node is not None and node.op_type in rules.SCORE_OPS


def _box_score_heads(g: GraphIndex, ranges: Mapping[str, TensorRange] | None) -> dict[str, str]:
    """Concats feeding a graph output that join boxes with class scores: name -> reason."""
    heads: dict[str, str] = {}
    for node in g.nodes:
        if node.op_type != "Concat" or not g.reaches_output(node.output[0]):
            continue
        inputs = [t for t in node.input if g.is_float_activation(t)]
        if len(inputs) < 2:
            continue
        scores = [_is_score_branch(g, t) for t in inputs]
        if any(scores) and not all(scores):
            heads[node.name] = (
                "detection head: Concat joins box coordinates with class scores "
                "(one scale would zero the scores)"
            )
            continue
        if ranges is not None and all(t in ranges for t in inputs):
            amaxes = [max(ranges[t].amax, 1e-12) for t in inputs]
            ratio = max(amaxes) / min(amaxes)
            if ratio > rules.BOX_SCORE_RANGE_RATIO:
                heads[node.name] = (
                    f"detection head: Concat inputs' ranges differ {ratio:.0f}x (boxes with scores)"
                )
    return heads


def _user_exclusion(node: onnx.NodeProto, options: QdqOptions) -> str | None:
    for name, reason in options.keep_float:
        if name == node.name:
            return reason
    if node.op_type in options.exclude_op_types:
        return f"excluded by user (op type {node.op_type})"
    for pattern in options.exclude_nodes:
        if re.fullmatch(pattern, node.name):
            return f"excluded by user (--exclude {pattern})"
    return None


def _fp8_exclusion(g: GraphIndex, node: onnx.NodeProto) -> str | None:
    """Why a weighted node TensorRT would not run in FP8 stays FP16 (rules.FP8_*; docs/fp8.md), or None."""
    if node.op_type not in rules.FP8_OPS:
        return f"{node.op_type} has no FP8 kernel in TensorRT (FP8 runs Conv/Gemm/MatMul only)"
    if node.op_type != "Conv" or not g.is_constant(node.input[1]):
        return None
    w_shape = list(g.constant(node.input[1]).shape)
    taps = int(np.prod(w_shape[2:])) if len(w_shape) > 2 else 1
    if taps > rules.FP8_MAX_KERNEL_AREA:
        return f"FP8 conv kernels take up to {rules.FP8_MAX_KERNEL_AREA} taps, this one has {taps}"
    if min(w_shape[0], w_shape[1]) <= rules.FP8_MIN_CHANNELS:
        return (
            f"small-channel conv for FP8 ({w_shape[1]} in per group / {w_shape[0]} out <= "
            f"{rules.FP8_MIN_CHANNELS}: depthwise or narrow, faster in FP16)"
        )
    return None


def _weighted_exclusion(g: GraphIndex, node: onnx.NodeProto, options: QdqOptions) -> str | None:
    """Why a Conv/Gemm/MatMul stays float (tiny conv, GEMV, attention score MatMul), or None."""
    if options.activation_type == FP8:
        why = _fp8_exclusion(g, node)
        if why is not None:
            return why
    rule = rules.WEIGHTED_OPS[node.op_type]
    weight_name = node.input[rule.weight_input] if rule.weight_input is not None else ""
    if node.op_type == "MatMul" and not g.is_constant(weight_name):
        if g.is_constant(node.input[0]):  # third-party x^T-style W @ x: not an activation pair
            return "the weight is the first input (W @ x): no per-channel weight Q/DQ for it"
        seq = [d for t in node.input for d in (g.shape.get(t) or [None, None])[-2:]]
        if any(d is None for d in seq) or max(d for d in seq if d is not None) > options.attention_max_seq:
            limit = options.attention_max_seq
            return f"attention score MatMul (both inputs activations, sequence unknown or > {limit})"
        return None
    if not g.is_constant(weight_name):
        return f"weight '{weight_name}' is computed at run time, not an initializer"
    w_shape = list(g.constant(weight_name).shape)
    if node.op_type in ("Conv", "ConvTranspose"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group = int(attrs.get("group", 1))
        kernel_area = int(np.prod(w_shape[2:])) if len(w_shape) > 2 else 1
        out_ch = w_shape[0] if node.op_type == "Conv" else w_shape[1] * group
        in_ch = w_shape[1] * group if node.op_type == "Conv" else w_shape[0]
        fan_in = (in_ch // group) * kernel_area
        # TensorRT pads INT8 channels to multiples of 4/32: a 3-channel stem or a 1-channel head gains
        # nothing from INT8, and quantizing the raw image is the costliest error in a CNN.
        if min(in_ch, out_ch) < options.tiny_conv_min_channels or fan_in < options.tiny_conv_min_fan_in:
            return f"tiny conv ({in_ch} in / {out_ch} out channels, {fan_in} MACs per output)"
        return None
    if len(w_shape) >= 2:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = rule.weight_axis(attrs, len(w_shape), node.op_type)
        k_axis = (len(w_shape) - 2) if axis == len(w_shape) - 1 else len(w_shape) - 1
        if w_shape[axis] == 1 or w_shape[k_axis] == 1:
            return f"GEMV-shaped {node.op_type} (weight {w_shape})"
    in_shape = g.shape.get(node.input[0])
    rows = in_shape[:-1] if in_shape and len(in_shape) >= 2 else [None]
    if all(d is not None for d in rows) and int(np.prod([d or 1 for d in rows])) == 1:
        return f"GEMV-shaped {node.op_type} (one row: input {in_shape})"
    return None


def _branch_is_weighted(g: GraphIndex, name: str, quantized_nodes: set[str]) -> bool:
    """True when ``name`` comes from a quantized Conv/Gemm/MatMul, possibly through a bias Add or BN."""
    node = g.producer.get(name)
    for _ in range(3):
        if node is None:
            return False
        if node.name in quantized_nodes:
            return True
        if node.op_type not in rules.EPILOGUE_OPS:
            return False
        nxt = [t for t in node.input if g.is_float_activation(t)]
        if len(nxt) != 1:
            return False
        node = g.producer.get(nxt[0])
    return False


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class QdqSelection:
    """Placement without scales: which tensors get Q/DQ shared-scale groups, weights, exclusions."""

    activations: dict[str, list[tuple[str, int]]]
    groups: dict[str, str]
    weights: dict[str, tuple[list[tuple[str, int]], int, str | None]]  # name -> (consumers, axis, bias)
    excluded: list[Exclusion]
    quantized_nodes: list[str]


def select_qdq(
    model: onnx.ModelProto,
    options: QdqOptions | None = None,
    ranges: Mapping[str, TensorRange] | None = None,
    graph: GraphIndex | None = None,
) -> QdqSelection:
    """Structural placement (no scales). ``model`` must have node names (see :func:`ensure_node_names`)."""
    options = options or QdqOptions()
    g = graph if graph is not None else GraphIndex(model)
    mask = _mask_path(g, rules.MASK_CONSTANT_MAGNITUDE)
    heads = _box_score_heads(g, ranges)
    head_tensors = {t for name in heads for t in (*g.by_name[name].input, *g.by_name[name].output)}
    excluded: dict[str, Exclusion] = {}
    acts: dict[str, list[tuple[str, int]]] = {}
    weights: dict[str, tuple[list[tuple[str, int]], int, str | None]] = {}
    quantized: list[str] = []
    uf = _UnionFind()

    def exclude(node: onnx.NodeProto, reason: str) -> None:
        excluded.setdefault(node.name, Exclusion(node.name, node.op_type, reason))

    for name, head_reason in heads.items():
        exclude(g.by_name[name], head_reason)

    # 1. Conv/ConvTranspose/Gemm/MatMul: their activation inputs and per-channel weights.
    for node in g.nodes:
        role = rules.ROLES.get(node.op_type)
        user = _user_exclusion(node, options)
        if user and role is not None:
            exclude(node, user)
            continue
        if role is rules.Role.KEEP_FLOAT:
            exclude(node, f"{node.op_type} chain kept in float (Softmax/LayerNorm/GELU)")
            continue
        if role is not rules.Role.WEIGHTED:
            continue
        reason = _weighted_exclusion(g, node, options)
        rule = rules.WEIGHTED_OPS[node.op_type]
        act_inputs = [
            i for i in range(len(node.input)) if i in rule.activation_inputs or i == rule.weight_input
        ]
        act_inputs = [i for i in act_inputs if g.is_float_activation(node.input[i])]
        if reason is None and not act_inputs:
            reason = "no float activation input"
        touched = [node.input[i] for i in act_inputs]
        if reason is None and any(t in mask for t in touched):
            reason = "reads an attention-mask path (huge negative constants)"
        if reason is None and any(t in head_tensors for t in touched):
            reason = "reads a box/score detection head"
        if reason is not None:
            exclude(node, reason)
            continue
        for i in act_inputs:
            acts.setdefault(node.input[i], []).append((node.name, i))
        w_index = rule.weight_input
        if w_index is not None and g.is_constant(node.input[w_index]):
            w_name = node.input[w_index]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            axis = rule.weight_axis(attrs, len(g.constant(w_name).shape), node.op_type)
            bias = (
                node.input[2]
                if len(node.input) > 2 and node.input[2] and g.is_constant(node.input[2])
                else None
            )
            if node.op_type == "Gemm" and bias is not None and g.constant(bias).ndim > 1:
                bias = None  # a 2-D Gemm C is not a per-channel bias
            consumers, _, _ = weights.setdefault(w_name, ([], axis, bias))
            consumers.append((node.name, w_index))
        quantized.append(node.name)

    # 2. Residual Add: quantize the skip input; the conv branch fuses as the conv's epilogue (INT8 and FP8:
    # not where the Add's output only feeds a LayerNorm, calibrators/qdq_residual.py).
    quantized_set = set(quantized)
    for node in g.nodes:
        if rules.ROLES.get(node.op_type) is not rules.Role.RESIDUAL_ADD or node.name in excluded:
            continue
        if _user_exclusion(node, options) or any(t in mask for t in node.output):
            continue
        if len(node.input) != 2 or not all(g.is_float_activation(t) for t in node.input):
            continue
        branch = [_branch_is_weighted(g, t, quantized_set) for t in node.input]
        if not any(branch):
            continue
        skip = 1 if all(branch) else branch.index(False)
        # ORT CPU (uint8) fuses only a fully quantized Add (QLinearAdd: both inputs and the output); an Add
        # whose output stays float (e.g. into a LayerNorm) would only get Q -> DQ overhead there.
        sides: tuple[int, ...] = (skip,)
        if options.activation_type == "uint8":
            sides = (0, 1) if ort_placement.will_be_quantized(g, node.output[0], acts) else ()
        elif options.activation_type in ("int8", FP8) and qdq_residual.output_stays_float(g, node.output[0]):
            sides = ()  # Add -> LayerNorm: the fused output stays float, an INT8/FP8 skip only adds error
        for i in sides:
            acts.setdefault(node.input[i], []).append((node.name, i))

    # ORT CPU (uint8): Q/DQ on conv and pool outputs too, so ORT forms QLinearConv/QLinearAveragePool.
    if options.activation_type == "uint8":
        for name, why in ort_placement.add_output_qdq(g, acts, weights, quantized, excluded, mask).items():
            exclude(g.by_name[name], why)

    # 3. Concat/pooling (reverse order, so chains cascade): inputs share the quantized output's scale.
    # Not for FP8: TensorRT has no FP8 pooling/concat, so there they stay FP16 (ModelOpt does the same).
    for node in reversed(g.nodes if options.activation_type != FP8 else []):
        if rules.ROLES.get(node.op_type) is not rules.Role.SHARED_SCALE or not node.output:
            continue
        out = node.output[0]
        if out not in acts or node.name in excluded or out in mask:
            continue
        inputs = [(i, t) for i, t in enumerate(node.input) if g.is_float_activation(t) and t not in mask]
        if node.op_type != "Concat":
            inputs = inputs[:1]
        own_scale = options.activation_type == "uint8" and node.op_type in ort_placement.OWN_SCALE_POOLS
        for i, t in inputs:
            readers = acts.setdefault(t, [])
            if (node.name, i) not in readers:
                readers.append((node.name, i))
            if not own_scale:  # ORT's QLinear average pools requantize; TensorRT's share one scale
                uf.union(t, out)

    groups = {t: uf.find(t) for t in acts}
    ordered = _graph_order(g, acts)
    return QdqSelection(
        activations={t: acts[t] for t in ordered},
        groups=groups,
        weights=weights,
        excluded=list(excluded.values()),
        quantized_nodes=quantized,
    )


def _graph_order(g: GraphIndex, tensors: Iterable[str]) -> list[str]:
    """Tensors in the order they are produced (graph inputs first)."""
    wanted = set(tensors)
    order = [i.name for i in g.model.graph.input if i.name in wanted]
    for node in g.nodes:
        order.extend(t for t in node.output if t in wanted)
    return order + sorted(wanted - set(order))


def quantizable_activations(
    model: onnx.ModelProto, exclude_nodes: Sequence[str] = (), exclude_op_types: Sequence[str] = ()
) -> list[str]:
    """The activation tensors that will get Q/DQ, in graph order: what calibration must measure.

    The union over the Q/DQ types (uint8 also quantizes residual branches; FP8 keeps other convs float, so
    a residual's skip side can differ), so one set of ranges serves the TensorRT (int8, fp8) and the ORT
    CPU (uint8) graph.
    """
    named = ensure_node_names(model)
    wanted: set[str] = set()
    for activation_type in QDQ_TYPES:
        options = QdqOptions(
            activation_type=activation_type,
            exclude_nodes=tuple(exclude_nodes),
            exclude_op_types=tuple(exclude_op_types),
        )
        wanted.update(select_qdq(named, options).activations)
    return _graph_order(GraphIndex(named), wanted)
