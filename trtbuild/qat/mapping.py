"""Map the Q/DQ placement computed on the exported ONNX back to the PyTorch modules it came from.

One source of truth: calibrators/qdq.py decides, on the exported graph, which activation tensors get Q/DQ.
Each quantized tensor read by a Conv/Gemm/MatMul is found in PyTorch as the input of the Conv/Linear
modules that compute the same values on the same sample -- matched by value, not by name, so it holds for
both exporters, for BatchNorm folded into convs and for initializers onnxslim renamed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from calibrators.collect import instrument
from calibrators.qdq import QdqPlan
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
MATCH_TOLERANCE = 1e-3  # max |torch - onnx| relative to the tensor's max |value|


@dataclass
class QuantMap:
    """ONNX tensor -> the modules whose input it is; which modules get int8 weights; what stayed unmapped."""

    inputs: dict[str, list[str]] = field(default_factory=dict)
    weighted: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # quantized tensors no module reads (keep PTQ ranges)
    float_modules: list[str] = field(default_factory=list)  # weighted modules the plan keeps in float

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": len(self.inputs),
            "quantized_modules": len(self.weighted),
            "float_modules": self.float_modules,
            "unmapped_tensors": self.unmapped,
        }


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(m.weight, torch.Tensor)
    }


def _module_inputs(model: nn.Module, feeds: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The first input each Conv/Linear module sees on one forward pass."""
    seen: dict[str, np.ndarray] = {}
    handles = []
    for name, module in weighted_modules(model).items():

        def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().float().cpu().numpy()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*feeds)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _onnx_values(model: onnx.ModelProto, tensors: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict:
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [t for t in tensors if t not in graph_inputs]
    values = {t: np.asarray(feeds[t]) for t in tensors if t in graph_inputs}
    if wanted:
        session = ort_core.cpu_session(instrument(model, wanted), ort_core.REFERENCE, None)
        names = [o.name for o in session.get_outputs()]
        values.update(zip(names, session.run(names, dict(feeds)), strict=True))
    return values


def map_plan(
    model: nn.Module,
    onnx_model: onnx.ModelProto,
    plan: QdqPlan,
    feeds: Mapping[str, np.ndarray],
    input_names: Sequence[str],
) -> QuantMap:
    """Match every quantized activation tensor read by a weighted node to the modules reading it."""
    tensors = [
        t
        for t, act in plan.activations.items()
        if any(plan.node_types.get(node) in WEIGHTED_OPS for node, _ in act.consumers)
    ]
    onnx_values = _onnx_values(onnx_model, tensors, feeds)
    torch_feeds = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names]
    seen = _module_inputs(model, torch_feeds)
    result = QuantMap()
    for module_name, value in seen.items():
        best, best_err = None, MATCH_TOLERANCE
        for tensor in tensors:
            other = onnx_values[tensor]
            if other.size != value.size:
                continue
            scale = float(np.abs(other).max()) or 1.0
            err = float(np.abs(other.reshape(-1) - value.reshape(-1)).max()) / scale
            if err < best_err:
                best, best_err = tensor, err
        if best is None:
            result.float_modules.append(module_name)
            continue
        result.inputs.setdefault(best, []).append(module_name)
        result.weighted.append(module_name)
    result.unmapped = [t for t in tensors if t not in result.inputs]
    if not result.weighted:
        raise TrtbuildError(
            "no PyTorch Conv/Linear module matches a layer the Q/DQ placement quantizes",
            "the model needs quantizable Conv/Linear layers (functional F.conv2d/F.linear calls cannot be "
            "trained); check that --input matches forward()",
        )
    log.info(
        "mapped %d quantized tensors onto %d modules (%d modules stay float, %d tensors keep PTQ ranges)",
        len(result.inputs),
        len(result.weighted),
        len(result.float_modules),
        len(result.unmapped),
    )
    return result
