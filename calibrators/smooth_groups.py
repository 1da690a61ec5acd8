"""SmoothQuant's graph side: which MatMul/Gemm activation inputs can be smoothed, and the exact fold.

A group is one activation tensor X read by MatMul/Gemm layers with constant weights (QKV share one). For a
per-input-channel scale s, X' = X / s is folded into X's producer and W' = diag(s) W into every consumer,
so the float graph computes the same values and no op is added where the producer absorbs s:

- LayerNormalization (last axis): scale and bias / s;
- Mul by a constant (a decomposed LayerNorm's gamma, or GELU's final `* 0.5`): the constant / s;
- Add of a constant (a decomposed LayerNorm's beta, a MatMul's bias): the constant / s, and the other
  input absorbs s in turn (it must have no other reader);
- MatMul / Gemm with a constant weight: its output columns (and Gemm's bias) / s.

A LayerNormalization whose output also feeds something else (BERT's residual Add) is duplicated: the copy
with the folded scale feeds the MatMuls, the original the residual. TensorRT runs both as normalization
layers; nothing else changes. Anything else (an attention context through Reshape/Transpose, a Softmax,
an input) cannot absorb s: the group is skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from calibrators.graph_index import GraphIndex

SHAPE_READERS = {"Shape", "Size"}  # read only the shape, which smoothing keeps


@dataclass(frozen=True)
class Consumer:
    node: str
    weight: str  # the constant weight input
    transposed: bool  # Gemm transB=1: the weight is (N, K), its input channels are columns


@dataclass(frozen=True)
class Candidate:
    tensor: str
    consumers: tuple[Consumer, ...]
    producer: str  # the node that absorbs 1/s
    duplicate: bool  # a LayerNormalization copied for the MatMuls (its output has other readers)


def _consumer(g: GraphIndex, node: onnx.NodeProto, idx: int) -> Consumer | None:
    """A MatMul/Gemm reading the tensor as its activation with a constant 2-D weight."""
    if idx != 0 or len(node.input) < 2 or not g.is_constant(node.input[1]):
        return None
    if g.constant(node.input[1]).ndim != 2:
        return None
    if node.op_type == "MatMul":
        return Consumer(node.name, node.input[1], False)
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return Consumer(node.name, node.input[1], bool(attrs.get("transB", 0)))
    return None


def _absorb_reason(g: GraphIndex, tensor: str, channels: int, depth: int = 0) -> str | None:
    """None when ``tensor``'s producer can absorb a per-last-axis scale exactly, else why not."""
    node = g.producer.get(tensor)
    if node is None:
        return "a graph input cannot absorb a scale"
    if node.op_type == "LayerNormalization":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or not g.is_constant(node.input[1]):
            return "LayerNormalization over other axes or with a computed scale"
        return None
    constants = [i for i in node.input if g.is_constant(i)]
    if node.op_type == "Mul" and len(constants) == 1:
        return _broadcast_reason(g.constant(constants[0]), channels)
    if node.op_type == "Add" and len(constants) == 1 and depth < 2:
        reason = _broadcast_reason(g.constant(constants[0]), channels)
        other = next(i for i in node.input if i not in constants)
        if reason is None and [n for n, _ in g.consumers.get(other, [])] != [node]:
            reason = f"{node.op_type} input {other} has other readers"
        return reason or _absorb_reason(g, other, channels, depth + 1)
    if node.op_type in ("MatMul", "Gemm") and g.is_constant(node.input[1]):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            return _broadcast_reason(g.constant(node.input[2]), channels)
        return (
            None if g.constant(node.input[1]).ndim == 2 and not attrs.get("transA", 0) else "weight not 2-D"
        )
    return f"producer {node.op_type} ({node.name}) cannot absorb a per-channel scale"


def _broadcast_reason(constant: np.ndarray, channels: int) -> str | None:
    if constant.size in (1, channels) and (constant.ndim == 0 or constant.shape[-1] in (1, channels)):
        return None
    return f"constant of shape {list(constant.shape)} is not per-channel"


def find_candidates(model: onnx.ModelProto, quantized: set[str]) -> tuple[list[Candidate], dict[str, str]]:
    """The smoothable groups among the ``quantized`` activations, and the skipped ones with the reason."""
    g = GraphIndex(model)
    found: list[Candidate] = []
    skipped: dict[str, str] = {}
    for tensor in sorted(quantized, key=lambda t: g.nodes.index(g.producer[t]) if t in g.producer else -1):
        readers = g.consumers.get(tensor, [])
        consumers = [c for n, i in readers if (c := _consumer(g, n, i)) is not None]
        if not consumers:
            continue
        weights = [g.constant(c.weight) for c in consumers]
        channels = {
            w.shape[1] if c.transposed else w.shape[0] for c, w in zip(consumers, weights, strict=True)
        }
        others = [n for n, i in readers if n.op_type not in SHAPE_READERS and _consumer(g, n, i) is None]
        shared = [c.weight for c in consumers if len(g.consumers.get(c.weight, [])) > 1]
        producer = g.producer.get(tensor)
        duplicate = bool(others) and producer is not None and producer.op_type == "LayerNormalization"
        if len(channels) != 1:
            skipped[tensor] = "consumers disagree on the channel count"
        elif shared:
            skipped[tensor] = f"weight {shared[0]} is shared with other layers"
        elif tensor in g.graph_outputs:
            skipped[tensor] = "the tensor is a graph output"
        elif others and not duplicate:
            skipped[tensor] = f"also read by {others[0].op_type} ({others[0].name}), which needs it unscaled"
        elif (reason := _absorb_reason(g, tensor, next(iter(channels)))) is not None:
            skipped[tensor] = reason
        else:
            assert producer is not None
            found.append(Candidate(tensor, tuple(consumers), producer.name, duplicate))
    return found, skipped


class _Index:
    """GraphIndex's lookups the fold needs, without its shape inference (re-built after every group)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.by_name = {n.name: n for n in model.graph.node}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in model.graph.node:
            for idx, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, idx))
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.constants = {
            n.output[0]: a.t
            for n in model.graph.node
            if n.op_type == "Constant"
            for a in n.attribute
            if a.name == "value"
        }

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def constant(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers.get(name) or self.constants[name])


class _Writer:
    """Writes new constant values; a constant read by more than one node gets a private copy."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = _Index(model)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.names = {t for n in model.graph.node for t in (*n.input, *n.output)} | set(self.inits)

    def fresh(self, base: str) -> str:
        name, i = f"{base}_smooth", 0
        while name in self.names:
            i += 1
            name = f"{base}_smooth{i}"
        self.names.add(name)
        return name

    def set(self, node: onnx.NodeProto, idx: int, value: np.ndarray) -> None:
        name = node.input[idx]
        old = self.g.constant(name)
        array = value.astype(old.dtype)
        if name in self.inits and len(self.g.consumers.get(name, [])) == 1:
            self.inits[name].CopyFrom(numpy_helper.from_array(array, name))
            return
        new = self.fresh(name)
        self.model.graph.initializer.append(numpy_helper.from_array(array, new))
        node.input[idx] = new


def _per_channel(constant: np.ndarray, s: np.ndarray, divide: bool) -> np.ndarray:
    """``constant`` (scalar or per-last-axis) scaled per channel by 1/s (divide) or s."""
    c = constant.astype(np.float64)
    if c.ndim == 0 or c.shape[-1] == 1:
        c = c * np.ones(s.shape, np.float64) if c.ndim <= 1 else np.broadcast_to(c, (*c.shape[:-1], s.size))
    return c / s if divide else c * s


def _absorb(w: _Writer, node: onnx.NodeProto, s: np.ndarray) -> None:
    """Fold X / s into ``node``, the producer (see _absorb_reason for what each op type does)."""
    g = w.g
    if node.op_type == "LayerNormalization":
        for idx in (1, 2):
            if len(node.input) > idx and node.input[idx]:
                w.set(node, idx, _per_channel(g.constant(node.input[idx]), s, True))
        return
    if node.op_type in ("Mul", "Add"):
        idx = next(i for i, t in enumerate(node.input) if g.is_constant(t))
        w.set(node, idx, _per_channel(g.constant(node.input[idx]), s, True))
        if node.op_type == "Add":
            _absorb(w, g.producer[node.input[1 - idx]], s)
        return
    weight = g.constant(node.input[1]).astype(np.float64)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    transposed = node.op_type == "Gemm" and attrs.get("transB", 0)
    w.set(node, 1, weight / s[:, None] if transposed else weight / s[None, :])
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        w.set(node, 2, _per_channel(g.constant(node.input[2]), s, True))


def apply(model: onnx.ModelProto, scales: dict[str, tuple[Candidate, np.ndarray]]) -> onnx.ModelProto:
    """A copy of ``model`` with each tensor's scale s folded: X / s in the producer, diag(s) W in the
    consumers. ``scales``: tensor -> (its candidate, s)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor, (cand, s) in scales.items():
        w = _Writer(out)  # re-indexed per group: an earlier group may have rewritten shared constants
        s64 = s.astype(np.float64)
        producer = w.g.by_name[cand.producer]
        if cand.duplicate:
            copy = onnx.NodeProto()
            copy.CopyFrom(producer)
            copy.name = w.fresh(producer.name)
            smoothed = w.fresh(tensor)
            copy.output[0] = smoothed
            del copy.output[1:]  # Mean / InvStdDev are not needed twice
            for c in cand.consumers:
                w.g.by_name[c.node].input[0] = smoothed
            nodes = list(out.graph.node)
            nodes.insert(nodes.index(producer) + 1, copy)
            rebuilt = [onnx.NodeProto() for _ in nodes]
            for target, source in zip(rebuilt, nodes, strict=True):
                target.CopyFrom(source)
            del out.graph.node[:]
            out.graph.node.extend(rebuilt)
            w = _Writer(out)
            producer = w.g.by_name[copy.name]
        _absorb(w, producer, s64)
        for c in cand.consumers:
            node = w.g.by_name[c.node]
            weight = w.g.constant(node.input[1]).astype(np.float64)
            w.set(node, 1, weight * s64[None, :] if c.transposed else weight * s64[:, None])
    return out
