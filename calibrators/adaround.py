"""Learned weight rounding (AdaRound: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", 2020).

Round-to-nearest minimises each weight's own error, not the layer's output error: rounding a few weights the
other way can cancel errors that add up over a dot product. Per weighted layer in graph order this learns,
for every weight, the grid value below or above w/s (s: the plan's per-channel scale; the int8 grid, or
the FP8 E4M3 grid whose step grows with the magnitude: calibrators/rounding_grid.py) that minimises
||W x_fp - W~ x_q||^2 where x_q is the layer's input in the graph quantized so far (activations through
their Q/DQ, earlier layers with their learned weights: errors do not compound) and W x_fp the float model's
output. The up/down choice is a continuous variable h = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1),
pushed to 0 or 1 by an annealed regulariser, then rounded hard.

Bounded: rows (conv output positions / Gemm rows) are sampled, so memory does not grow with image size;
a fixed number of full-batch Adam steps whose reconstruction gradient is closed form (from the rows' Gram
matrix when a layer has fewer inputs than rows), on one torch thread (deterministic for a seed, whatever
``threads``); the quantized prefix runs incrementally (calibrators/adaround_prefix.py); a total time budget
stops learning and leaves the remaining layers at round-to-nearest (logged). A learned rounding that does
not beat round-to-nearest on held-out rows is discarded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper

from calibrators import adaround_fisher, adaround_qdrop, rounding_grid
from calibrators.adaround_layers import Layer, batch_size_of, learnable_layers, row_rng
from calibrators.adaround_prefix import PrefixRunner
from calibrators.collect import instrument
from calibrators.data import first_samples
from calibrators.qdq_rewrite import apply_qdq
from calibrators.qdq_scales import GraphCache
from calibrators.qdq_types import QdqPlan
from trtbuild.core import ort as ort_core

log = logging.getLogger(__name__)

ROUNDINGS = ("nearest", "learned")
# The budget counts this process's CPU seconds, not wall seconds: the same work is learned on a quiet or a
# loaded machine (at load 7-10 on 2 cores the 110 s wall budget learned 1 of EfficientNet-Lite0's 48 layers).
budget_clock = time.process_time
_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper's values)


@dataclass(frozen=True)
class AdaRoundConfig:
    """How hard to learn. Defaults: measured on EfficientNet-Lite0 / MiniLM (bench/bench_int8_accuracy.py)."""

    # Calibration samples whose layer inputs are used, and sampled rows (conv output positions, Gemm/MatMul
    # rows) per layer: 64 rows per sample either way. 64 samples (was 32) measured better on both exports
    # (192 held-out crops: top-1 96.4/94.8 % -> 96.9/96.9 %, TorchScript/dynamo) for ~25 CPU s more.
    samples: int = 64
    rows: int = 4096
    iterations: int = 150  # full-batch Adam steps (300 measured no better on EfficientNet-Lite0)
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second after warm-up
    warmup: float = 0.2  # share of the steps without the rounding regulariser
    # Target W x_fp (True: also undo the input's quantization error, the paper's asymmetric loss) or
    # W x_q (False: only the rounding error of this layer's weights).
    asymmetric: bool = True
    # Total seconds; the layers left when it runs out keep round-to-nearest (the first layer always runs).
    budget_s: float = 110.0  # CPU seconds of this process (budget_clock)
    seed: int = 0
    # QDrop (calibrators/adaround_qdrop.py): share of each layer's input elements fitted at their float
    # value instead of the quantized one; 0 fits on the quantized input only (plain AdaRound).
    drop: float = 0.0
    # Output weighting (calibrators/adaround_fisher.py): each output channel's error weighted by its diagonal
    # Fisher (how much the model's outputs depend on it) to this power; 0 counts every channel alike.
    # Measured no better on EfficientNet-Lite0 (same cosine, other near-ties flip: docs/int8-accuracy.md).
    output_weight: float = 0.0


@dataclass
class LayerResult:
    weight: str
    nearest_error: float  # relative output MSE on the sampled rows
    learned_error: float
    kept: bool  # learned rounding used (it beat nearest)
    seconds: float


@dataclass
class LearnedRounding:
    """Grid weights (the plan's per-channel scales; int8, or float8 on the E4M3 grid) by weight name, and
    what was measured."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    # Every layer the learning reached (learned, or nearest where that measured better): its integers. The
    # layers after it were learned against exactly these, so bias correction must leave them alone.
    decided: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # out of time budget
    seconds: float = 0.0
    # Held-out gate score (lower is better) of the learned graph and of round-to-nearest, when both were
    # measured; the pipeline keeps nearest when it measured better (end_to_end_kept False).
    end_to_end: dict[str, float] = field(default_factory=dict)
    end_to_end_kept: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "learned": sorted(self.weights),
            # Bias correction is off on every layer the learning reached (learned layers already target the
            # float output; measured: it took EfficientNet-Lite0 top-1 from 98.4 % back to 95.3 %).
            "bias_correction_off": sorted(self.decided),
            "skipped_for_time": list(self.skipped),
            "seconds": round(self.seconds, 2),
            "end_to_end": {k: round(v, 6) for k, v in self.end_to_end.items()},
            "end_to_end_kept": self.end_to_end_kept,
            "layers": [
                {
                    "weight": r.weight,
                    "nearest_error": r.nearest_error,
                    "learned_error": r.learned_error,
                    "kept": r.kept,
                    "seconds": round(r.seconds, 3),
                }
                for r in self.layers
            ],
        }


def learn_rounding(
    model: onnx.ModelProto | GraphCache,
    plan: QdqPlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    config: AdaRoundConfig | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    only: Sequence[str] | None = None,
) -> LearnedRounding:
    """Learn the rounding of every int8 or fp8 weight in ``plan`` (or of the weights named in ``only``) that
    :func:`learnable_layers` accepts.

    ``batches``: calibration feeds (at most ``config.samples`` samples are used). ``progress(done, total)``
    is called after each layer."""
    import torch

    config = config or AdaRoundConfig()
    cache = model if isinstance(model, GraphCache) else GraphCache(model)
    start, wall = budget_clock(), time.perf_counter()
    feeds = first_samples(batches, config.samples)
    # the int8 grid (TensorRT INT8) or the E4M3 grid (TensorRT FP8): calibrators/rounding_grid.py
    learnable = {
        k: w
        for k, w in plan.weights.items()
        if w.weight_format in rounding_grid.GRIDS and (only is None or k in only)
    }
    layers = learnable_layers(cache.model, cache.graph, learnable)
    result = LearnedRounding()
    if not layers or not feeds:
        return result
    targets = _float_targets(cache, layers, feeds, config, threads)
    torch.manual_seed(config.seed)
    # One thread: these products are small, and torch's thread pool only adds sync cost (measured ~10x
    # slower with 2 threads on a loaded 2-core machine). It also keeps the result independent of threads.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = None
        if config.output_weight > 0:
            weights = adaround_fisher.channel_weights(
                cache.model, layers, feeds, config.seed, config.output_weight
            )
        _learn_all(cache, plan, layers, feeds, targets, config, threads, progress, result, start, weights)
    finally:
        torch.set_num_threads(torch_threads)
    if result.skipped:
        log.warning(
            "learned rounding ran out of its %.0f CPU s budget: %d layer(s) keep round-to-nearest",
            config.budget_s,
            len(result.skipped),
        )
    result.seconds = time.perf_counter() - wall
    return result


def _learn_all(
    cache: GraphCache,
    plan: QdqPlan,
    layers: Sequence[Layer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    targets: Mapping[str, np.ndarray],
    config: AdaRoundConfig,
    threads: int | None,
    progress: Callable[[int, int], None] | None,
    result: LearnedRounding,
    start: float,
    channel_weights: Mapping[str, np.ndarray] | None = None,
) -> None:
    prefix = PrefixRunner(feeds, threads)
    floats = adaround_qdrop.FloatInputs(cache, feeds, threads) if config.drop > 0 else None
    per = _rows_per_sample(config, feeds)
    for index, layer in enumerate(layers):
        if result.layers and budget_clock() - start > config.budget_s:
            result.skipped.append(layer.weight)
            continue
        t0 = time.perf_counter()
        # This layer's input rows in the graph with every layer learned so far.
        current = replace(plan, rounded_weights={**plan.rounded_weights, **result.weights})
        qmodel = apply_qdq(cache, current, check=False)
        qnode = next(n for n in qmodel.graph.node if n.name == layer.node)
        tensor = qnode.input[0]
        values = prefix.run(qmodel, [tensor])
        # The ORT-CPU graph folds a zero Pad into the conv after it (qdq_fold_pads.py): its input is then
        # the unpadded tensor, and the conv's own pads are the ones to gather rows with.
        qlayer = replace(layer, attrs={a.name: helper.get_attribute_value(a) for a in qnode.attribute})
        x_q = _quantized_rows(qlayer, [v[tensor] for v in values], config, index, per)
        x_fit = None
        if floats is not None:  # fitted on a float/quantized mix, judged on the quantized rows
            mixed = adaround_qdrop.mix(
                [v[tensor] for v in values], floats.values(layer.activation), config.drop, config.seed, index
            )
            x_fit = _quantized_rows(layer, mixed, config, index, per)
            del mixed
        del values
        scales = np.asarray(plan.weights[layer.weight].scales, np.float32)
        w = cache.graph.constant(layer.weight).astype(np.float32)
        # The budget also stops a layer mid-way (one large head can take minutes: ddddocr's 8210-class
        # Gemm took 365 s of a 411 s run); only the first layer always finishes.
        deadline = start + config.budget_s if result.layers else None
        grid = plan.weights[layer.weight].weight_format
        learned_layer = _learn_layer(
            layer,
            w,
            scales,
            x_q,
            targets[layer.weight],
            config,
            deadline,
            grid,
            x_fit,
            (channel_weights or {}).get(layer.weight),
        )
        if learned_layer is None:
            result.skipped.append(layer.weight)
            continue
        q, nearest, nearest_err, learned_err = learned_layer
        kept = learned_err < nearest_err
        if kept:
            result.weights[layer.weight] = q
        result.decided[layer.weight] = q if kept else nearest
        result.layers.append(
            LayerResult(layer.weight, nearest_err, learned_err, kept, time.perf_counter() - t0)
        )
        log.info(
            "adaround %s: output error %.4g -> %.4g%s",
            layer.node,
            nearest_err,
            learned_err,
            "" if kept else " (kept nearest)",
        )
        if progress:
            progress(index + 1, len(layers))


def _rows_per_sample(config: AdaRoundConfig, feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    return max(1, math.ceil(config.rows / sum(batch_size_of(b) for b in feeds)))


def _float_targets(
    cache: GraphCache,
    layers: Sequence[Layer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: AdaRoundConfig,
    threads: int | None,
) -> dict[str, np.ndarray]:
    """W x_fp on the sampled rows of every layer ([R, G, O/G]), in one pass over the float graph; per
    batch only the sampled rows' outputs are kept, not the activations."""
    inputs = {i.name for i in cache.model.graph.input}
    wanted = [t for t in dict.fromkeys(layer.activation for layer in layers) if t not in inputs]
    sess = ort_core.cpu_session(instrument(cache.model, wanted), ort_core.REFERENCE, threads)
    per = _rows_per_sample(config, feeds)
    parts: list[list[np.ndarray]] = [[] for _ in layers]
    for b, batch in enumerate(feeds):
        values = {**batch, **dict(zip(wanted, sess.run(wanted, dict(batch)), strict=True))}
        for i, layer in enumerate(layers):
            rows = layer.rows(
                np.asarray(values[layer.activation], np.float32), per, row_rng(config.seed, i, b)
            )
            w = layer.to_matrix(cache.graph.constant(layer.weight).astype(np.float32))
            parts[i].append(np.einsum("rgi,goi->rgo", rows, w).astype(np.float32))
        del values
    return {layer.weight: np.concatenate(parts[i]) for i, layer in enumerate(layers)}


def _quantized_rows(
    layer: Layer, values: Sequence[np.ndarray], config: AdaRoundConfig, index: int, per: int
) -> np.ndarray:
    """The layer's input rows (the same positions as its float target) from the quantized graph."""
    return np.concatenate(
        [
            layer.rows(np.asarray(v, np.float32), per, row_rng(config.seed, index, b))
            for b, v in enumerate(values)
        ]
    )


def _learn_layer(
    layer: Layer,
    w: np.ndarray,
    scales: np.ndarray,
    x_q: np.ndarray,
    target: np.ndarray,
    config: AdaRoundConfig,
    deadline: float | None = None,
    grid: str = "int8",
    x_fit: np.ndarray | None = None,
    channel_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """(learned and nearest weight on ``grid`` in ONNX layout and storage type, nearest relative error,
    learned relative error); None when ``deadline`` (budget_clock seconds) passes before the steps are
    done. ``x_fit``: the rows to fit on instead of ``x_q`` (QDrop's mixed input; the same positions),
    ``x_q`` still judges. ``channel_weight`` ([G, O/G]): each output channel's weight in the loss (and in
    the held-out errors), calibrators/adaround_fisher.py."""
    import torch

    wm = layer.to_matrix(w)  # [G, O, I]
    if not config.asymmetric:
        target = np.einsum("rgi,goi->rgo", x_q, wm).astype(np.float32)
    s = scales.reshape(wm.shape[0], wm.shape[1], 1)
    scaled = (wm / s).astype(np.float32)
    below, above = rounding_grid.neighbours(scaled, grid)
    step = above - below
    frac = np.divide(scaled - below, step, out=np.full_like(step, 0.5), where=step > 0)
    rest = np.clip(frac, 1e-4, 1 - 1e-4)
    # The last quarter of the rows (other images: rows are stored sample by sample) only judges the result.
    split = max(1, (3 * x_q.shape[0]) // 4) if x_q.shape[0] > 1 else 1
    held = slice(split, None) if split < x_q.shape[0] else slice(None)
    # Group-major [G, R, I] / [G, R, O]: batched matrix products per group.
    fit = x_q if x_fit is None else x_fit
    x = torch.from_numpy(np.ascontiguousarray(fit[:split].transpose(1, 0, 2)))
    y = torch.from_numpy(np.ascontiguousarray(target[:split].transpose(1, 0, 2)))
    x_val = torch.from_numpy(np.ascontiguousarray(x_q[held].transpose(1, 0, 2)))
    y_val = torch.from_numpy(np.ascontiguousarray(target[held].transpose(1, 0, 2)))
    ts = torch.from_numpy(s.astype(np.float32))
    # W = (lo + h * (hi - lo)) * s: the grid value below or above w/s (int8: floor or ceil, a ceil past
    # qmax stays at qmax; fp8: the E4M3 neighbours, whose step grows with the magnitude).
    lo = torch.from_numpy(below)
    tstep = torch.from_numpy(step)
    slope = tstep * ts  # dW/dh
    base = lo * ts
    gradient = _recon_gradient(x, y)
    cw_w = cw_y = torch.ones(1)  # output-channel weights, shaped for [G, O, I] and [G, R, O]
    if channel_weight is not None:
        cw = torch.from_numpy(channel_weight.astype(np.float32))
        cw_w, cw_y = cw.reshape(-1, s.shape[1], 1), cw.reshape(-1, 1, s.shape[1])
    # V such that h(V) = the fractional part: learning starts at the float weight itself.
    v = torch.nn.Parameter(
        torch.from_numpy(-np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1).astype(np.float32))
    )
    opt = torch.optim.Adam([v], lr=config.lr)
    denom = float((y_val**2 * cw_y).mean()) or 1.0
    warm = int(config.warmup * config.iterations)
    with torch.no_grad():  # gradients by hand: autograd's graph costs more than these elementwise ops
        for step in range(config.iterations):
            if deadline is not None and step % 10 == 0 and budget_clock() > deadline:
                return None
            sig = torch.sigmoid(v)
            raw = sig * (_ZETA - _GAMMA) + _GAMMA
            live = (raw > 0) & (raw < 1)  # outside, the rectifying clamp passes no gradient
            h = raw.clamp(0.0, 1.0)
            grad_h = gradient(base + h * slope) * cw_w * slope
            if step >= warm:  # the rounding regulariser 1 - |2h - 1|^beta, beta annealed high -> low
                frac = (step - warm) / max(1, config.iterations - warm)
                beta = config.beta[1] + 0.5 * (config.beta[0] - config.beta[1]) * (
                    1 + math.cos(math.pi * frac)
                )
                u = 2 * h - 1
                grad_h -= (2 * config.reg_weight * beta) * u.abs().pow(beta - 1) * u.sign()
            v.grad = grad_h * live * (sig * (1 - sig) * (_ZETA - _GAMMA))
            opt.step()

    def soft() -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    with torch.no_grad():
        hard = (soft() >= 0.5).float()
        learned = lo + hard * tstep
        nearest = torch.from_numpy(rounding_grid.nearest(scaled, grid))

        def error(q: torch.Tensor) -> float:
            diff = torch.bmm(x_val, (q * ts).transpose(1, 2)) - y_val
            return float((diff**2 * cw_y).mean()) / denom

        q = rounding_grid.stored(learned.numpy(), grid)
        near = layer.from_matrix(rounding_grid.stored(nearest.numpy(), grid))
        return layer.from_matrix(q), near, error(nearest), error(learned)


def _recon_gradient(x: Any, y: Any) -> Callable[[Any], Any]:
    """d/dW of mean over rows of ||W x - y||^2 (x: [G, R, I], y: [G, R, O], W: [G, O, I]).

    With fewer inputs than rows it is 2 (W X'X - Y'X) / R from the Gram matrices (computed once: per step
    O*I*I instead of O*I*R multiply-adds), else the direct product; both are the same exact gradient."""
    import torch

    rows, inputs = x.shape[1], x.shape[2]
    if inputs <= rows:
        xt = x.transpose(1, 2)
        gram = torch.bmm(xt, x) / rows  # [G, I, I]
        cross = torch.bmm(xt, y).transpose(1, 2) / rows  # [G, O, I]
        return lambda w: 2 * (torch.bmm(w, gram) - cross)
    return lambda w: 2 * torch.bmm((torch.bmm(x, w.transpose(1, 2)) - y).transpose(1, 2), x) / rows
