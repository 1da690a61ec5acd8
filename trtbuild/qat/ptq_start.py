"""Start QAT from our best PTQ: learned-rounding integer weights and bias correction folded into the
float weights the student trains, so step 0 of QAT is the PTQ graph (same ranges, same integers).

Why: round-to-nearest PTQ without bias correction (what QAT used to start from) is the weakest PTQ we
have on EfficientNet-Lite0 (90.6 % top-1 vs 96.9-98.4 % with learned rounding); a few hundred small Adam
steps cannot make up the gap that AdaRound closes layer by layer.

How: each PyTorch module's weight is matched by value to the exported ONNX weight it becomes
(``W_onnx = s * W_torch`` per output channel, ``s`` a BatchNorm folded into the conv, or 1). The module's
weight becomes ``dequant(int8) / s`` -- on the int8 grid the fake quantizer (scale max|w| / 127 per channel)
and plan_qdq's nearest rounding then reproduce exactly the learned integers -- and its bias gets the bias
correction's shift ``-shift / s`` (a conv without bias gets one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from calibrators import adaround
from calibrators.qdq import QdqOptions, QdqPlan, plan_qdq
from calibrators.qdq_types import WeightQdq
from calibrators.ranges import RangeSet
from calibrators.weights import dequantize_weight

log = logging.getLogger(__name__)
MATCH_TOLERANCE = 1e-4  # max |W_onnx - s W_torch| relative to max |W_onnx|


def learned_plan(
    graph: onnx.ModelProto,
    ranges: RangeSet,
    options: QdqOptions,
    batches: Iterable[Mapping[str, np.ndarray]],
    budget_s: float,
    seed: int,
    threads: int | None = 1,
) -> tuple[QdqPlan, adaround.LearnedRounding]:
    """What `quantize --rounding learned` plans: rounding learned without bias correction, then bias
    correction only on the layers the learning did not reach (calibrators/quantize.py does the same)."""
    uncorrected = plan_qdq(graph, ranges, replace(options, bias_correction=False))
    config = adaround.AdaRoundConfig(budget_s=budget_s, seed=seed)
    learned = adaround.learn_rounding(graph, uncorrected, batches, config, threads)
    final = replace(options, bias_correction=True, learned_rounding=learned.decided)
    return plan_qdq(graph, ranges, final), learned


def _channel_factor(w_onnx: np.ndarray, w_torch: np.ndarray, axis: int) -> np.ndarray | None:
    """``s`` with ``w_onnx == s * w_torch`` per slice along ``axis`` (None when they do not match)."""
    o = np.moveaxis(w_onnx.astype(np.float64), axis, 0).reshape(w_onnx.shape[axis], -1)
    t = np.moveaxis(w_torch.astype(np.float64), axis, 0).reshape(w_torch.shape[axis], -1)
    norm = (t * t).sum(1)
    s = np.where(norm > 0, (o * t).sum(1) / np.where(norm > 0, norm, 1.0), 1.0)
    err = np.abs(o - s[:, None] * t).max() / max(float(np.abs(o).max()), 1e-12)
    return s if err < MATCH_TOLERANCE else None


def fold_plan(
    model: nn.Module,
    graph: onnx.ModelProto,
    plan: QdqPlan,
    module_names: Iterable[str],
    smooth: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Fold ``plan``'s learned integers and bias shifts into the named modules; returns how many changed.
    ``smooth``: module -> SmoothQuant s (its ONNX weight is ``W diag(s)``, smoothing.py)."""
    inits = {i.name: i for i in graph.graph.initializer}
    modules = dict(model.named_modules())
    pending = {k: w for k, w in plan.weights.items() if w.tensor in inits and w.weight_format == "int8"}
    changed = 0
    for name in module_names:
        module = modules[name]
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        w_t = weight.detach().cpu().numpy()
        s_in = None if smooth is None else smooth.get(name)
        if s_in is not None:
            w_t = (w_t.astype(np.float64) * s_in[None, :]).astype(np.float32)
        for key, wplan in pending.items():
            w_o = numpy_helper.to_array(inits[wplan.tensor])
            transposed = w_o.ndim == 2 and w_o.shape != w_t.shape and w_o.T.shape == w_t.shape
            view = w_o.T if transposed else w_o
            axis = 1 - wplan.axis if transposed else wplan.axis
            if view.shape != w_t.shape or axis != 0:
                continue
            s = _channel_factor(view, w_t, 0)
            if s is None:
                continue
            del pending[key]
            _fold_one(module, plan, key, wplan, s, transposed, s_in)
            changed += 1
            break
    log.info("QAT starts from the PTQ plan: %d layers folded (learned rounding / bias correction)", changed)
    return changed


def _fold_one(
    module: nn.Module,
    plan: QdqPlan,
    key: str,
    wplan: WeightQdq,
    s: np.ndarray,
    transposed: bool,
    s_in: np.ndarray | None = None,
) -> None:
    param = module.weight
    assert isinstance(param, torch.Tensor)
    shape = (-1,) + (1,) * (param.dim() - 1)
    factor = torch.from_numpy(s).to(param)
    with torch.no_grad():
        learned = plan.rounded_weights.get(key)
        if learned is not None:
            w = dequantize_weight(learned, np.asarray(wplan.scales, np.float32), wplan.axis)
            w = w.T if transposed else w
            w = w if s_in is None else w / s_in[None, :]  # the parameter stays unsmoothed
            param.copy_(torch.from_numpy(np.ascontiguousarray(w)).to(param) / factor.view(shape))
        if wplan.bias_shift is not None and wplan.corrected_bias is not None:
            delta = -torch.from_numpy(np.asarray(wplan.bias_shift, np.float64)).to(param) / factor
            bias = module.bias
            if isinstance(bias, torch.Tensor):
                bias.add_(delta)
            else:
                module.bias = nn.Parameter(delta.clone())
