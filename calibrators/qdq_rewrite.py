"""Rewrite a graph from a plan: insert QuantizeLinear/DequantizeLinear, store weights quantized."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators import bias_correction as bc
from calibrators import fp8
from calibrators import weights as wq
from calibrators.graph_index import GraphIndex, check_qdq_opset, copy_model, ensure_node_names
from calibrators.ort_float_guard import guard_float_layers
from calibrators.ort_matmul_bias import fuse_matmul_bias
from calibrators.qdq_fold_pads import fold_pads
from calibrators.qdq_scales import GraphCache
from calibrators.qdq_types import QdqPlan, WeightQdq
from trtbuild.core.errors import TrtbuildError

_ELEM_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, wq.FP8: TensorProto.FLOAT8E4M3FN}


def check_fp8_opset(model: onnx.ModelProto) -> None:
    """FP8 Q/DQ (float8e4m3fn zero points) exists from opset 19 on."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < fp8.FP8_OPSET:
        raise TrtbuildError(
            f"FP8 Q/DQ needs ONNX opset {fp8.FP8_OPSET}, the model uses {opset}",
            "upgrade it first (calibrators.quantize.upgrade_opset), or re-export with opset_version=19",
        )


def apply_qdq(model: onnx.ModelProto | GraphCache, plan: QdqPlan, check: bool = True) -> onnx.ModelProto:
    """Insert the plan's QuantizeLinear/DequantizeLinear nodes; returns a new, checker-valid model."""
    if isinstance(model, GraphCache):
        g = model.graph
        model = copy_model(model.model)
    else:
        model = ensure_node_names(model)
        check_qdq_opset(model)
        g = GraphIndex(model)
    graph = model.graph
    if plan.activation_type == wq.FP8 or plan.fp8_nodes:
        check_fp8_opset(model)
    new_inits: list[onnx.TensorProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}  # producer tensor -> Q/DQ nodes to insert right after it
    head: list[onnx.NodeProto] = []  # Q/DQ of graph inputs and weight DQs go first
    rewire: dict[tuple[str, int], str] = {}

    for key, act in plan.activations.items():
        t, p = act.tensor, _prefix(key)  # p differs from t only for a tensor's second (FP8) Q/DQ
        scale, zp = f"{p}_scale", f"{p}_zero_point"
        new_inits.append(numpy_helper.from_array(np.array(act.scale, np.float32), scale))
        new_inits.append(helper.make_tensor(zp, _ELEM_TYPES[act.dtype], [], [act.zero_point]))
        q = helper.make_node("QuantizeLinear", [t, scale, zp], [f"{p}_quantized"], name=f"{p}_QuantizeLinear")
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{p}_quantized", scale, zp],
            [f"{p}_dequantized"],
            name=f"{p}_DequantizeLinear",
        )
        (after.setdefault(t, []) if t in g.producer else head).extend([q, dq])
        for consumer in act.consumers:
            rewire[consumer] = f"{p}_dequantized"

    replaced: set[str] = set()
    for key, wplan in plan.weights.items():
        w, w_name = g.constant(wplan.tensor), _prefix(key)
        scales = np.asarray(wplan.scales, np.float32)
        learned = plan.rounded_weights.get(key)
        qw = (
            learned if learned is not None else wq.quantize_weight(w, scales, wplan.axis, wplan.weight_format)
        )
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
        replaced.add(wplan.tensor)
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
    if plan.activation_type == "uint8":
        fold_pads(model)  # ORT has no integer Pad: a zero Pad before a conv becomes the conv's own pads
        fuse_matmul_bias(model)  # else ORT fuses MatMul + Add into a float Gemm that dequantizes per run
        guard_float_layers(model)  # else ORT quantizes a float layer's weight per tensor behind our back
    if check:
        onnx.checker.check_model(model)
    return model


def _prefix(plan_key: str) -> str:
    """Names of a plan entry's Q/DQ nodes and tensors: the tensor's own, or "<tensor>_fp8" for a second,
    FP8 pair on a tensor that also has INT8 Q/DQ (mixed plans)."""
    return plan_key.replace("@", "_")


def _planned_bias(g: GraphIndex, wplan: WeightQdq) -> np.ndarray | None:
    """The bias-corrected bias of a weight's consumer, or None without a correction."""
    if wplan.corrected_bias is None or wplan.bias_shift is None:
        return None
    node = g.by_name[wplan.consumers[0][0]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shift = np.asarray(wplan.bias_shift, np.float64)
    return bc.corrected_bias(g.constant(wplan.corrected_bias), shift, node.op_type, attrs)
