"""Extra Q/DQ for the ORT-CPU (uint8) graph: the outputs ONNX Runtime needs to fuse integer kernels.

TensorRT fuses DQ -> Conv -> epilogue by itself, so its placement never quantizes a conv's output. ONNX
Runtime's CPU QDQ transformer only forms a QLinearConv from a complete DQ -> Conv -> Q unit (there is no
integer conv with a float output, unlike MatMul's MatMulIntegerToFloat and Gemm's QGemm), and likewise a
QLinearGlobalAveragePool / QLinearAdd needs a Q on its output. Without those Qs the conv runs in float
next to DQ nodes that only add work. Rules here (docs/ort-cpu-int8.md):

* a quantized Conv's output, taken after a Relu/Clip that ORT folds into the Q's range, gets Q/DQ unless it
  is a graph output or feeds a layer kept in float (the int8 conv plus one DQ is cheaper than a float conv);
* a depthwise conv whose output would need a Q of its own stays float instead: per-tensor quantization of
  channels that no conv has mixed yet lost 1.2 dB on PP-OCRv4's detector (its first depthwise conv alone
  took cosine from 0.94 to 0.88), and ORT's float conv beside Q/DQ nodes is slower than its FP32 one;
* a depthwise conv fed by a conv that stays float (the 3-channel stem) stays float too: ORT keeps the two
  in its NCHWc float layout and the input's Q moves one layer down, to a tensor no larger; on an AVX2
  CPU without VNNI ORT's int8 depthwise kernel is slower than its float one on such early, large maps
  (EfficientNet-Lite0's first: 0.80x), and one fewer quantized tensor is more accurate;
* a pooling node whose input is quantized gets Q/DQ on its output unless that is a graph output;
* a residual Add is quantized (both inputs, for QLinearAdd) only when its output will be quantized too.

TensorRT's placement (int8) is untouched: ``select_qdq`` calls this for uint8 only.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from calibrators import qdq_rules as rules
from calibrators.graph_index import GraphIndex

KEEP_FLOAT = rules.Role.KEEP_FLOAT
# Activations ORT's Q fusion absorbs (ReluQuantFusion / ClipQuantFusion): the Q sits after them.
FOLDED_ACTIVATIONS = frozenset({"Relu", "Clip"})
DEPTHWISE_REASON = (
    "depthwise conv feeding float ops (ORT-CPU graph): ORT would need a per-tensor Q on its unmixed channels"
)
AFTER_FLOAT_REASON = (
    "depthwise conv fed by a float conv (ORT-CPU graph): both stay in ORT's float layout, the Q moves down"
)
# Ops that ORT only runs as integer kernels between a DQ and a Q.
OUTPUT_Q_OPS = frozenset({"Conv"})
POOL_OPS = frozenset({"GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool"})
# Pools whose output range differs from the input's: they keep their own scale (ORT requantizes in-kernel).
OWN_SCALE_POOLS = frozenset({"GlobalAveragePool", "AveragePool"})


def _after_folded_activations(g: GraphIndex, tensor: str) -> str:
    """``tensor``, or the output of the Relu/Clip chain it alone feeds (ORT folds those into the Q)."""
    for _ in range(4):
        consumers = g.consumers.get(tensor, [])
        if len(consumers) != 1 or tensor in g.graph_outputs:
            return tensor
        node, idx = consumers[0]
        if node.op_type not in FOLDED_ACTIVATIONS or idx != 0:
            return tensor
        if node.op_type == "Clip" and not all(not t or g.is_constant(t) for t in node.input[1:]):
            return tensor  # a run-time clip range cannot be folded
        tensor = node.output[0]
    return tensor


def _can_quantize_output(g: GraphIndex, tensor: str, excluded: Mapping[str, object], mask: set[str]) -> bool:
    if tensor in g.graph_outputs or tensor in mask or not g.is_float_activation(tensor):
        return False
    consumers = g.consumers.get(tensor, [])
    kept_float = [n for n, _ in consumers if n.name in excluded or rules.ROLES.get(n.op_type) is KEEP_FLOAT]
    return bool(consumers) and not kept_float


def _is_depthwise(g: GraphIndex, node: onnx.NodeProto) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return (
        group > 1
        and len(node.input) > 1
        and g.is_constant(node.input[1])
        and g.constant(node.input[1]).shape[1] == 1
    )


def _fed_by_float_conv(g: GraphIndex, node: onnx.NodeProto, quantized: set[str]) -> bool:
    """``node``'s input comes from a Conv left float, directly or through Relu/Clip/Pad (ORT fuses those
    into its float conv)."""
    producer = g.producer.get(node.input[0]) if node.input else None
    for _ in range(4):
        if producer is None or producer.op_type not in (*FOLDED_ACTIVATIONS, "Pad"):
            break
        producer = g.producer.get(producer.input[0])
    return producer is not None and producer.op_type == "Conv" and producer.name not in quantized


def will_be_quantized(g: GraphIndex, tensor: str, acts: Mapping[str, object], depth: int = 0) -> bool:
    """``tensor`` has Q/DQ, or will get it from a Pad/pool/Concat whose output shares its scale."""
    if tensor in acts:
        return True
    return depth < 8 and any(
        rules.ROLES.get(node.op_type) is rules.Role.SHARED_SCALE
        and bool(node.output)
        and will_be_quantized(g, node.output[0], acts, depth + 1)
        for node, _ in g.consumers.get(tensor, [])
    )


def add_output_qdq(
    g: GraphIndex,
    acts: dict[str, list[tuple[str, int]]],
    weights: dict[str, tuple[list[tuple[str, int]], int, str | None]],
    quantized: list[str],
    excluded: Mapping[str, object],
    mask: set[str],
) -> dict[str, str]:
    """Add the Q/DQ (tensor -> all its consumers) that ORT's integer kernels need on op outputs. Returns the
    depthwise convs taken back to float (node -> reason); they are removed from ``quantized``/``acts``."""

    def add(tensor: str) -> None:
        readers = acts.setdefault(tensor, [])
        for node, idx in g.consumers.get(tensor, []):
            if (node.name, idx) not in readers:
                readers.append((node.name, idx))

    float_nodes: dict[str, str] = {
        name: AFTER_FLOAT_REASON
        for name in quantized
        if _is_depthwise(g, g.by_name[name]) and _fed_by_float_conv(g, g.by_name[name], set(quantized))
    }
    depthwise = []
    for name in quantized:
        node = g.by_name[name]
        if node.op_type not in OUTPUT_Q_OPS or not node.output or name in float_nodes:
            continue
        tensor = _after_folded_activations(g, node.output[0])
        if _is_depthwise(g, node):
            depthwise.append((node, tensor))
        elif _can_quantize_output(g, tensor, excluded, mask):
            add(tensor)
    for node, tensor in depthwise:
        if not will_be_quantized(g, tensor, acts) and tensor not in g.graph_outputs:
            float_nodes[node.name] = DEPTHWISE_REASON
        elif tensor not in acts and _can_quantize_output(g, tensor, excluded, mask):
            add(tensor)
    _unquantize(acts, weights, quantized, set(float_nodes))
    for node in g.nodes:
        if node.op_type not in POOL_OPS or node.name in excluded or not node.output:
            continue
        if node.input and node.input[0] in acts and _can_quantize_output(g, node.output[0], excluded, mask):
            add(node.output[0])
    return float_nodes


def _unquantize(
    acts: dict[str, list[tuple[str, int]]],
    weights: dict[str, tuple[list[tuple[str, int]], int, str | None]],
    quantized: list[str],
    nodes: set[str],
) -> None:
    """Take ``nodes`` back out of the placement (their input Q/DQ and weight DQ go with them)."""
    quantized[:] = [n for n in quantized if n not in nodes]
    for t in list(acts):
        acts[t] = [r for r in acts[t] if r[0] not in nodes]
        if not acts[t]:
            del acts[t]
    for w in list(weights):
        readers = weights[w][0]
        readers[:] = [r for r in readers if r[0] not in nodes]
        if not readers:
            del weights[w]
