"""A quantized 2-D MatMul plus its bias Add becomes one Gemm with an int32 bias, in an ORT-CPU (uint8) graph.

Keras/tf2onnx classifier heads (MTCNN's R-Net and O-Net: Flatten -> MatMul -> Add) reach ONNX Runtime as
DQ -> MatMul -> Add. At its default level ORT first fuses MatMul + Add into a float Gemm
(``MatMulAddFusion``), and its QDQ Gemm fusion then finds a float bias and leaves the Gemm in float: the
weight's DequantizeLinear runs on every inference. Measured on MTCNN's O-Net (batch 1, one thread, ORT's
profiler): those DQs took 970 of the INT8 graph's 1911 us, more than its whole FP32 run (445 us). Written
as ``Gemm(DQ(a), DQ(w), DQ(int32 bias))`` -- the form ORT's Conv fusion takes, bias scale = input scale x
weight scale per column -- ORT forms ``QGemm`` with a float output. The int32 bias rounds each output by at
most half of input scale x weight scale, far below the input's own rounding, and the gate measures the
graph as written. TensorRT graphs are not touched.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators import weights as wq
from calibrators.graph_index import GraphIndex


def _dq_scale(g: GraphIndex, tensor: str) -> np.ndarray | None:
    """The constant scale of the DequantizeLinear producing ``tensor`` (None: not a DQ, or a run-time one)."""
    dq = g.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or not g.is_constant(dq.input[1]):
        return None
    return g.constant(dq.input[1]).astype(np.float32)


def _column_scales(g: GraphIndex, weight: str) -> np.ndarray | None:
    """Per-column scales of a dequantized constant [K, N] weight (per tensor or per axis 1)."""
    dq = g.producer.get(weight)
    scales = _dq_scale(g, weight)
    if dq is None or scales is None or not g.is_constant(dq.input[0]) or g.constant(dq.input[0]).ndim != 2:
        return None
    columns = g.constant(dq.input[0]).shape[1]
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scales.size == 1:
        return np.full(columns, scales.reshape(()), np.float32)
    return scales if axis in (1, -1) and scales.shape == (columns,) else None


def _bias_add(g: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The Add of a constant [N] / [1, N] bias that alone reads ``node``'s output, and the bias."""
    out = node.output[0]
    readers = g.consumers.get(out, [])
    if out in g.graph_outputs or len(readers) != 1 or readers[0][0].op_type != "Add":
        return None
    add = readers[0][0]
    other = add.input[1 - readers[0][1]]
    if not g.is_constant(other):
        return None
    bias = g.constant(other)
    return (add, bias.reshape(-1)) if bias.ndim in (1, 2) and bias.shape[0] == bias.size else None


def fuse_matmul_bias(model: onnx.ModelProto) -> int:
    """Rewrite every DQ -> MatMul (2-D input, per-tensor input scale) -> Add(constant bias) in place;
    returns how many. The Gemm keeps the MatMul's name (plans and reports name layers by it)."""
    g = GraphIndex(model)
    replace: dict[str, list[onnx.NodeProto]] = {}
    drop: set[str] = set()
    inits: list[onnx.TensorProto] = []
    for node in g.nodes:
        if node.op_type != "MatMul" or len(g.shape.get(node.input[0], [])) != 2:
            continue
        act_scale, columns = _dq_scale(g, node.input[0]), _column_scales(g, node.input[1])
        found = _bias_add(g, node)
        if act_scale is None or act_scale.size != 1 or columns is None or found is None:
            continue
        add, bias = found
        if bias.size != columns.size:
            continue
        qb, scales = wq.quantize_bias(bias, float(act_scale.reshape(())), columns)
        b = f"{node.name}_bias"
        inits += [
            numpy_helper.from_array(qb, f"{b}_quantized"),
            numpy_helper.from_array(scales, f"{b}_scale"),
            numpy_helper.from_array(np.zeros_like(qb), f"{b}_zero_point"),
        ]
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{b}_quantized", f"{b}_scale", f"{b}_zero_point"],
            [f"{b}_dequantized"],
            name=f"{b}_DequantizeLinear",
            axis=0,
        )
        gemm = helper.make_node(
            "Gemm", [node.input[0], node.input[1], f"{b}_dequantized"], [add.output[0]], name=node.name
        )
        replace[node.name], drop = [dq, gemm], drop | {add.name}
    if not replace:
        return 0
    nodes = [n for old in g.nodes if old.name not in drop for n in replace.get(old.name, [old])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + inits)
    return len(replace)
