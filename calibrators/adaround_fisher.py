"""Output-sensitivity weights for learned rounding: each output channel's error counted by how much the
model's outputs depend on it (the diagonal Fisher of BRECQ, Li et al. 2021, per channel).

Learned rounding (calibrators/adaround.py) minimises each layer's output error ||W x_fp - W~ x_q||^2 with
every output channel counted alike, though some channels barely move the final output and others decide
it. To second order, the change of the output loss is 1/2 da' J' F J da (da: the layer's output error, J:
d outputs / d layer output, F: the loss's Hessian in the outputs). Its diagonal per channel,
E[(J' v)^2] for a probe v ~ N(0, F), is one backward pass per calibration batch through the float graph
(calibrators/onnx_torch.py) with a random probe on the outputs:

- classification logits (calibrators/output_kinds.py): F is the softmax Fisher diag(p) - p p' (the Hessian
  of KL(p_fp || p_q) at the float point), so channels that move the likely classes' logits count most;
- every other output: F = I (squared output error).

The weights are averaged over samples and positions, normalised to mean 1 per layer and flattened by
``power`` (0: unweighted, 1: the Fisher itself). Per channel, not per element, so the layer's loss keeps
the closed-form Gram gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from calibrators import onnx_torch, output_kinds
from calibrators.adaround_layers import Layer

log = logging.getLogger(__name__)


def channel_weights(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    seed: int = 0,
    power: float = 1.0,
) -> dict[str, np.ndarray] | None:
    """Per layer weight name: [G, O/G] output-channel weights (mean 1); None when the graph has an op the
    torch evaluator lacks (logged; learning then counts every channel alike)."""
    import torch

    try:
        onnx_torch.check_supported(model)
    except onnx_torch.Unsupported as exc:
        log.warning("learned rounding without output weighting: %s", exc)
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic sums, as the learning itself (calibrators/adaround.py)
    try:
        return _weights(model, layers, feeds, seed, power)
    finally:
        torch.set_num_threads(threads)


def _weights(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    seed: int,
    power: float,
) -> dict[str, np.ndarray]:
    import torch

    node_out = {n.name: n.output[0] for n in model.graph.node}
    tensors = [node_out[layer.node] for layer in layers]
    sums: dict[str, Any] = dict.fromkeys(tensors, 0.0)
    counts = dict.fromkeys(tensors, 0)
    gen = torch.Generator().manual_seed(seed)
    kinds: dict[str, output_kinds.OutputKind] | None = None
    for batch in feeds:
        feed = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
        for v in feed.values():
            if v.is_floating_point():
                v.requires_grad_(True)  # so autograd tracks the layer outputs that depend on it
        values = onnx_torch.run(
            model, feed, tensors, track_weights=not any(v.requires_grad for v in feed.values())
        )
        outputs = [o.name for o in model.graph.output if values[o.name].is_floating_point()]
        if kinds is None:
            kinds = output_kinds.decide_all(model, {o: values[o].detach().numpy() for o in outputs})
        probe = sum(
            (values[o] * _probe(values[o].detach(), kinds[o].kind == "classification", gen)).sum()
            for o in outputs
        )
        keep = [t for t in tensors if values[t].requires_grad]
        grads = torch.autograd.grad(probe, [values[t] for t in keep], allow_unused=True)
        for t, g in zip(keep, grads, strict=True):
            if g is None:
                continue
            axis = 1 if g.dim() == 4 else g.dim() - 1  # conv: NCHW; Gemm/MatMul: channels last
            sq = (g.detach().double() ** 2).movedim(axis, -1).reshape(-1, g.shape[axis])
            sums[t] = sums[t] + sq.sum(0).numpy()
            counts[t] += sq.shape[0]
    out: dict[str, np.ndarray] = {}
    for layer, t in zip(layers, tensors, strict=True):
        if counts[t] == 0 or not np.all(np.isfinite(sums[t])) or float(np.max(sums[t])) <= 0.0:
            continue
        fisher = np.asarray(sums[t], np.float64) / counts[t]
        w = np.power(fisher / fisher.mean(), power)
        out[layer.weight] = (w / w.mean()).astype(np.float32).reshape(layer.groups, -1)
    return out


def _probe(z: object, softmax: bool, gen: object) -> object:
    """v ~ N(0, F) per row of the output: F = diag(p) - p p' for logits (last axis), else I."""
    import torch

    assert isinstance(z, torch.Tensor) and isinstance(gen, torch.Generator)
    eps = torch.randn(z.shape, generator=gen, dtype=z.dtype)
    if not softmax:
        return eps
    p = z.softmax(-1)
    root = p.sqrt()
    return root * eps - p * (root * eps).sum(-1, keepdim=True)
