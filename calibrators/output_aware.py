"""Output-aware activation ranges (``--method output-aware``): each activation's clipping threshold is the
one whose quantization error hurts the *outputs of the layers that read it* least, not the tensor itself.

A tensor's own MSE weighs every channel alike; a consumer layer does not (a depthwise conv multiplies each
channel by its own weights, a 1x1 conv mixes them). So for every int8 activation read by quantized
Conv/Gemm/MatMul layers, candidate amaxes (the histogram methods' choices and a grid of fractions of the
observed max) are each scored by

    sum over consumers  || W_q Q(x; amax) - W x ||^2 / || W x ||^2      on sampled rows of the float x

with ``W_q`` the consumer's int8 weights as the plan quantizes them; the lowest score wins (ties keep the
base method's amax). Activations with no such consumer keep the base method's range.

Cost: one float pass over ``samples`` calibration samples (instrumented for the scored tensors), then per
tensor and candidate one matrix product of ``rows`` sampled rows per sample with the consumer's weights:
time grows with the number of weighted layers, never with the image size; memory is one batch of
activations plus the sampled rows. The rows are drawn from ``seed``, so the result is deterministic.
Why not a range method (calibrators/methods.py): those read one tensor's histogram; this needs the graph,
the weights and data, so it refines the base method's ranges after ``compute_ranges``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from calibrators.adaround_layers import Layer, learnable_layers
from calibrators.collect import instrument
from calibrators.data import first_samples
from calibrators.graph_index import GraphIndex, ensure_node_names
from calibrators.histogram import TensorStats
from calibrators.methods import amax_for
from calibrators.qdq_types import QdqPlan
from calibrators.ranges import RangeSet, TensorRange
from calibrators.weights import dequantize_weight, quantize_weight
from trtbuild.core import ort as ort_core

log = logging.getLogger(__name__)

METHOD = "output-aware"
BASE_METHOD = "mse"  # the ranges that are refined, and kept where no consumer can score a tensor
DEFAULT_SAMPLES = 8  # calibration samples the scores are measured on
DEFAULT_ROWS = 512  # sampled rows (conv output positions, Gemm/MatMul rows) per consumer and sample
GRID_STEPS = 24  # amax = absmax * 2**(-k/4), k = 0..GRID_STEPS-1: down to 1.6 % of the observed max
BASE_METHODS = ("mse", "entropy", "minmax")
# A tensor whose consumers give fewer sampled rows than this (an SE block's pooled 1x1 input: one row per
# sample) keeps its base range: on the PP-OCR detector's held-out images those few rows chose ranges up to
# 40x worse than mse. (Capping the tensor's own MSE at 2x the lowest also cut the held-out consumer error,
# but lost 0.06 output cosine there: the ranges that help clip more than the tensor's MSE allows.)
MIN_ROWS = 256
PERCENTILES = (99.9, 99.99, 99.999)

Progress = Callable[[int, int], None]


@dataclass
class OutputAwareResult:
    """What the refinement chose, per scored tensor: base amax, chosen amax and both scores."""

    ranges: RangeSet
    scored: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changed(self) -> list[str]:
        return [t for t, s in self.scored.items() if s["amax"] != s["base_amax"]]

    def summary(self) -> str:
        if not self.scored:
            return "output-aware: no activation feeds a quantized Conv/Gemm/MatMul; base ranges kept"
        gain = [s["base_score"] / s["score"] for s in self.scored.values() if s["score"] > 0]
        mean_gain = float(np.exp(np.mean(np.log(gain)))) if gain else 1.0
        return (
            f"output-aware: {len(self.changed)} of {len(self.scored)} scored activations changed range, "
            f"consumer-output error {mean_gain:.2f}x lower (geometric mean) in {self.seconds:.1f} s"
        )


def candidates(stats: TensorStats, base: float) -> np.ndarray:
    """The amaxes one tensor is scored at: ``base`` first, the histogram methods', a grid below absmax."""
    if stats.absmax == 0.0:
        return np.array([base])
    found = [base, *(amax_for(stats, m) for m in BASE_METHODS)]
    found += [amax_for(stats, "percentile", p) for p in PERCENTILES]
    found += list(stats.absmax * 2.0 ** (-np.arange(GRID_STEPS) / 4.0))
    unique = list(dict.fromkeys(float(a) for a in found if a > 0))
    return np.array(unique)


def fake_quant(x: np.ndarray, amax: float) -> np.ndarray:
    """Symmetric int8 Q/DQ as the graph's QuantizeLinear(zero point 0) + DequantizeLinear computes it."""
    scale = np.float32(amax / 127.0)
    return (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)


def _quantized_matrix(layer: Layer, g: GraphIndex, plan: QdqPlan) -> tuple[np.ndarray, np.ndarray]:
    """(float, int8-dequantized) weight of ``layer`` as [G, O/G, I]."""
    w = g.constant(layer.weight).astype(np.float32)
    wplan = plan.weights[layer.weight]
    scales = np.asarray(wplan.scales, np.float32)
    wq = dequantize_weight(quantize_weight(w, scales, wplan.axis), scales, wplan.axis)
    return layer.to_matrix(w), layer.to_matrix(wq)


def _consumers(
    model: onnx.ModelProto, ranges: RangeSet, plan: QdqPlan, stats: Mapping[str, TensorStats] | None
) -> tuple[onnx.ModelProto, GraphIndex, dict[str, list[Layer]]]:
    """Each int8 activation of ``plan`` (with a range) -> the quantized Conv/Gemm/MatMul layers it feeds."""
    model = ensure_node_names(model)
    g = GraphIndex(model)
    consumers: dict[str, list[Layer]] = {}
    for layer in learnable_layers(model, g, plan.weights):
        t = layer.activation
        act = plan.activations.get(t)
        if act is not None and act.dtype == "int8" and t in ranges and (stats is None or t in stats):
            consumers.setdefault(t, []).append(layer)
    return model, g, consumers


def _relative_errors(
    model: onnx.ModelProto,
    g: GraphIndex,
    plan: QdqPlan,
    consumers: Mapping[str, list[Layer]],
    grid: Mapping[str, np.ndarray],
    feeds: list[dict[str, np.ndarray]],
    rows: int,
    seed: int,
    threads: int | None,
    progress: Progress | None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per tensor, per candidate amax of ``grid``: sum over its consumers of the relative squared error
    || W_q Q(x) - W x ||^2 / || W x ||^2 on sampled rows (one float pass over ``feeds``); and the rows
    each tensor was scored on."""
    tensors = list(consumers)
    matrices = {layer.node: _quantized_matrix(layer, g, plan) for ls in consumers.values() for layer in ls}
    noise = {t: np.zeros((len(consumers[t]), grid[t].size)) for t in tensors}
    energy = {t: np.zeros(len(consumers[t])) for t in tensors}
    counted = dict.fromkeys(tensors, 0)
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [t for t in tensors if t not in graph_inputs]
    sess = ort_core.cpu_session(instrument(model, wanted), ort_core.REFERENCE, threads) if wanted else None
    total, done = len(feeds) * len(tensors), 0
    for b, batch in enumerate(feeds):
        values = dict(zip(wanted, sess.run(wanted, dict(batch)), strict=True)) if sess else {}
        values.update({k: np.asarray(v) for k, v in batch.items()})
        for i, t in enumerate(tensors):
            x = np.asarray(values[t], np.float32)
            for j, layer in enumerate(consumers[t]):
                rng = np.random.default_rng([seed, i, j, b])  # the same rows for every candidate
                picked = layer.rows(x, rows, rng)  # [R, G, I]
                counted[t] += picked.shape[0] if j == 0 else 0
                w, wq = matrices[layer.node]
                target = np.einsum("rgi,goi->rgo", picked, w)
                energy[t][j] += float(np.square(target, dtype=np.float64).sum())
                for k, amax in enumerate(grid[t]):
                    out = np.einsum("rgi,goi->rgo", fake_quant(picked, float(amax)), wq)
                    noise[t][j, k] += float(np.square(out - target, dtype=np.float64).sum())
            done += 1
            if progress is not None:
                progress(done, total)
        del values
    return {t: (noise[t] / np.maximum(energy[t], 1e-30)[:, None]).sum(axis=0) for t in tensors}, counted


def refine(
    model: onnx.ModelProto,
    base: RangeSet,
    plan: QdqPlan,
    stats: Mapping[str, TensorStats],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    samples: int = DEFAULT_SAMPLES,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
) -> OutputAwareResult:
    """``base`` with each int8 activation read by quantized Conv/Gemm/MatMul layers (of ``plan``, made from
    ``base``) set to the candidate amax with the least relative error at those layers' outputs, measured
    on the first ``samples`` samples of ``batches``."""
    start = time.perf_counter()
    model, g, consumers = _consumers(model, base, plan, stats)
    grid = {t: candidates(stats[t], base[t].amax) for t in consumers}
    feeds = first_samples(batches, samples)
    scores, counted = _relative_errors(model, g, plan, consumers, grid, feeds, rows, seed, threads, progress)
    refined = RangeSet(method=METHOD, ranges=dict(base.ranges), meta=dict(base.meta))
    result = OutputAwareResult(refined)
    for t, score in scores.items():
        # The first minimum: the base amax (index 0) wins ties; too few rows keep it outright.
        best = int(np.argmin(score)) if counted[t] >= MIN_ROWS else 0
        old = base[t]
        refined.add(TensorRange(name=t, amax=float(grid[t][best]), min=old.min, max=old.max))
        result.scored[t] = {
            "base_amax": old.amax,
            "amax": float(grid[t][best]),
            "base_score": float(score[0]),
            "score": float(score[best]),
            "rows": float(counted[t]),
        }
    result.seconds = time.perf_counter() - start
    refined.meta.update(
        {
            "base_method": base.method,
            "output_aware": {"samples": len(feeds), "rows": rows, "seed": seed, "scored": len(scores)},
            "output_aware_seconds": round(result.seconds, 3),
        }
    )
    return result


def consumer_errors(
    model: onnx.ModelProto,
    ranges: RangeSet,
    plan: QdqPlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    samples: int = DEFAULT_SAMPLES,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, float]:
    """The objective ``refine`` minimises, at the amaxes of ``ranges``: per activation, the summed relative
    error at its consumer layers' outputs (e.g. to check a refinement on held-out samples)."""
    model, g, consumers = _consumers(model, ranges, plan, None)
    grid = {t: np.array([ranges[t].amax]) for t in consumers}
    feeds = first_samples(batches, samples)
    scores, _ = _relative_errors(model, g, plan, consumers, grid, feeds, rows, seed, threads, None)
    return {t: float(v[0]) for t, v in scores.items()}
