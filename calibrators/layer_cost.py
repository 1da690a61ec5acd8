"""Multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul layer, so "how much of the model stays float"
is measured in compute, not in a count of layers (a 3-channel stem and a 1280-channel head are not equal).

Shapes come from ONNX shape inference with the graph inputs fixed to one real batch's shapes, and where
that cannot tell (pads or shapes computed by Constant/Shape nodes, as exports write them) from one run of
that batch with the missing tensors as extra outputs; a layer still unknown counts its weight size.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, shape_inference

from trtbuild.core import ort as ort_core

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name], strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    return copy


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # a graph ONNX cannot infer: fall back to weight sizes
        return {}
    known: dict[str, list[int]] = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            known[value.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        known[init.name] = list(init.dims)
    return known


def _measured_shapes(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str]
) -> dict[str, list[int]]:
    """Shapes of ``names`` from one run of ``feeds`` (the tensors added as extra graph outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    try:
        session = ort_core.cpu_session(probe)
        values = session.run(names, dict(feeds))
    except Exception:  # a graph ORT cannot run with extra outputs: weight sizes stand in
        return {}
    return {n: list(np.asarray(v).shape) for n, v in zip(names, values, strict=True)}


def layer_macs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """MACs of every compute layer (by node name) for the batch ``feeds``."""
    shapes = _shapes(_with_input_shapes(model, {k: tuple(np.asarray(v).shape) for k, v in feeds.items()}))
    wanted = sorted(
        {
            t
            for n in model.graph.node
            if n.op_type in COMPUTE_OPS and n.name
            for t in (n.input[0], n.output[0])
            if t not in shapes
        }
    )
    if wanted:
        shapes.update(_measured_shapes(model, feeds, wanted))
    costs: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or not node.name:
            continue
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        out = shapes.get(node.output[0])
        first = shapes.get(node.input[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        cost: float | None = None
        if node.op_type == "Conv" and weight and out:
            cost = float(np.prod(out)) * float(np.prod(weight[1:]))
        elif node.op_type == "ConvTranspose" and weight and first:
            group = int(attrs.get("group", 1))
            cost = float(np.prod(first)) * float(np.prod(weight[1:])) * group / max(group, 1)
        elif node.op_type in ("Gemm", "MatMul") and out and first:
            trans_a = node.op_type == "Gemm" and int(attrs.get("transA", 0)) == 1
            k = first[-2] if trans_a and len(first) >= 2 else first[-1]
            cost = float(np.prod(out)) * float(k)
        if cost is None:
            cost = float(np.prod(weight)) if weight else 1.0
        costs[node.name] = cost
    return costs


def float_share(costs: Mapping[str, float], quantized: set[str] | list[str]) -> float:
    """Share of all compute-layer MACs that runs in float (layers not in ``quantized``)."""
    total = sum(costs.values())
    if total <= 0:
        return 0.0
    q = set(quantized)
    return sum(c for n, c in costs.items() if n not in q) / total
