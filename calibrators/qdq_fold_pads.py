"""Fold explicit zero Pads into the convs they feed, in an ORT-CPU (uint8) Q/DQ graph.

Exporters of TF-style "same" padding (EfficientNet, MobileNet ports) write Pad -> Conv. ONNX Runtime has
no integer Pad kernel, so in a Q/DQ graph each such Pad runs as DQ -> Pad (float) -> Q in front of the
QLinearConv: measured on EfficientNet-Lite0 these three ops cost about a third of the INT8 graph's time
(docs/ort-cpu-int8.md). A constant zero Pad on the spatial axes is exactly the conv's own ``pads``: zero
quantizes to the zero point and back to zero, so ``DQ(Q(Pad(x))) == Pad(DQ(Q(x)))``. The fold rewires

    X -> Pad -> Q -> DQ -> Conv            into   X -> Q -> DQ -> Conv(pads += Pad's)
    DQ_a -> Pad -> Q_b -> DQ_b -> Conv     into   DQ_a -> Conv(pads += Pad's)   (a and b share scale/zp)

and leaves every other Pad alone. TensorRT graphs are not touched (TensorRT fuses Pad itself).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator


class _Index:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for idx, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, idx))
        self.initializers = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.opsets = list(model.opset_import)
        self.position = {id(n): i for i, n in enumerate(graph.node)}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or computed from constants only (e.g. exported
        static padding), else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        nodes: list[onnx.NodeProto] = []
        inits: dict[str, onnx.TensorProto] = {}
        frontier, seen = [name], set()
        while frontier:
            t = frontier.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in self.initializers:
                inits[t] = self.initializers[t]
                continue
            node = self.producer.get(t)
            if node is None or len(nodes) > 32 or node.op_type in ("Shape", "Size"):
                return None  # a graph input, or a shape that depends on one
            nodes.append(node)
            frontier.extend(node.input)
        unique = sorted({id(n): n for n in nodes}.values(), key=lambda n: self.position[id(n)])
        out = helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
        sub = helper.make_model(
            helper.make_graph(unique, "pads", [], [out], list(inits.values())), opset_imports=self.opsets
        )
        try:
            outputs = ReferenceEvaluator(sub).run(None, {})
            return np.asarray(outputs[name] if isinstance(outputs, dict) else outputs[0])
        except Exception:  # anything the evaluator cannot run is simply not folded
            return None


def _spatial_pads(ix: _Index, pad: onnx.NodeProto) -> list[int] | None:
    """The Pad's [begin..., end...] on the spatial axes of an NCHW tensor, when it is a constant zero pad
    on those axes only; else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or len(pad.input) < 2:
        return None
    if len(pad.input) > 3 and pad.input[3]:
        return None  # explicit axes (opset 18): not worth the bookkeeping
    if len(pad.input) > 2 and pad.input[2]:
        value = ix.constant(pad.input[2])
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
            return None
    pads = ix.constant(pad.input[1])
    if pads is None or pads.ndim != 1 or pads.size % 2 or pads.size < 6:
        return None
    rank = pads.size // 2
    begin, end = [int(v) for v in pads[:rank]], [int(v) for v in pads[rank:]]
    if any(begin[:2]) or any(end[:2]) or min(begin + end) < 0:
        return None
    return begin[2:] + end[2:]


def _same_qparams(ix: _Index, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    for i in (1, 2):
        va = ix.constant(a.input[i]) if len(a.input) > i and a.input[i] else None
        vb = ix.constant(b.input[i]) if len(b.input) > i and b.input[i] else None
        if va is None or vb is None or va.dtype != vb.dtype or not np.array_equal(va, vb):
            return False
    return True


def _only_consumer(ix: _Index, tensor: str, op_type: str) -> onnx.NodeProto | None:
    readers = ix.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in ix.outputs or readers[0][0].op_type != op_type:
        return None
    return readers[0][0]


def fold_pads(model: onnx.ModelProto) -> int:
    """Fold every foldable Pad -> Q -> DQ -> Conv chain of ``model`` in place; returns how many."""
    ix = _Index(model)
    dropped: set[int] = set()
    folded = 0
    for pad in list(model.graph.node):
        if pad.op_type != "Pad":
            continue
        spatial = _spatial_pads(ix, pad)
        q = _only_consumer(ix, pad.output[0], "QuantizeLinear")
        dq = _only_consumer(ix, q.output[0], "DequantizeLinear") if q is not None else None
        if spatial is None or q is None or dq is None:
            continue
        convs = ix.consumers.get(dq.output[0], [])
        if dq.output[0] in ix.outputs or not convs:
            continue
        if any(c.op_type != "Conv" or i != 0 or len(_conv_pads(c)) != len(spatial) for c, i in convs):
            continue
        upstream = ix.producer.get(pad.input[0])
        if upstream is not None and upstream.op_type == "DequantizeLinear" and _same_qparams(ix, upstream, q):
            source = upstream.output[0]  # already on the grid: the Q/DQ pair after the Pad is redundant
            dropped.update({id(pad), id(q), id(dq)})
        else:
            q.input[0] = pad.input[0]
            source = dq.output[0]
            dropped.add(id(pad))
        for conv, _ in convs:
            conv.input[0] = source
            own = _conv_pads(conv)
            _set_pads(conv, [a + b for a, b in zip(own, spatial, strict=True)])
        folded += 1
    if dropped:
        kept = [n for n in model.graph.node if id(n) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return folded


def _conv_pads(conv: onnx.NodeProto) -> list[int]:
    """The conv's explicit pads ([] when auto_pad is set: those convs are not folded into)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    auto = attrs.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
        return []
    if "pads" in attrs:
        return [int(v) for v in attrs["pads"]]
    kernel = attrs.get("kernel_shape")
    return [0] * (2 * len(kernel)) if kernel else []


def _set_pads(conv: onnx.NodeProto, pads: list[int]) -> None:
    for attr in list(conv.attribute):
        if attr.name == "pads":
            conv.attribute.remove(attr)
    conv.attribute.append(helper.make_attribute("pads", pads))
