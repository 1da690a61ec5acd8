"""Depthwise convs in the ORT-CPU graph: which weights ORT runs in its depthwise kernels, and their format.

On x86 CPUs without VNNI, ORT's u8 x s8 GEMM and pointwise/regular conv kernels add pairs of products into a
saturating int16 (VPMADDUBSW), so the ORT-CPU graph stores 7-bit weights there (calibrators/ort_cpu.py). Its
*depthwise* kernels do not: a QLinearConv with one input and one output channel per group (weight
[C, 1, kh, kw], group C) runs MLAS's depthwise kernels, which widen every product before adding --
ConvSymDepthwiseKernelAvx2 (zero weight zero point, C a multiple of 16) zero/sign-extends both operands to
32-bit lanes and multiplies with VPMADDWD, the AVX-512 one holds one product per int16 lane, and the
asymmetric MlasConvDepthwiseKernelAvx2 multiplies 16-bit values into 32 (onnxruntime/core/mlas/lib,
x86_64/ConvSymKernelAvx2.S, ConvSymKernelAvx512Core.S, intrinsics/avx2/qdwconv_avx2.cpp). Full int8
weights are therefore exact there, and cost nothing: the kernel is the same. Measured on EfficientNet-Lite0
(bench/bench_ort_cpu_weights.py, docs/ort-cpu-int8.md). A grouped conv with more than one channel per group
runs the GEMM path and keeps the graph's weight format.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

# Metadata key recording the depthwise convs' weight format (next to trtbuild.weight_format).
META_DEPTHWISE_FORMAT = "trtbuild.depthwise_weight_format"


def is_depthwise(node: onnx.NodeProto, weight_shape: Iterable[int] | None) -> bool:
    """A Conv ORT runs in its depthwise kernels: one input and one output channel per group."""
    if node.op_type != "Conv" or weight_shape is None:
        return False
    shape = list(weight_shape)
    group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
    return len(shape) >= 3 and group > 1 and shape[0] == group and shape[1] == 1


def depthwise_weights(model: onnx.ModelProto) -> set[str]:
    """Names of the weights (float initializers, or the integer initializers their DequantizeLinear reads)
    that only depthwise convs use."""
    graph = model.graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    dq_source = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in shapes
    }
    uses: dict[str, list[bool]] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in dq_source:
            continue  # the weight's own DequantizeLinear: its readers decide
        for i, name in enumerate(node.input):
            source = dq_source.get(name, name)
            if source in shapes:
                uses.setdefault(source, []).append(i == 1 and is_depthwise(node, shapes[source]))
    return {name for name, flags in uses.items() if all(flags)}
