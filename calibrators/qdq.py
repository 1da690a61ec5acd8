"""Q/DQ placement for TensorRT explicit INT8: pure data first (:func:`plan_qdq`), then :func:`apply_qdq`.

The rules (docs/qdq-placement.md): Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul, none on
outputs; residual Add quantizes the skip input only; Concat/pooling share one scale across inputs and output;
attention-mask paths, Softmax/LayerNorm/GELU chains, attention score MatMuls on long sequences, tiny convs,
GEMV-shaped MatMuls and box/score detection heads stay float; users exclude nodes or op types by name/regex.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators import bias_correction as bc
from calibrators import qdq_rules as rules
from calibrators import weights as wq
from calibrators.ranges import RangeSet, TensorRange
from trtbuild.errors import TrtbuildError

ACTIVATION_TYPES = ("int8", "uint8")
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13


@dataclass(frozen=True)
class QdqOptions:
    """What to quantize and how. Patterns are regexes matched in full against node names."""

    activation_type: str = "int8"  # int8: symmetric, zero point 0 (TensorRT); uint8: asymmetric (ORT CPU)
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    attention_max_seq: int = rules.ATTENTION_MAX_SEQ
    tiny_conv_min_channels: int = rules.TINY_CONV_MIN_CHANNELS
    tiny_conv_min_fan_in: int = rules.TINY_CONV_MIN_FAN_IN
    huge_range: float = rules.HUGE_RANGE
    # Subtract E[(W_q - W) x] from each quantized layer's float bias (needs the channel means that
    # compute_ranges stores with the ranges; a no-op without them). See calibrators/bias_correction.py.
    bias_correction: bool = True
    # How weights are stored: int8 (TensorRT, VNNI CPUs), or int7/uint8 for ORT's x86 kernels on CPUs
    # whose u8 x s8 multiply-add saturates (calibrators/weights.py, trtbuild/core/cpu.py).
    weight_format: str = "int8"

    def __post_init__(self) -> None:
        if self.activation_type not in ACTIVATION_TYPES:
            raise TrtbuildError(
                f"unknown activation type '{self.activation_type}'",
                f"use one of {', '.join(ACTIVATION_TYPES)}",
            )
        if self.weight_format not in wq.WEIGHT_FORMATS:
            raise TrtbuildError(
                f"unknown weight format '{self.weight_format}'", f"use one of {', '.join(wq.WEIGHT_FORMATS)}"
            )
        if self.weight_format != "int8" and self.activation_type == "int8":
            raise TrtbuildError(
                f"weight format '{self.weight_format}' is for ONNX Runtime CPU graphs (uint8 activations); "
                "TensorRT takes symmetric int8 weights only",
                "use weight_format='int8' with int8 activations",
            )
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise TrtbuildError(
                    f"--exclude '{pattern}' is not a valid regex ({exc})", "fix the pattern"
                ) from exc


@dataclass(frozen=True)
class Exclusion:
    """A node kept in float, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class ActivationQdq:
    """One Q/DQ pair on an activation tensor, read by the listed (node, input index) consumers."""

    tensor: str
    consumers: tuple[tuple[str, int], ...]
    group: str  # tensors with the same group share one scale (Concat/pooling); else the tensor's own name
    scale: float
    zero_point: int
    dtype: str  # "int8" or "uint8"


@dataclass(frozen=True)
class WeightQdq:
    """A per-channel symmetric INT8 weight (DequantizeLinear only; the initializer is stored as int8)."""

    tensor: str
    consumers: tuple[tuple[str, int], ...]
    axis: int
    scales: tuple[float, ...]
    bias: str | None = None  # a bias quantized to int32 (uint8 activations only, for ORT's fused kernels)
    corrected_bias: str | None = None  # the consumer's bias that gets ``bias_shift`` subtracted
    bias_shift: tuple[float, ...] | None = None  # E[(W_q - W) x] per output channel on the calibration data
    weight_format: str = "int8"  # storage: int8 (±127), int7 (±63 in int8) or uint8 (zero point 128)


@dataclass
class QdqPlan:
    """Everything apply_qdq will do, as data: print it, save it, diff it before anything heavy runs."""

    activation_type: str
    activations: dict[str, ActivationQdq] = field(default_factory=dict)
    weights: dict[str, WeightQdq] = field(default_factory=dict)
    excluded: list[Exclusion] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    node_types: dict[str, str] = field(default_factory=dict)  # quantized node -> op type, for reports

    @property
    def groups(self) -> dict[str, list[str]]:
        """Shared-scale groups with more than one tensor: group id -> member tensors."""
        out: dict[str, list[str]] = {}
        for act in self.activations.values():
            out.setdefault(act.group, []).append(act.tensor)
        return {g: members for g, members in out.items() if len(members) > 1}

    def excluded_nodes(self) -> dict[str, str]:
        return {e.node: e.reason for e in self.excluded}

    def to_json(self) -> dict[str, Any]:
        return {
            "activation_type": self.activation_type,
            "activations": {k: asdict(v) for k, v in self.activations.items()},
            "weights": {k: {**asdict(v), "scales": list(v.scales)} for k, v in self.weights.items()},
            "groups": self.groups,
            "excluded": [asdict(e) for e in self.excluded],
            "quantized_nodes": list(self.quantized_nodes),
        }


# --------------------------------------------------------------------------------------------- graph views


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (plans refer to nodes by name); deterministic."""
    model = _copy(model)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


class _Graph:
    """Lookup tables over one (top-level) graph: producers, consumers, constants, element types, shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for idx, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, idx))
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input} - set(self.initializers)
        self.elem_type: dict[str, int] = {}
        self.shape: dict[str, list[int | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # shape inference is a hint only; rules fall back to "unknown"
            inferred = model
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            t = vi.type.tensor_type
            self.elem_type[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shape[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for name, init in self.initializers.items():
            self.elem_type[name] = init.data_type
            self.shape[name] = list(init.dims)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def constant(self, name: str) -> np.ndarray:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return self.constants[name]

    def is_float_activation(self, name: str) -> bool:
        if not name or self.is_constant(name):
            return False
        return self.elem_type.get(name, TensorProto.FLOAT) in _FLOAT_TYPES

    def origin(self, name: str) -> onnx.NodeProto | None:
        """The producer of ``name`` after skipping layout/movement ops."""
        node = self.producer.get(name)
        seen = 0
        while node is not None and rules.ROLES.get(node.op_type) is rules.Role.PASS_THROUGH and seen < 64:
            node = self.producer.get(node.input[0]) if node.input else None
            seen += 1
        return node

    def reaches_output(self, name: str) -> bool:
        """True when ``name`` flows to a graph output through movement ops only."""
        frontier, seen = [name], set()
        while frontier:
            t = frontier.pop()
            if t in self.graph_outputs:
                return True
            if t in seen:
                continue
            seen.add(t)
            for node, _ in self.consumers.get(t, []):
                if rules.ROLES.get(node.op_type) is rules.Role.PASS_THROUGH or node.op_type == "Concat":
                    frontier.extend(node.output)
        return False


# ------------------------------------------------------------------------------------ structural rules


def _mask_path(g: _Graph, magnitude: float) -> set[str]:
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


def _is_score_branch(g: _Graph, name: str) -> bool:
    node = g.origin(name)
    return node is not None and node.op_type in rules.SCORE_OPS


def _box_score_heads(g: _Graph, ranges: Mapping[str, TensorRange] | None) -> dict[str, str]:
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
    if node.op_type in options.exclude_op_types:
        return f"excluded by user (op type {node.op_type})"
    for pattern in options.exclude_nodes:
        if re.fullmatch(pattern, node.name):
            return f"excluded by user (--exclude {pattern})"
    return None


def _weighted_exclusion(g: _Graph, node: onnx.NodeProto, options: QdqOptions) -> str | None:
    """Why a Conv/Gemm/MatMul stays float (tiny conv, GEMV, attention score MatMul), or None."""
    rule = rules.WEIGHTED_OPS[node.op_type]
    weight_name = node.input[rule.weight_input] if rule.weight_input is not None else ""
    if node.op_type == "MatMul" and not g.is_constant(weight_name):
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


def _branch_is_weighted(g: _Graph, name: str, quantized_nodes: set[str]) -> bool:
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
    graph: _Graph | None = None,
) -> QdqSelection:
    """Structural placement (no scales). ``model`` must have node names (see :func:`ensure_node_names`)."""
    options = options or QdqOptions()
    g = graph if graph is not None else _Graph(model)
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

    # 2. Residual Add: quantize the skip input; the conv branch fuses as the conv's epilogue.
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
        # ORT CPU (uint8) fuses only a fully quantized Add (QLinearAdd): there, quantize both inputs.
        sides = (0, 1) if options.activation_type == "uint8" else (skip,)
        for i in sides:
            acts.setdefault(node.input[i], []).append((node.name, i))

    # 3. Concat/pooling (reverse order, so chains cascade): inputs share the quantized output's scale.
    for node in reversed(g.nodes):
        if rules.ROLES.get(node.op_type) is not rules.Role.SHARED_SCALE or not node.output:
            continue
        out = node.output[0]
        if out not in acts or node.name in excluded or out in mask:
            continue
        inputs = [(i, t) for i, t in enumerate(node.input) if g.is_float_activation(t) and t not in mask]
        if node.op_type != "Concat":
            inputs = inputs[:1]
        for i, t in inputs:
            acts.setdefault(t, []).append((node.name, i))
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


def _graph_order(g: _Graph, tensors: Iterable[str]) -> list[str]:
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

    The union over both activation types (uint8 also quantizes residual branches), so one set of ranges
    serves the TensorRT (int8) and the ORT CPU (uint8) graph.
    """
    named = ensure_node_names(model)
    wanted: set[str] = set()
    for activation_type in ACTIVATION_TYPES:
        options = QdqOptions(
            activation_type=activation_type,
            exclude_nodes=tuple(exclude_nodes),
            exclude_op_types=tuple(exclude_op_types),
        )
        wanted.update(select_qdq(named, options).activations)
    return _graph_order(_Graph(named), wanted)


# --------------------------------------------------------------------------------------------- scales


def _activation_scale(members: Sequence[TensorRange], activation_type: str) -> tuple[float, int]:
    if activation_type == "int8":
        amax = max(r.amax for r in members)
        return amax / 127.0, 0
    lo = min(r.clipped()[0] for r in members)
    hi = max(r.clipped()[1] for r in members)
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(round(-lo / scale), 0, 255)) if scale > 0 else 0
    return scale, zero_point


class GraphCache:
    """A named copy of a model and its lookup tables, reused when planning many variants (auto-fallback)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = ensure_node_names(model)
        _check_opset(self.model)
        self.graph = _Graph(self.model)


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
        if r.amax > options.huge_range:
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
        scales = wq.per_channel_scales(g.constant(w_name), axis, wq.weight_qmax(options.weight_format))
        use_bias = bias if options.activation_type == "uint8" and len(live) == 1 else None
        correction = (
            _bias_correction(g, w_name, live, axis, scales, means) if options.bias_correction else None
        )
        plan.weights[w_name] = WeightQdq(
            w_name,
            live,
            axis,
            tuple(float(s) for s in scales),
            use_bias,
            correction[0] if correction else None,
            correction[1] if correction else None,
            options.weight_format,
        )
    plan.quantized_nodes = quantized_nodes
    plan.node_types = {n: g.by_name[n].op_type for n in quantized_nodes}
    return plan


def _bias_correction(
    g: _Graph,
    w_name: str,
    consumers: Sequence[tuple[str, int]],
    axis: int,
    scales: np.ndarray,
    means: Mapping[str, Any],
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
    error = wq.dequantize_weight(wq.quantize_weight(w, scales, axis), scales, axis) - w
    shift = bc.output_shift(error, np.asarray(mean, np.float64), node.op_type, attrs)
    b = g.constant(bias)
    if shift is None or b.ndim != 1 or b.size != shift.size or not np.all(np.isfinite(shift)):
        return None
    return bias, tuple(float(v) for v in shift)


def _check_opset(model: onnx.ModelProto) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET:
        raise TrtbuildError(
            f"the model uses ONNX opset {opset}; per-channel Q/DQ needs opset {_MIN_OPSET} or newer",
            "re-export with opset_version=17 (or convert with onnx.version_converter)",
        )


# --------------------------------------------------------------------------------------------- apply


def apply_qdq(model: onnx.ModelProto | GraphCache, plan: QdqPlan, check: bool = True) -> onnx.ModelProto:
    """Insert the plan's QuantizeLinear/DequantizeLinear nodes; returns a new, checker-valid model."""
    if isinstance(model, GraphCache):
        g = model.graph
        model = _copy(model.model)
    else:
        model = ensure_node_names(model)
        _check_opset(model)
        g = _Graph(model)
    graph = model.graph
    act_elem = TensorProto.INT8 if plan.activation_type == "int8" else TensorProto.UINT8
    new_inits: list[onnx.TensorProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}  # producer tensor -> Q/DQ nodes to insert right after it
    head: list[onnx.NodeProto] = []  # Q/DQ of graph inputs and weight DQs go first
    rewire: dict[tuple[str, int], str] = {}

    for t, act in plan.activations.items():
        scale, zp = f"{t}_scale", f"{t}_zero_point"
        new_inits.append(numpy_helper.from_array(np.array(act.scale, np.float32), scale))
        new_inits.append(helper.make_tensor(zp, act_elem, [], [act.zero_point]))
        q = helper.make_node("QuantizeLinear", [t, scale, zp], [f"{t}_quantized"], name=f"{t}_QuantizeLinear")
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{t}_quantized", scale, zp],
            [f"{t}_dequantized"],
            name=f"{t}_DequantizeLinear",
        )
        (after.setdefault(t, []) if t in g.producer else head).extend([q, dq])
        for consumer in act.consumers:
            rewire[consumer] = f"{t}_dequantized"

    replaced: set[str] = set()
    for w_name, wplan in plan.weights.items():
        w = g.constant(w_name)
        scales = np.asarray(wplan.scales, np.float32)
        qw = wq.quantize_weight(w, scales, wplan.axis)
        stored, zero_points = wq.stored_weight(qw, wplan.weight_format, scales.size)
        new_inits += [
            numpy_helper.from_array(stored, f"{w_name}_quantized"),
            numpy_helper.from_array(scales, f"{w_name}_scale"),
            numpy_helper.from_array(zero_points.reshape(scales.shape), f"{w_name}_zero_point"),
        ]
        head.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{w_name}_quantized", f"{w_name}_scale", f"{w_name}_zero_point"],
                [f"{w_name}_dequantized"],
                name=f"{w_name}_DequantizeLinear",
                axis=wplan.axis,
            )
        )
        replaced.add(w_name)
        for consumer in wplan.consumers:
            rewire[consumer] = f"{w_name}_dequantized"
        bias_values = _planned_bias(g, wplan)
        if wplan.corrected_bias is not None and bias_values is not None:
            b = wplan.corrected_bias  # a float bias (an int32 one below replaces it for uint8 kernels)
            new_inits.append(numpy_helper.from_array(bias_values, f"{b}_corrected"))
            rewire[(wplan.consumers[0][0], 2)] = f"{b}_corrected"
            replaced.add(b)
        if wplan.bias is not None:
            node_name, _ = wplan.consumers[0]
            act_t = g.by_name[node_name].input[0]
            act_in = plan.activations.get(act_t)
            if act_in is not None and (node_name, 0) in act_in.consumers:
                values = bias_values if bias_values is not None else g.constant(wplan.bias)
                qb, b_scales = wq.quantize_bias(values, act_in.scale, scales)
                b = wplan.bias
                new_inits += [
                    numpy_helper.from_array(qb, f"{b}_quantized"),
                    numpy_helper.from_array(b_scales, f"{b}_scale"),
                    numpy_helper.from_array(np.zeros_like(qb), f"{b}_zero_point"),
                ]
                head.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{b}_quantized", f"{b}_scale", f"{b}_zero_point"],
                        [f"{b}_dequantized"],
                        name=f"{b}_DequantizeLinear",
                        axis=0,
                    )
                )
                rewire[(node_name, 2)] = f"{b}_dequantized"

    nodes: list[onnx.NodeProto] = list(head)
    for node in graph.node:
        for idx in range(len(node.input)):
            if (node.name, idx) in rewire:
                node.input[idx] = rewire[(node.name, idx)]
        nodes.append(node)
        for out in node.output:
            nodes.extend(after.get(out, []))
    del graph.node[:]
    graph.node.extend(nodes)

    still_used = {t for n in graph.node for t in n.input}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in still_used]
    added = [i for i in new_inits if i.name in still_used]  # e.g. a corrected float bias made int32
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    if check:
        onnx.checker.check_model(model)
    return model


def _planned_bias(g: _Graph, wplan: WeightQdq) -> np.ndarray | None:
    """The bias-corrected bias of a weight's consumer, or None without a correction."""
    if wplan.corrected_bias is None or wplan.bias_shift is None:
        return None
    node = g.by_name[wplan.consumers[0][0]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shift = np.asarray(wplan.bias_shift, np.float64)
    return bc.corrected_bias(g.constant(wplan.corrected_bias), shift, node.op_type, attrs)


def quantize_model(
    model: onnx.ModelProto, ranges: RangeSet | Mapping[str, TensorRange], options: QdqOptions | None = None
) -> tuple[onnx.ModelProto, QdqPlan]:
    """plan_qdq + apply_qdq in one call."""
    plan = plan_qdq(model, ranges, options)
    return apply_qdq(model, plan), plan
