"""The Q/DQ plan as data: options in, a plan out, printable and diffable before any graph is rewritten."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from calibrators import qdq_rules as rules
from calibrators import weights as wq
from trtbuild.core.errors import TrtbuildError

ACTIVATION_TYPES = ("int8", "uint8")  # integer Q/DQ: TensorRT INT8, ORT CPU uint8
QDQ_TYPES = (*ACTIVATION_TYPES, wq.FP8)  # plus float8e4m3fn (TensorRT FP8 on sm89+, docs/fp8.md)


@dataclass(frozen=True)
class QdqOptions:
    """What to quantize and how. Patterns are regexes matched in full against node names."""

    # int8: symmetric, zero point 0 (TensorRT); uint8: asymmetric (ORT CPU); fp8: E4M3, scale amax/448
    # (TensorRT FP8; weights then fp8 too, placement per docs/fp8.md)
    activation_type: str = "int8"
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    # Layers the tool itself keeps float (auto-fallback, the ORT-CPU variant copying the TensorRT graph's
    # exclusions): exact node names with their reasons, never mixed into the user's regexes.
    keep_float: tuple[tuple[str, str], ...] = ()
    attention_max_seq: int = rules.ATTENTION_MAX_SEQ
    tiny_conv_min_channels: int = rules.TINY_CONV_MIN_CHANNELS
    tiny_conv_min_fan_in: int = rules.TINY_CONV_MIN_FAN_IN
    huge_range: float = rules.HUGE_RANGE
    # Subtract E[(W_q - W) x] from each quantized layer's float bias (needs the channel means that
    # compute_ranges stores with the ranges; a no-op without them). See calibrators/bias_correction.py.
    bias_correction: bool = True
    # How weights are stored: int8 (TensorRT, VNNI CPUs), or int7/uint8 for ORT's x86 kernels on CPUs
    # whose u8 x s8 multiply-add saturates (calibrators/weights.py, trtbuild/core/cpu.py).
    weight_format: str = "int8"
    # Depthwise convs' weights in ORT-CPU graphs (None: weight_format): int8 where ORT's depthwise kernels
    # cannot saturate but its other kernels can (calibrators/ort_depthwise.py).
    depthwise_weight_format: str | None = None
    # Learned rounding (calibrators/adaround.py): int8 (or float8 E4M3) weights by name on the per-channel
    # grid plan_qdq computes; used instead of round-to-nearest for int8/fp8 weights, and without bias
    # correction (the learning targets the float output already). Data, not part of equality.
    learned_rounding: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.activation_type not in QDQ_TYPES:
            raise TrtbuildError(
                f"unknown activation type '{self.activation_type}'",
                f"use one of {', '.join(QDQ_TYPES)}",
            )
        if self.activation_type == wq.FP8 and self.weight_format in ("int8", wq.FP8):
            object.__setattr__(self, "weight_format", wq.FP8)  # FP8 layers take FP8 weights (frozen class)
        elif self.activation_type == wq.FP8 or self.weight_format == wq.FP8:
            raise TrtbuildError(
                f"weight format '{self.weight_format}' with {self.activation_type} activations: "
                "TensorRT's FP8 layers take FP8 weights and FP8 activations together",
                "use activation_type='fp8' (weights follow)",
            )
        if self.weight_format not in (*wq.WEIGHT_FORMATS, wq.FP8):
            raise TrtbuildError(
                f"unknown weight format '{self.weight_format}'", f"use one of {', '.join(wq.WEIGHT_FORMATS)}"
            )
        if self.weight_format != "int8" and self.activation_type == "int8":
            raise TrtbuildError(
                f"weight format '{self.weight_format}' is for ONNX Runtime CPU graphs (uint8 activations); "
                "TensorRT takes symmetric int8 weights only",
                "use weight_format='int8' with int8 activations",
            )
        if self.depthwise_weight_format is not None and (
            self.activation_type != "uint8" or self.depthwise_weight_format not in wq.WEIGHT_FORMATS
        ):
            raise TrtbuildError(
                f"depthwise weight format '{self.depthwise_weight_format}' with {self.activation_type} "
                "activations: it is for ONNX Runtime CPU graphs",
                f"use one of {', '.join(wq.WEIGHT_FORMATS)} with activation_type='uint8'",
            )
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise TrtbuildError(
                    f"--exclude '{pattern}' is not a valid regex ({exc})", "fix the pattern"
                ) from exc


@dataclass(frozen=True)
class Exclusion:
    """A node kept in float, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class ActivationQdq:
    """One Q/DQ pair on an activation tensor, read by the listed (node, input index) consumers."""

    tensor: str
    consumers: tuple[tuple[str, int], ...]
    group: str  # tensors with the same group share one scale (Concat/pooling); else the tensor's own name
    scale: float
    zero_point: int
    dtype: str  # "int8", "uint8" or "fp8" (float8e4m3fn, zero point 0)


@dataclass(frozen=True)
class WeightQdq:
    """A per-channel symmetric INT8 weight (DequantizeLinear only; the initializer is stored as int8)."""

    tensor: str
    consumers: tuple[tuple[str, int], ...]
    axis: int
    scales: tuple[float, ...]
    bias: str | None = None  # a bias quantized to int32 (uint8 activations only, for ORT's fused kernels)
    corrected_bias: str | None = None  # the consumer's bias that gets ``bias_shift`` subtracted
    bias_shift: tuple[float, ...] | None = None  # E[(W_q - W) x] per output channel on the calibration data
    weight_format: str = "int8"  # storage: int8 (±127), int7 (±63 in int8), uint8 (zero point 128), fp8


@dataclass
class QdqPlan:
    """Everything apply_qdq will do, as data: print it, save it, diff it before anything heavy runs."""

    activation_type: str
    activations: dict[str, ActivationQdq] = field(default_factory=dict)
    weights: dict[str, WeightQdq] = field(default_factory=dict)
    excluded: list[Exclusion] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    node_types: dict[str, str] = field(default_factory=dict)  # quantized node -> op type, for reports
    # Integer weights apply_qdq stores instead of round-to-nearest (learned rounding), by weight name.
    rounded_weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # Mixed INT8/FP8 plans (calibrators/qdq_mixed.py): the layers whose Q/DQ is FP8. Their entries in
    # ``activations``/``weights`` carry dtype fp8, keyed "<tensor>@fp8" where the tensor also has INT8 Q/DQ.
    fp8_nodes: list[str] = field(default_factory=list)

    @property
    def groups(self) -> dict[str, list[str]]:
        """Shared-scale groups with more than one tensor: group id -> member tensors."""
        out: dict[str, list[str]] = {}
        for act in self.activations.values():
            out.setdefault(act.group, []).append(act.tensor)
        return {g: members for g, members in out.items() if len(members) > 1}

    def excluded_nodes(self) -> dict[str, str]:
        return {e.node: e.reason for e in self.excluded}

    def to_json(self) -> dict[str, Any]:
        return {
            "activation_type": self.activation_type,
            "activations": {k: asdict(v) for k, v in self.activations.items()},
            "weights": {k: {**asdict(v), "scales": list(v.scales)} for k, v in self.weights.items()},
            "groups": self.groups,
            "excluded": [asdict(e) for e in self.excluded],
            "quantized_nodes": list(self.quantized_nodes),
            "learned_rounding": sorted(self.rounded_weights),
            "fp8_nodes": list(self.fp8_nodes),
        }
