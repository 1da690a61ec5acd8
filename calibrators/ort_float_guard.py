"""Keep a float layer float under ONNX Runtime, in an ORT-CPU (uint8) Q/DQ graph.

ORT's ``WeightBiasQuantization`` graph transformer (onnxruntime/core/optimizer/qdq_transformer, on at
ORT's default optimisation level) rewrites every Conv, ConvTranspose and Gemm whose input comes from a
per-tensor DequantizeLinear and whose weight is a float initializer: it quantizes that weight to a
*per-tensor* symmetric int8 grid (and the bias to int32), and the QDQ fusions then run the layer as an
integer kernel. ORT's ``PadFusion`` (a zero Pad folded into the conv) and ``QDQPropagation`` (a per-tensor
DQ carried forward through MaxPool/Reshape/Transpose/Squeeze/Unsqueeze/Slice) run before it, so a layer
behind such ops is caught too. A layer that the placement rules, ``--exclude`` or the fallback kept float
because it is sensitive is thus quantized anyway, per tensor, which is far coarser than our per-channel
grid: measured on EfficientNet-Lite0 with its depthwise convs kept float, cosine vs FP32 0.9617 in ORT's
kernels against 0.9984 in the graph's own (reference) semantics (docs/ort-cpu-int8.md).

The transformer only takes a DQ with a scalar scale. So such a layer's input gets its own per-axis DQ of the
same quantized tensor, with the scale and zero point repeated along one axis: the same values, so the
graph's meaning is unchanged, and ORT leaves the layer (and the DQ) alone. The per-tensor DQ stays for the
integer kernels that read it. TensorRT graphs are not touched (TensorRT keeps a float layer float).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators.graph_index import GraphIndex

# Layers whose float weight ORT quantizes per tensor when their input is dequantized.
WEIGHT_QUANTIZED_BY_ORT = ("Conv", "ConvTranspose", "Gemm")
# Ops that ORT folds into the layer (Pad) or moves a per-tensor DQ across (QDQPropagation) before it does;
# Identity and Flatten too, for ORT versions that remove or propagate through them.
_SEE_THROUGH = (
    "Pad",
    "MaxPool",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Identity",
    "Flatten",
)


def guard_float_layers(model: onnx.ModelProto) -> list[str]:
    """Give each float Conv/ConvTranspose/Gemm fed by a per-tensor DQ a per-axis DQ of its own (in place).

    Returns the names of the layers guarded. A layer whose input has no known axis longer than 1 (where a
    per-axis scale would still count as scalar) is left as it is.
    """
    g = GraphIndex(model)
    guards: dict[str, str] = {}  # per-tensor DQ node name -> its per-axis twin's output
    new_nodes: dict[str, onnx.NodeProto] = {}  # per-tensor DQ node name -> twin, inserted after it
    guarded: list[str] = []
    for node in g.nodes:
        if not _float_weight_layer(g, node):
            continue
        found = _dequantize_behind(g, node.input[0], node)
        if found is None:
            continue
        dq, reader = found
        if dq.name not in guards:
            twin = _per_axis_twin(g, dq)
            if twin is None:
                continue
            new_nodes[dq.name] = twin
            guards[dq.name] = twin.output[0]
        for idx, name in enumerate(reader.input):
            if name == dq.output[0]:
                reader.input[idx] = guards[dq.name]
        guarded.append(node.name)
    if not new_nodes:
        return guarded
    _insert_after(model, new_nodes)
    _drop_unused(model, set(new_nodes))
    return guarded


def _float_weight_layer(g: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type not in WEIGHT_QUANTIZED_BY_ORT or len(node.input) < 2:
        return False
    init = g.initializers.get(node.input[1])
    return init is not None and init.data_type == TensorProto.FLOAT


def _dequantize_behind(
    g: GraphIndex, tensor: str, reader: onnx.NodeProto
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The per-tensor DQ that ``tensor`` comes from through see-through ops, and the node that reads it."""
    for _ in range(16):
        producer = g.producer.get(tensor)
        if producer is None:
            return None
        if producer.op_type == "DequantizeLinear":
            return (producer, reader) if _scalar_scale(g, producer) else None
        if producer.op_type not in _SEE_THROUGH or not producer.input:
            return None
        reader, tensor = producer, producer.input[0]
    return None


def _scalar_scale(g: GraphIndex, dq: onnx.NodeProto) -> bool:
    if len(dq.input) < 2 or not g.is_constant(dq.input[1]):
        return False
    return int(np.prod(g.constant(dq.input[1]).shape)) == 1


def _per_axis_twin(g: GraphIndex, dq: onnx.NodeProto) -> onnx.NodeProto | None:
    shape = g.shape.get(dq.output[0]) or []
    axis = next((a for a, size in enumerate(shape) if a >= 1 and size is not None and size > 1), None)
    if axis is None or len(dq.input) < 3 or not g.is_constant(dq.input[2]):
        return None
    size = shape[axis]
    assert size is not None
    scale = np.full(size, float(g.constant(dq.input[1]).reshape(-1)[0]), np.float32)
    zero_point = g.constant(dq.input[2]).reshape(-1)
    base = f"{dq.output[0]}_per_axis"
    g.model.graph.initializer.extend(
        [
            numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.full(size, zero_point[0], zero_point.dtype), f"{base}_zero_point"),
        ]
    )
    return helper.make_node(
        "DequantizeLinear",
        [dq.input[0], f"{base}_scale", f"{base}_zero_point"],
        [base],
        name=f"{base}_DequantizeLinear",
        axis=axis,
    )


def _insert_after(model: onnx.ModelProto, new_nodes: dict[str, onnx.NodeProto]) -> None:
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes.append(node)
        if node.name in new_nodes:
            nodes.append(new_nodes[node.name])
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the per-tensor DQs (and their scale/zero point) that nothing reads any more."""
    read = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    dropped = [n for n in model.graph.node if n.name in candidates and n.output[0] not in read]
    if not dropped:
        return
    keep = [n for n in model.graph.node if all(n is not d for d in dropped)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {t for n in keep for t in n.input}
    orphans = {t for d in dropped for t in d.input[1:] if t not in used}
    inits = [i for i in model.graph.initializer if i.name not in orphans]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
