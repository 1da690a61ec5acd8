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
    # Tensors whose dequantized value also feeds other ops (a residual Add): fake-quantized at the output of
    # the module computing them, so every reader sees the int8 value as in the Q/DQ graph.
    outputs: dict[str, str] = field(default_factory=dict)
    # SmoothQuant (smoothing.py): module -> the ``s`` its input is divided by (and its weight multiplied by
    # per input channel) in the smoothed graph; the ONNX tensor holds x / s where the module sees x.
    scales: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": len(self.inputs),
            "quantized_modules": len(self.weighted),
            "float_modules": self.float_modules,
            "unmapped_tensors": self.unmapped,
            "output_quantized": self.outputs,
            "smoothed_modules": sorted(self.scales),
        }


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(m.weight, torch.Tensor)
    }


def _module_inputs(model: nn.Module, feeds: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The first input each Conv/Linear module sees on one forward pass."""
    return _first_tensors(model, feeds, weighted_modules(model), inputs=True)


def _module_outputs(model: nn.Module, feeds: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensor output of every module on one forward pass (the first call of each)."""
    modules = {name: module for name, module in model.named_modules() if name}
    return _first_tensors(model, feeds, modules, inputs=False)


def _first_tensors(
    model: nn.Module, feeds: Sequence[torch.Tensor], modules: dict[str, nn.Module], inputs: bool
) -> dict[str, np.ndarray]:
    """Per module, its first call's input (``inputs``) or output tensor, on one forward pass."""
    seen: dict[str, np.ndarray] = {}

    def keep(name: str, value: Any) -> None:
        if name not in seen and isinstance(value, torch.Tensor):
            seen[name] = value.detach().float().cpu().numpy()

    handles = []
    for name, module in modules.items():
        if inputs:
            handles.append(
                module.register_forward_pre_hook(lambda _m, args, n=name: keep(n, args[0] if args else None))
            )
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: keep(n, out)))
    try:
        with torch.no_grad():
            model(*feeds)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _match(value: np.ndarray, candidates: Mapping[str, np.ndarray]) -> str | None:
    """The candidate equal to ``value`` within MATCH_TOLERANCE (the closest one), or None."""
    best, best_err = None, MATCH_TOLERANCE
    for key, other in candidates.items():
        if other.size != value.size:
            continue
        scale = float(np.abs(value).max()) or 1.0
        err = float(np.abs(other.reshape(-1) - value.reshape(-1)).max()) / scale
        if err < best_err:
            best, best_err = key, err
    return best


def _shared_tensors(onnx_model: onnx.ModelProto, plan: QdqPlan, tensors: Sequence[str]) -> list[str]:
    """Quantized tensors whose every reader takes the dequantized value and some reader is no weighted op."""
    readers: dict[str, set[tuple[str, int]]] = {}
    kinds: dict[str, str] = {}
    for node in onnx_model.graph.node:
        kinds[node.name] = node.op_type
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.name, i))
    out = []
    for t in tensors:
        consumers = set(plan.activations[t].consumers)
        if readers.get(t, set()) == consumers and any(kinds.get(n) not in WEIGHTED_OPS for n, _ in consumers):
            out.append(t)
    return out


def _onnx_values(model: onnx.ModelProto, tensors: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict:
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [t for t in tensors if t not in graph_inputs]
    values = {t: np.asarray(feeds[t]) for t in tensors if t in graph_inputs}
    if wanted:
        session = ort_core.cpu_session(instrument(model, wanted), ort_core.REFERENCE, None)
        names = [o.name for o in session.get_outputs()]
        values.update(zip(names, session.run(names, dict(feeds)), strict=True))
    return values


def _map_reshaped_outputs(
    model: nn.Module, feeds: Sequence[torch.Tensor], onnx_values: Mapping[str, np.ndarray], result: QuantMap
) -> None:
    """Quantized tensors no module reads -- the inputs of a MatMul between two activations, e.g. the
    attention scores' Q and K^T -- that are a Conv/Linear output reshaped or permuted: per-tensor fake
    quantization commutes with any reshape/permutation, so it goes on that module's output. Matched by
    value up to order (sorted values), which reshapes and transposes keep."""
    outputs = _first_tensors(model, feeds, weighted_modules(model), inputs=False)
    ordered = {name: np.sort(v.reshape(-1)) for name, v in outputs.items()}
    for tensor in result.unmapped:
        producer = _match(np.sort(np.asarray(onnx_values[tensor]).reshape(-1)), ordered)
        if producer is not None and producer not in result.outputs.values():
            result.inputs[tensor] = []
            result.outputs[tensor] = producer


def map_plan(
    model: nn.Module,
    onnx_model: onnx.ModelProto,
    plan: QdqPlan,
    feeds: Mapping[str, np.ndarray],
    input_names: Sequence[str],
    tensor_scales: Mapping[str, np.ndarray] | None = None,
) -> QuantMap:
    """Match every quantized activation tensor read by a weighted node to the modules reading it.

    ``tensor_scales``: the SmoothQuant ``s`` of smoothed tensors (their ONNX values are the module's
    input divided by ``s`` per channel, so ``value * s`` is matched)."""
    tensors = [
        t
        for t, act in plan.activations.items()
        if any(plan.node_types.get(node) in WEIGHTED_OPS for node, _ in act.consumers)
    ]
    onnx_values = _onnx_values(onnx_model, tensors, feeds)
    scales = dict(tensor_scales or {})
    for t, s in scales.items():
        if t in onnx_values:  # back to what PyTorch computes: the smoothed graph holds x / s
            onnx_values[t] = onnx_values[t] * s
    torch_feeds = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names]
    seen = _module_inputs(model, torch_feeds)
    result = QuantMap()
    candidates = {t: onnx_values[t] for t in tensors}
    for module_name, value in seen.items():
        best = _match(value, candidates)
        if best is None:
            result.float_modules.append(module_name)
            continue
        result.inputs.setdefault(best, []).append(module_name)
        result.weighted.append(module_name)
        if best in scales:
            result.scales[module_name] = scales[best]
    result.unmapped = [t for t in tensors if t not in result.inputs]
    shared = _shared_tensors(onnx_model, plan, [t for t in tensors if t in result.inputs and t not in scales])
    if shared:
        outputs = _module_outputs(model, torch_feeds)
        for tensor in shared:
            producer = _match(onnx_values[tensor], outputs)
            if producer is not None:
                result.outputs[tensor] = producer
    if result.unmapped:
        _map_reshaped_outputs(model, torch_feeds, onnx_values, result)
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
