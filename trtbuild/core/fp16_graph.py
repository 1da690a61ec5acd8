"""FP16 conversion of an ONNX graph in memory: the FP16 graph a strongly typed TensorRT build runs for every
layer it does not run in INT8/FP8. One implementation for ``export.fp16`` (which writes and verifies the
file) and ``calibrators.near_ties`` (which measures the FP16 graph's noise on the held-out samples).

The conversion itself is onnxconverter-common's maintained float16 converter; this module picks what stays
FP32 and repairs two of the converter's outputs ONNX Runtime would otherwise refuse or overflow.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import numpy_helper
from onnxconverter_common import float16

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.onnx_file import dedupe_value_info

# Kept in FP32 on top of the converter's defaults (which already block index/coordinate ops such as
# Resize, Range, TopK, NonMaxSuppression, RoiAlign, CumSum: FP16 represents integers exactly only up to
# 2048, so sizes, indices and box coordinates would be rounded):
# - sums and products over many elements overflow FP16's 65504 maximum (ReduceSum/SumSquare/L2/Prod,
#   LogSumExp), and Pow is mostly x**2 in variance computations, which overflows for |x| > 256.
FP16_BLOCK_LIST: tuple[str, ...] = (
    *float16.DEFAULT_OP_BLOCK_LIST,
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceProd",
    "ReduceLogSumExp",
    "Pow",
)


def to_fp16(
    model: onnx.ModelProto,
    op_block_list: tuple[str, ...] = FP16_BLOCK_LIST,
    node_block_list: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """An FP16 copy of ``model`` (I/O stay FP32 so callers feed the same tensors). A Q/DQ graph keeps its
    integer tensors and gets FP16 everywhere else, scales included: Q/DQ on FP16 tensors needs opset 19, so
    older graphs are converted first."""
    model = _opset_for_fp16_qdq(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the caller's graph stays as given
    model = copy
    dedupe_value_info(model.graph)  # the converter retypes one entry per tensor, not its repeats
    fold_batchnorm(model.graph)
    with warnings.catch_warnings():  # one warning per tiny weight clamped to FP16's range: noise
        warnings.simplefilter("ignore", UserWarning)
        converted: onnx.ModelProto = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(op_block_list),
            node_block_list=list(node_block_list),
        )
    _restore_float_outputs(model, converted)
    _cast_to_declared_fp16(converted)
    return converted


def _cast_to_declared_fp16(model: onnx.ModelProto) -> None:
    """The converter declares a converted Cast(to=FLOAT)'s output FP16 but leaves ``to`` at FLOAT (e.g.
    BERT's attention-mask Cast), which ONNX Runtime refuses to load: make ``to`` what is declared."""
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    outputs = {o.name for o in model.graph.output}  # FP32 by _restore_float_outputs: their Casts stay FLOAT
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        if declared.get(node.output[0]) != onnx.TensorProto.FLOAT16:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16


QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float16 inputs and scales from opset 19


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _opset_for_fp16_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QDQ_FP16_OPSET)
    if not has_qdq(model) or opset >= QDQ_FP16_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, QDQ_FP16_OPSET)
    except Exception as exc:  # the converter raises its own and onnx's error types
        raise TrtbuildError(
            f"the Q/DQ graph (opset {opset}) could not be converted to opset {QDQ_FP16_OPSET} for FP16 "
            f"Q/DQ ({str(exc).splitlines()[0][:200]})",
            "quantize an opset 19+ export, or build weakly typed (TensorRT 8.x/10.x with flags)",
        ) from exc


def _restore_float_outputs(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Work around an onnxconverter-common 1.16 bug: when a blocked (FP32) node produces a graph output,
    keep_io_types is ignored and the output is cast to FP16, so a sum kept in FP32 to avoid overflow
    still overflows at the very end. Make such outputs FP32 again."""
    float_outputs = {
        o.name for o in original.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    producers = {name: node for node in converted.graph.node for name in node.output}
    for output in converted.graph.output:
        tensor_type = output.type.tensor_type
        if output.name not in float_outputs or tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(output.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:  # its input is the blocked node's FP32 result: cast to FP32 instead
                if attr.name == "to":
                    attr.i = onnx.TensorProto.FLOAT
        else:
            fp16_name = output.name + "_fp16"
            for n in converted.graph.node:
                n.output[:] = [fp16_name if o == output.name else o for o in n.output]
            converted.graph.node.append(
                onnx.helper.make_node(
                    "Cast",
                    [fp16_name],
                    [output.name],
                    to=onnx.TensorProto.FLOAT,
                    name=output.name + "_to_fp32",
                )
            )
        tensor_type.elem_type = onnx.TensorProto.FLOAT


def fold_batchnorm(graph: onnx.GraphProto) -> int:
    """Fold each inference BatchNormalization into the Conv before it, in FP32, as TensorRT's parser and
    builder do (the scale and shift become the conv's weights and bias before anything is FP16). Left in
    the graph, the FP16 converter runs BN as (x - mean) / sqrt(var + eps) in half precision, which TensorRT
    never does: the PP-LCNet orientation classifier's emulated FP16 graph was ~4x noisier than the folded
    one (max probability error 0.019 vs 0.005), inflating the near-tie floor. A Conv with constant weights,
    or with integer weights behind a DequantizeLinear (a Q/DQ graph's quantized conv: the BN scale goes into
    the per-channel weight scales, the integers stay), whose output feeds the BN alone is folded.
    Returns how many were folded."""
    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for bn in graph.node:
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or len(bn.output) != 1 or conv.output[0] in outputs:
            continue
        params = [init.get(name) for name in bn.input[1:5]]
        weights = [init.get(name) for name in [*conv.input[1:3], ""][:2]]  # [W, b or None]
        if readers.get(conv.output[0]) != 1 or None in params:
            continue
        if len(conv.input) > 2 and weights[1] is None:
            continue
        values = [numpy_helper.to_array(t) for t in params if t is not None]
        dq = producer.get(conv.input[1])
        old = [*conv.input[1:], *bn.input[1:5], *(dq.input if dq is not None else [])]
        if weights[0] is not None:
            _fold_one(graph, conv, bn, values, weights)
        elif not _fold_into_dq_weight(graph, conv, bn, values, weights[1], init, producer, readers):
            continue
        replaced.update(old)  # the names before the fold (it renames what it replaces)
        drop.append(bn)
    for bn in drop:
        graph.node.remove(bn)
    if drop:  # the replaced weights and BN parameters, unless something else still reads them
        read = _names_read(graph)
        read |= {i.name for i in graph.input}  # an initializer listed as an input stays one
        kept = [t for t in graph.initializer if t.name not in replaced or t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return len(drop)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its If/Loop/Scan bodies reads, and the graph outputs."""
    read = {o.name for o in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                read |= _names_read(body)
    return read


def _bn_scale(bn: onnx.NodeProto, params: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The BN as y = x * scale + shift per channel (float64)."""
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _fold_into_dq_weight(
    graph: onnx.GraphProto,
    conv: onnx.NodeProto,
    bn: onnx.NodeProto,
    params: list[np.ndarray],
    bias: onnx.TensorProto | None,
    init: dict[str, onnx.TensorProto],
    producer: dict[str, onnx.NodeProto],
    readers: dict[str, int],
) -> bool:
    """Fold into a conv whose weight is DequantizeLinear(constant integers, scale, zero point 0) read by it
    alone: scale' = scale * |s| per output channel (axis 0), the integers negated where s < 0 (exact for a
    symmetric grid; a channel holding -128 is left unfolded), bias' = (b - mean) * s + beta in FP32. False
    when the graph is not that shape."""
    dq = producer.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or readers.get(dq.output[0]) != 1:
        return False
    q, scale_t = init.get(dq.input[0]), init.get(dq.input[1])
    zp = init.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if q is None or scale_t is None or (zp is not None and numpy_helper.to_array(zp).any()):
        return False
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    ints, scales = numpy_helper.to_array(q), numpy_helper.to_array(scale_t).astype(np.float64)
    s, shift = _bn_scale(bn, params)
    per_channel = scales.size > 1
    if (
        ints.ndim < 2
        or ints.shape[0] != s.size
        or (per_channel and (axis % ints.ndim, scales.size) != (0, s.size))
    ):
        return False
    negative = s < 0
    flat = ints.reshape(len(s), -1)
    if ints.dtype.kind != "i" or (flat[negative] == np.iinfo(ints.dtype).min).any():
        return False
    new_ints = np.where(negative.reshape(-1, *([1] * (ints.ndim - 1))), -ints, ints).astype(ints.dtype)
    new_scales = (np.broadcast_to(scales.reshape(-1), s.shape) * np.abs(s)).astype(np.float32)
    b = numpy_helper.to_array(bias).astype(np.float64) if bias is not None else np.zeros(len(s))
    new_b = (b * s + shift).astype(np.float32)
    base = conv.name or conv.output[0]
    names = (f"{base}_bn_folded_Wq", f"{base}_bn_folded_Wscale", f"{base}_bn_folded_B")
    graph.initializer.extend(
        [
            numpy_helper.from_array(new_ints, names[0]),
            numpy_helper.from_array(new_scales, names[1]),
            numpy_helper.from_array(new_b, names[2]),
        ]
    )
    zero = [] if zp is None else [_zero_point(graph, zp, len(s), f"{base}_bn_folded_Wzp")]
    dq.input[:] = [names[0], names[1], *zero]
    del dq.attribute[:]
    dq.attribute.append(onnx.helper.make_attribute("axis", 0))
    conv.input[2:] = [names[2]]
    conv.output[0] = bn.output[0]
    return True


def _zero_point(graph: onnx.GraphProto, zp: onnx.TensorProto, channels: int, name: str) -> str:
    """A per-channel zero point of ``zp``'s type (all 0) under ``name``."""
    graph.initializer.append(
        numpy_helper.from_array(np.zeros(channels, numpy_helper.to_array(zp).dtype), name)
    )
    return name


def _fold_one(
    graph: onnx.GraphProto,
    conv: onnx.NodeProto,
    bn: onnx.NodeProto,
    params: list[np.ndarray],
    weights: list[onnx.TensorProto | None],
) -> None:
    """Conv(W, b) -> BN(gamma, beta, mean, var) becomes Conv(W * s, (b - mean) * s + beta), s computed in
    float64 and stored FP32 under new names (the originals may be shared)."""
    scale, shift = _bn_scale(bn, params)
    w_proto = weights[0]
    assert w_proto is not None
    w = numpy_helper.to_array(w_proto).astype(np.float64)
    b = (
        numpy_helper.to_array(weights[1]).astype(np.float64)
        if weights[1] is not None
        else np.zeros(len(scale))
    )
    new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
    new_b = (b * scale + shift).astype(np.float32)
    names = (f"{conv.name or conv.output[0]}_bn_folded_W", f"{conv.name or conv.output[0]}_bn_folded_B")
    graph.initializer.extend(
        [numpy_helper.from_array(new_w, names[0]), numpy_helper.from_array(new_b, names[1])]
    )
    conv.input[1:] = list(names)
    conv.output[0] = bn.output[0]
