"""Whether a residual Add's skip input should get INT8 Q/DQ (TensorRT placement).

TensorRT fuses a residual Add into the epilogue of the Conv/GEMM that feeds its other input, and the
precision of the skip input decides the precision of the fused output: an INT8 skip makes the output INT8,
so the next layer's Q fuses too (ResNet, EfficientNet). When the Add's output goes only into a
normalization (a transformer's Add -> LayerNorm, fused or decomposed), the fused output stays float
whatever the skip is: a Q/DQ there buys no fusion and only adds rounding error -- and the skip is a
LayerNorm output whose outlier channels leave the other channels a few INT8 levels (MiniLM-L6: 1 - cosine
0.0089 -> 0.0038 without it, docs/smoothquant.md). Anything else keeps the Q/DQ.
"""

from __future__ import annotations

from calibrators import qdq_rules as rules
from calibrators.graph_index import GraphIndex


def _mean_of(g: GraphIndex, name: str, tensor: str) -> bool:
    node = g.producer.get(name)
    return node is not None and node.op_type == "ReduceMean" and node.input[0] == tensor


def output_stays_float(g: GraphIndex, tensor: str) -> bool:
    """``tensor`` (an Add's output) is read only by float-only ops (LayerNormalization, Softmax ...) or by a
    decomposed LayerNorm (ReduceMean, and Sub of that mean): then its skip input needs no Q/DQ."""
    readers = g.consumers.get(tensor, [])
    if not readers or tensor in g.graph_outputs:
        return False
    for node, _ in readers:
        if rules.ROLES.get(node.op_type) is rules.Role.KEEP_FLOAT:
            continue
        if node.op_type == "Sub" and any(_mean_of(g, i, tensor) for i in node.input):
            continue
        return False
    return True
