"""Q/DQ graphs for ONNX Runtime's CPU kernels: which weight format is right on the CPU they will run on.

TensorRT graphs always store symmetric int8 weights. A graph with uint8 activations is meant for ORT's
fused x86/ARM integer kernels, and on x86 CPUs without VNNI their u8 x s8 multiply-add saturates
(trtbuild/core/cpu.py). ORT documents two remedies, both exact on such CPUs: 7-bit weights ("reduce
range": ``int7``) or uint8 weights (its u8 x u8 kernels: ``uint8``). Measured on EfficientNet-Lite0 on an
AVX2 EPYC (bench/bench_ort_cpu_weights.py): int7 runs 1.42x FP32 and loses 3.4 dB SQNR to the lost weight
bit; uint8 is exact but 1.06x FP32. ``auto`` takes int7, the speed the graph exists for;
``--ort-weights uint8`` trades it for the last bit. Depthwise convs keep int8 there: ORT's x86
depthwise kernels widen every product before adding, so nothing saturates and the bit is free
(calibrators/ort_depthwise.py). docs/ort-cpu-int8.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import onnx
from onnx import numpy_helper

from calibrators.ort_depthwise import META_DEPTHWISE_FORMAT, depthwise_weights
from calibrators.weights import WEIGHT_FORMATS
from trtbuild.core import cpu as cpu_info
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

WEIGHT_CHOICES = ("auto", *WEIGHT_FORMATS)


class WeightFormats(TypedDict):
    """QdqOptions' weight format fields (``QdqOptions(activation_type="uint8", **target.formats())``)."""

    weight_format: str
    depthwise_weight_format: str | None


@dataclass(frozen=True)
class OrtCpuTarget:
    """The CPU an ORT-CPU graph is built for and the weight format chosen for it."""

    cpu: cpu_info.CpuInt8
    weight_format: str
    reason: str
    # Depthwise convs' weights (group == channels): int8 where the other layers need int7 (see above).
    depthwise_format: str | None = None  # None: weight_format

    @property
    def depthwise(self) -> str:
        return self.depthwise_format or self.weight_format

    def formats(self) -> WeightFormats:
        """QdqOptions' weight format fields for this target."""
        return {"weight_format": self.weight_format, "depthwise_weight_format": self.depthwise}

    def metadata(self) -> dict[str, str]:
        return {
            ort_core.META_TARGET: ort_core.ORT_CPU,
            ort_core.META_WEIGHT_FORMAT: self.weight_format,
            META_DEPTHWISE_FORMAT: self.depthwise,
            ort_core.META_CPU_KIND: self.cpu.kind,
        }

    def to_json(self) -> dict[str, object]:
        return {
            "cpu": self.cpu.to_json(),
            "weight_format": self.weight_format,
            "depthwise_weight_format": self.depthwise,
            "reason": self.reason,
        }


def choose(cpu_kind: str = "auto", weights: str = "auto") -> OrtCpuTarget:
    """The weight format for uint8-activation graphs on ``cpu_kind`` (``auto``: this machine)."""
    cpu = cpu_info.named(cpu_kind)
    if weights not in WEIGHT_CHOICES:
        raise TrtbuildError(
            f"unknown ORT weight format '{weights}'", f"use one of {', '.join(WEIGHT_CHOICES)}"
        )
    if weights == "auto":
        if cpu.u8s8_saturates:
            return OrtCpuTarget(
                cpu,
                "int7",
                "7-bit weights: u8 x s7 pairs cannot saturate int16 on this CPU; depthwise convs int8 "
                "(ORT's depthwise kernels widen each product to 32 bits)",
                depthwise_format="int8",
            )
        return OrtCpuTarget(cpu, "int8", "int8 weights: this CPU's u8 x s8 kernels accumulate in int32")
    if weights == "int8" and cpu.u8s8_saturates:
        raise TrtbuildError(
            f"int8 weights with uint8 activations saturate in ORT's kernels on {cpu.kind} CPUs "
            "(u8 x s8 pairs are summed into int16)",
            "use --ort-weights auto, int7 or uint8, or --ort-cpu for the CPU the graph will run on",
        )
    return OrtCpuTarget(cpu, weights, f"{weights} weights as asked")


def tensorrt_metadata() -> dict[str, str]:
    """Metadata of a TensorRT-target Q/DQ graph (int8 activations and weights, reference semantics)."""
    return {ort_core.META_TARGET: "tensorrt", ort_core.META_WEIGHT_FORMAT: "int8"}


def largest_weight_code(model: onnx.ModelProto, skip_depthwise: bool = True) -> int:
    """The largest |q - zero point| over the int8 weights that DequantizeLinear nodes read from
    initializers (0 when there are none): above 63, u8 x s8 pairs can overflow int16. Depthwise conv
    weights are skipped unless asked: ORT's depthwise kernels cannot saturate."""
    inits = {i.name: i for i in model.graph.initializer}
    skip = depthwise_weights(model) if skip_depthwise else set()
    largest = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[0] in skip:
            continue
        tensor = inits[node.input[0]]
        if tensor.data_type != onnx.TensorProto.INT8:
            continue
        values = numpy_helper.to_array(tensor).astype(np.int32)
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero is not None:
            z = numpy_helper.to_array(zero).astype(np.int32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if z.ndim == 1 and values.ndim > 1:
                shape = [1] * values.ndim
                shape[axis] = -1
                z = z.reshape(shape)
            values = values - z
        largest = max(largest, int(np.abs(values).max(initial=0)))
    return largest


def saturation_warning(model: onnx.ModelProto, cpu: cpu_info.CpuInt8 | None = None) -> str | None:
    """A warning when ORT's fused kernels will saturate on ``cpu`` for this uint8-activation graph."""
    cpu = cpu or cpu_info.detect()
    if not cpu.u8s8_saturates or ort_core.semantics_for(model) != ort_core.ORT_CPU:
        return None
    largest = largest_weight_code(model)
    if largest <= 63:
        return None
    return (
        f"{model.graph.name or 'the graph'} has int8 weights up to ±{largest} with uint8 activations: ORT's "
        f"u8 x s8 kernels saturate on {cpu.describe()}, so its outputs are not the model's; rebuild it "
        "with trtbuild quantize --activation-type uint8 (7-bit or uint8 weights for this CPU)"
    )
