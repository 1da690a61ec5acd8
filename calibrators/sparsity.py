"""TensorRT 2:4 structured sparsity: which weights can take it, and which already have it.

TensorRT's sparse Tensor Core kernels (sm80+, builder flag SPARSE_WEIGHTS / trtexec --sparsity=enable) need,
for every output channel and every kernel position, at least two zeros in each group of four consecutive
*input* channels -- the reduction axis: axis 1 of a Conv weight [K, C, R, S] and of a Gemm weight stored
[N, K] (transB=1), axis 0 of a MatMul weight [K, N]. See docs/qat-sparsity.md for the source and the
channel rules. Grouped/depthwise convs (a reduction of C/groups channels per output) and layers with fewer
than MIN_CHANNELS input channels are skipped: their GEMMs are too small for sparse kernels to pay off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

GROUP = 4  # every 4 consecutive input channels ...
KEEP = 2  # ... keep at most 2 non-zero weights
MIN_CHANNELS = 16  # fewer input channels: TensorRT picks dense kernels anyway
PATTERN = "2:4"


def ineligible_reason(kind: str, in_channels: int, groups: int = 1) -> str | None:
    """Why a layer cannot use 2:4 sparse kernels (None: it can). ``in_channels`` is the reduction size."""
    if kind not in ("Conv", "Gemm", "MatMul"):
        return f"{kind} has no 2:4 sparse kernels in TensorRT"
    if groups != 1:
        return f"grouped/depthwise conv (groups={groups}): no dense reduction over channels"
    if in_channels % GROUP:
        return f"{in_channels} input channels is not a multiple of {GROUP}"
    if in_channels < MIN_CHANNELS:
        return f"only {in_channels} input channels (< {MIN_CHANNELS}): too small to gain from sparse kernels"
    return None


def is_2to4(weight: np.ndarray, axis: int) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive entries along ``axis``."""
    w = np.moveaxis(np.asarray(weight), axis, -1)
    if w.shape[-1] % GROUP:
        return False
    groups = (w.reshape(-1, GROUP) != 0).sum(axis=1)
    return bool(np.all(groups <= KEEP))


@dataclass(frozen=True)
class SparseLayer:
    node: str
    op_type: str
    weight: str
    params: int
    eligible: bool
    sparse: bool  # already in the 2:4 pattern
    reason: str = ""


@dataclass
class SparsityReport:
    """Per weighted layer of an ONNX graph: eligible for 2:4, already 2:4, or why not."""

    layers: list[SparseLayer] = field(default_factory=list)

    @property
    def eligible(self) -> list[SparseLayer]:
        return [layer for layer in self.layers if layer.eligible]

    @property
    def sparse(self) -> list[SparseLayer]:
        return [layer for layer in self.layers if layer.eligible and layer.sparse]

    @property
    def is_sparse_model(self) -> bool:
        """Most eligible weights already follow 2:4: TensorRT's sparse kernels should be turned on."""
        total = sum(layer.params for layer in self.eligible)
        done = sum(layer.params for layer in self.sparse)
        return total > 0 and done >= 0.5 * total

    def to_json(self) -> dict[str, Any]:
        return {
            "pattern": PATTERN,
            "weighted_layers": len(self.layers),
            "eligible_layers": len(self.eligible),
            "sparse_layers": len(self.sparse),
            "eligible_weights": sum(layer.params for layer in self.eligible),
            "sparse_weights": sum(layer.params for layer in self.sparse),
            "total_weights": sum(layer.params for layer in self.layers),
            "skipped": [{"node": x.node, "reason": x.reason} for x in self.layers if not x.eligible],
        }


def _dequantized_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by name, with a DequantizeLinear of an initializer standing for its stored values
    (zeros stay zeros through Q/DQ, so a Q/DQ graph is checked on its int8 weights)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def analyze(model: onnx.ModelProto) -> SparsityReport:
    """Every Conv/Gemm/MatMul with a constant weight: its reduction axis, eligibility and 2:4 state."""
    consts = _dequantized_constants(model)
    report = SparsityReport()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = consts.get(node.input[1])
        if weight is None or weight.ndim < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            axis, groups = 1, int(attrs.get("group", 1))
        elif node.op_type == "Gemm":
            axis, groups = (1 if attrs.get("transB", 0) else 0), 1
        else:
            axis, groups = weight.ndim - 2, 1
        reason = ineligible_reason(node.op_type, int(weight.shape[axis]), groups)
        report.layers.append(
            SparseLayer(
                node=node.name or f"{node.op_type}_{index}",
                op_type=node.op_type,
                weight=node.input[1],
                params=int(weight.size),
                eligible=reason is None,
                sparse=reason is None and is_2to4(weight, axis),
                reason=reason or "",
            )
        )
    return report
