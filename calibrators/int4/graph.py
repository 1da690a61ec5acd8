"""Find the INT4 weight layers of a graph and write TensorRT's weight-only pattern into it.

A layer is a MatMul whose second input is a constant 2-D float weight, or a Gemm (transA=0) whose B is
one. The weight becomes an INT4 initializer (TensorProto.INT4, packed two per byte) with per-block
scales, dequantized by ``DequantizeLinear(axis=reduction axis, block_size=B)`` (opset 21) that feeds the
MatMul: the pattern TensorRT 10 fuses into a weight-only INT4 GEMM. MatMul weights are [K, N] (axis 0);
Gemm with transB=1 stores [N, K], so its axis is 1. AWQ's per-channel input scale 1/s is folded into a
LayerNormalization's gamma/beta when every consumer of that activation is in the scaled group; otherwise
it stays as one Mul before the MatMuls (a pointwise op TensorRT runs in FP16).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators.int4.blocks import BlockQuant
from trtbuild.core import onnx_file

INT4_OPSET = 21  # blocked DequantizeLinear and the INT4 type
_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class WeightLayer:
    node: str
    op_type: str
    activation: str  # the MatMul's data input (what AWQ/GPTQ calibrate on)
    weight: str  # initializer name
    k: int  # reduction size
    n: int  # output channels
    transposed: bool  # stored [N, K] (Gemm transB=1)

    @property
    def axis(self) -> int:
        return 1 if self.transposed else 0


def hoist_constants(model: onnx.ModelProto) -> int:
    """Constant-node tensors (third-party exports) become initializers, so their weights are found."""
    keep, hoisted = [], 0
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.data_type in _FLOAT and len(value.dims):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            hoisted += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return hoisted


def find_layers(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> list[WeightLayer]:
    """Every MatMul/Gemm with a constant 2-D float weight used only there (``exclude``: name regexes)."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    layers = []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type not in _FLOAT:
            continue
        if node.input[0] in inits or uses.get(node.input[1], 0) != 1:
            continue
        if any(re.search(pattern, name) for pattern in exclude):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        rows, cols = (int(d) for d in weight.dims)
        k, n = (cols, rows) if transposed else (rows, cols)
        layers.append(WeightLayer(name, node.op_type, node.input[0], node.input[1], k, n, transposed))
    return layers


def kept_float(model: onnx.ModelProto, layers: Sequence[WeightLayer]) -> list[dict[str, str]]:
    """The MatMul/Gemm nodes with a constant float weight that ``find_layers`` did not take, and why:
    reported, so a third-party graph's float GEMMs do not pass for INT4 ones."""
    inits = {t.name: t for t in model.graph.initializer}
    taken = {layer.node for layer in layers}
    readers: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(node.name or f"{node.op_type}_{index}")
    out = []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type not in ("MatMul", "Gemm") or name in taken or len(node.input) < 2:
            continue
        first, second = (inits.get(i) for i in node.input[:2])
        weight = second if second is not None and second.data_type in _FLOAT else None
        if weight is None:
            if first is not None and first.data_type in _FLOAT:
                out.append({"node": name, "op_type": node.op_type, "reason": "the weight is the first input"})
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        others = [r for r in dict.fromkeys(readers.get(node.input[1], [])) if r != name]
        if len(weight.dims) != 2:
            reason = f"{len(weight.dims)}-D weight"
        elif others:
            reason = f"the weight is also read by {', '.join(others[:3])}"
        elif node.op_type == "Gemm" and attrs.get("transA", 0):
            reason = "Gemm transA=1"
        elif first is not None:
            reason = "both inputs constant"
        else:
            reason = "--exclude"
        out.append({"node": name, "op_type": node.op_type, "reason": reason})
    return out


def weight_kn(model: onnx.ModelProto, layer: WeightLayer) -> np.ndarray:
    """The layer's weight as float32 [K, N]."""
    tensor = next(t for t in model.graph.initializer if t.name == layer.weight)
    array = numpy_helper.to_array(tensor).astype(np.float32)
    return np.ascontiguousarray(array.T if layer.transposed else array)


def int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """A TensorProto.INT4 initializer: two codes per byte, the first in the low nibble (ONNX's packing)."""
    flat = codes.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat & 0x0F).astype(np.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Block-wise INT4 DequantizeLinear needs opset 21."""
    return model if onnx_file.opset_of(model) >= INT4_OPSET else onnx_file.convert_opset(model, INT4_OPSET)


def _fold_into_layernorm(
    model: onnx.ModelProto, activation: str, group: set[str], inverse: np.ndarray
) -> bool:
    """Divide the producing LayerNormalization's gamma/beta by s if nothing else reads the activation."""
    consumers = [n for n in model.graph.node if activation in n.input]
    if any(n.name not in group for n in consumers):
        return False
    producer = next((n for n in model.graph.node if activation in n.output), None)
    if producer is None or producer.op_type != "LayerNormalization" or len(producer.input) < 3:
        return False
    inits = {t.name: t for t in model.graph.initializer}
    params = [inits.get(name) for name in producer.input[1:3]]
    if any(p is None for p in params) or len({producer.input[1], producer.input[2]}) != 2:
        return False
    for tensor in params:
        assert tensor is not None
        value = numpy_helper.to_array(tensor).astype(np.float32) * inverse
        tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
    return True


def write_int4(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    quants: Mapping[str, BlockQuant],
    input_scales: Mapping[str, np.ndarray],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` (opset 21) with each layer's weight as INT4 + DequantizeLinear; ``input_scales``:
    AWQ's s per activation (the weights in ``quants`` were multiplied by it). Returns the model and, per
    activation, where 1/s went ("layernorm" or "mul")."""
    out = upgrade_opset(model)
    out = out if out is not model else _copy(model)
    inits = {t.name: t for t in out.graph.initializer}
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert in front of it
    renames: dict[str, dict[int, str]] = {}
    placed: dict[str, str] = {}
    by_activation: dict[str, set[str]] = {}
    for layer in layers:
        by_activation.setdefault(layer.activation, set()).add(layer.node)
    for activation, scale in input_scales.items():
        inverse = (1.0 / scale).astype(np.float32)
        if _fold_into_layernorm(out, activation, by_activation[activation], inverse):
            placed[activation] = "layernorm"
            continue
        name = f"{activation}_awq_inv_scale"
        out.graph.initializer.append(numpy_helper.from_array(inverse, name))
        scaled = f"{activation}_awq_scaled"
        mul = helper.make_node("Mul", [activation, name], [scaled], name=f"{activation}_awq_mul")
        first = next(n.name for n in _named(out) if n.name in by_activation[activation])
        before.setdefault(first, []).append(mul)
        for node_name in by_activation[activation]:
            renames.setdefault(node_name, {})[0] = scaled
        placed[activation] = "mul"
    for layer in layers:
        quant = quants[layer.node]
        codes, scales = (quant.codes.T, quant.scales.T) if layer.transposed else (quant.codes, quant.scales)
        original = inits[layer.weight]
        q_name, s_name, dq_name = f"{layer.weight}_int4", f"{layer.weight}_scale", f"{layer.weight}_dq"
        out.graph.initializer.remove(original)
        out.graph.initializer.append(int4_tensor(q_name, codes))
        out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scales), s_name))
        dq = helper.make_node(
            "DequantizeLinear",
            [q_name, s_name],
            [dq_name],
            name=f"{layer.node}_weight_dq",
            axis=layer.axis,
            block_size=quant.block,
        )
        before.setdefault(layer.node, []).append(dq)
        renames.setdefault(layer.node, {})[1] = dq_name
    nodes = []
    for node in _named(out):
        nodes.extend(before.get(node.name, []))
        for index, name in renames.get(node.name, {}).items():
            node.input[index] = name
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, placed


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _named(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes with the names find_layers gives them (unnamed nodes get op_type_index)."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    return list(model.graph.node)
