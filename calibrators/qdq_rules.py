"""Op type -> Q/DQ placement rule: one table, so supporting a new op is one line (cf. ORT's registry).

Each rule says which inputs of a node of that type TensorRT wants as INT8 and how the weight is quantized.
Placement logic lives in :mod:`calibrators.qdq`; this module is only the table and the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(Enum):
    """How a node type takes part in Q/DQ placement."""

    WEIGHTED = "weighted"  # Conv/Gemm/MatMul: Q/DQ on the activation input(s), per-channel weight
    SHARED_SCALE = "shared_scale"  # Concat/pooling: inputs share the output's scale (no requantization)
    RESIDUAL_ADD = "residual_add"  # Add: quantize the skip input, leave the conv branch for epilogue fusion
    KEEP_FLOAT = "keep_float"  # Softmax/LayerNorm/GELU chains: never Q/DQ around them
    PASS_THROUGH = "pass_through"  # layout/movement ops: traced through when looking for producers


@dataclass(frozen=True)
class WeightedRule:
    """Which inputs are quantized activations, and where the weight's output-channel axis is."""

    activation_inputs: tuple[int, ...]
    weight_input: int | None  # index of the weight input (an initializer) or None if both are activations

    def weight_axis(self, attrs: dict[str, int], weight_rank: int, op_type: str) -> int:
        """Output-channel axis: 0 for Conv, 1 for ConvTranspose, last for MatMul, 0/1 for Gemm by transB."""
        if op_type == "Conv":
            return 0
        if op_type == "ConvTranspose":
            return 1
        if op_type == "Gemm":
            return 0 if attrs.get("transB", 0) else 1
        return weight_rank - 1  # MatMul: W is [..., K, N]; N is the output channel


# The op-type registry: role of each op type in placement.
WEIGHTED_OPS: dict[str, WeightedRule] = {
    "Conv": WeightedRule(activation_inputs=(0,), weight_input=1),
    "ConvTranspose": WeightedRule(activation_inputs=(0,), weight_input=1),
    "Gemm": WeightedRule(activation_inputs=(0,), weight_input=1),
    "MatMul": WeightedRule(activation_inputs=(0,), weight_input=1),
}


def weight_axis(op_type: str, attrs: dict[str, int], weight_rank: int) -> int | None:
    """Per-channel axis of a weighted op's weight (input 1), or None when the op has no per-channel weight.

    The one place this is decided: Q/DQ placement, the AIMET/QNN encodings and reports all ask here."""
    rule = WEIGHTED_OPS.get(op_type)
    if rule is None or rule.weight_input is None or (op_type == "MatMul" and weight_rank < 2):
        return None
    return rule.weight_axis(attrs, weight_rank, op_type)


ROLES: dict[str, Role] = {
    **{op: Role.WEIGHTED for op in WEIGHTED_OPS},
    "Concat": Role.SHARED_SCALE,
    "MaxPool": Role.SHARED_SCALE,
    "AveragePool": Role.SHARED_SCALE,
    "GlobalAveragePool": Role.SHARED_SCALE,
    "GlobalMaxPool": Role.SHARED_SCALE,
    "Pad": Role.SHARED_SCALE,  # exporters put explicit Pads before convs; the Q belongs before the Pad
    "Add": Role.RESIDUAL_ADD,
    "Softmax": Role.KEEP_FLOAT,
    "LogSoftmax": Role.KEEP_FLOAT,
    "LayerNormalization": Role.KEEP_FLOAT,
    "SimplifiedLayerNormalization": Role.KEEP_FLOAT,
    "Gelu": Role.KEEP_FLOAT,
    "FastGelu": Role.KEEP_FLOAT,
    "Erf": Role.KEEP_FLOAT,  # the core of an exported (decomposed) GELU
    "ReduceMean": Role.KEEP_FLOAT,  # the core of an exported (decomposed) LayerNorm
    "Sqrt": Role.KEEP_FLOAT,
    "Pow": Role.KEEP_FLOAT,
    "Reshape": Role.PASS_THROUGH,
    "Flatten": Role.PASS_THROUGH,
    "Transpose": Role.PASS_THROUGH,
    "Squeeze": Role.PASS_THROUGH,
    "Unsqueeze": Role.PASS_THROUGH,
    "Identity": Role.PASS_THROUGH,
    "Slice": Role.PASS_THROUGH,
    "Split": Role.PASS_THROUGH,
    "Gather": Role.PASS_THROUGH,
    "Cast": Role.PASS_THROUGH,
    "Expand": Role.PASS_THROUGH,
}

# Ops that turn logits into scores (0..1): a Concat joining their outputs with boxes is a detection head.
SCORE_OPS = frozenset({"Sigmoid", "Softmax", "HardSigmoid"})

# Ops through which an attention mask travels before it is added to the scores.
MASK_PATH_OPS = frozenset(
    {"Cast", "Sub", "Mul", "Add", "Where", "Unsqueeze", "Expand", "Reshape", "Not", "Neg"}
)

# Bias/normalisation ops that still belong to a conv's branch when looking for a residual's epilogue side.
EPILOGUE_OPS = frozenset({"Add", "BatchNormalization", "Mul"})

# Thresholds (see docs/qdq-placement.md); all overridable through QdqOptions.
MASK_CONSTANT_MAGNITUDE = 1e4  # |constant| >= this in a mask path (-10000, -1e9, float32 min)
HUGE_RANGE = 1e4  # an activation amax above this is a mask/overflow, never a useful INT8 range
TINY_CONV_MIN_CHANNELS = 4  # fewer output channels than this: a tiny conv, kept in float
TINY_CONV_MIN_FAN_IN = 8  # fewer multiply-adds per output than this (C_in/group * kernel area): tiny
ATTENTION_MAX_SEQ = 128  # activation x activation MatMuls on longer (or unknown) sequences stay float
BOX_SCORE_RANGE_RATIO = 50.0  # Concat inputs whose ranges differ by more than this: boxes joined with scores
# FP8 (docs/fp8.md): TensorRT runs FP8 in Conv and GEMM kernels only. ModelOpt 0.47's FP8 ONNX PTQ
# (modelopt/onnx/quantization/fp8.py, graph_utils.find_nodes_from_convs_to_exclude) quantizes Conv, Gemm,
# MatMul and residual Add, and keeps in FP16 the convs TensorRT has no fast FP8 kernel for: more than 32
# kernel taps, or 16 or fewer channels per group in or out (this includes every depthwise conv).
FP8_OPS = frozenset({"Conv", "Gemm", "MatMul", "Add"})
FP8_MIN_CHANNELS = 16  # a conv with <= this many input (per group) or output channels stays FP16
FP8_MAX_KERNEL_AREA = 32  # a conv with more kernel taps than this (7x7) stays FP16
