"""Learned weight rounding (AdaRound: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", 2020).

Round-to-nearest minimises each weight's own error, not the layer's output error: rounding a few weights the
other way can cancel errors that add up over a dot product. Per weighted layer in graph order this learns,
for every weight, floor or ceil of w/s (s: the plan's per-channel scale) that minimises
||W x_fp - W~ x_q||^2 where x_q is the layer's input in the graph quantized so far (activations through
their Q/DQ, earlier layers with their learned weights: errors do not compound) and W x_fp the float model's
output. The up/down choice is a continuous variable h = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1),
pushed to 0 or 1 by an annealed regulariser, then rounded hard.

Bounded: rows (conv output positions / Gemm rows) are sampled, so memory does not grow with image size;
the number of Adam steps is fixed (deterministic for a seed and thread count); a total time budget stops
learning and leaves the remaining layers at round-to-nearest (logged). A learned rounding that does not
beat round-to-nearest on the sampled rows is discarded.
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

from calibrators import weights as wq
from calibrators.adaround_layers import Layer, batch_size_of, learnable_layers, row_rng
from calibrators.collect import instrument
from calibrators.qdq_rewrite import apply_qdq
from calibrators.qdq_scales import GraphCache
from calibrators.qdq_types import QdqPlan
from trtbuild.core import ort as ort_core

log = logging.getLogger(__name__)

ROUNDINGS = ("nearest", "learned")
_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper's values)


@dataclass(frozen=True)
class AdaRoundConfig:
    """How hard to learn. Defaults: measured on EfficientNet-Lite0 / MiniLM (bench/bench_int8_accuracy.py)."""

    samples: int = 32  # calibration samples whose layer inputs are used
    rows: int = 2048  # sampled rows (conv output positions, Gemm/MatMul rows) per layer
    batch_rows: int = 512  # rows per Adam step
    iterations: int = 300
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second after warm-up
    warmup: float = 0.2  # share of the steps without the rounding regulariser
    # Target W x_fp (True: also undo the input's quantization error, the paper's asymmetric loss) or
    # W x_q (False: only the rounding error of this layer's weights).
    asymmetric: bool = True
    refresh: int = 1  # layers learned between re-runs of the quantized prefix (more: stale inputs, worse)
    # Total seconds; the layers left when it runs out keep round-to-nearest (the first layer always runs).
    budget_s: float = 110.0
    seed: int = 0


@dataclass
class LayerResult:
    weight: str
    nearest_error: float  # relative output MSE on the sampled rows
    learned_error: float
    kept: bool  # learned rounding used (it beat nearest)
    seconds: float


@dataclass
class LearnedRounding:
    """Integer weights (the plan's per-channel scales, int8 grid) by weight name, and what was measured."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # out of time budget
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "learned": sorted(self.weights),
            "skipped_for_time": list(self.skipped),
            "seconds": round(self.seconds, 2),
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
    """Learn the rounding of every int8 weight in ``plan`` (or of the weights named in ``only``) that
    :func:`learnable_layers` accepts.

    ``batches``: calibration feeds (at most ``config.samples`` samples are used). ``progress(done, total)``
    is called after each layer."""
    import torch

    config = config or AdaRoundConfig()
    cache = model if isinstance(model, GraphCache) else GraphCache(model)
    start = time.perf_counter()
    feeds = _take(batches, config.samples)
    int8 = {
        k: w for k, w in plan.weights.items() if w.weight_format == "int8" and (only is None or k in only)
    }
    layers = learnable_layers(cache.model, cache.graph, int8)
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
        _learn_all(cache, plan, layers, feeds, targets, config, threads, progress, result, start)
    finally:
        torch.set_num_threads(torch_threads)
    if result.skipped:
        log.warning(
            "learned rounding ran out of its %.0f s budget: %d layer(s) keep round-to-nearest",
            config.budget_s,
            len(result.skipped),
        )
    result.seconds = time.perf_counter() - start
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
) -> None:
    for first in range(0, len(layers), config.refresh):
        chunk = layers[first : first + config.refresh]
        if result.layers and time.perf_counter() - start > config.budget_s:
            result.skipped += [layer.weight for layer in chunk]
            continue
        # Re-run the graph with every layer learned so far: the chunk's inputs come from that prefix.
        current = replace(plan, rounded_weights={**plan.rounded_weights, **result.weights})
        inputs = _quantized_inputs(cache, current, first, chunk, feeds, config, threads)
        for k, layer in enumerate(chunk):
            if result.layers and time.perf_counter() - start > config.budget_s:
                result.skipped.append(layer.weight)
                continue
            t0 = time.perf_counter()
            scales = np.asarray(plan.weights[layer.weight].scales, np.float32)
            w = cache.graph.constant(layer.weight).astype(np.float32)
            q, nearest_err, learned_err = _learn_layer(
                layer, w, scales, inputs[k], targets[layer.weight], config, first + k
            )
            kept = learned_err < nearest_err
            if kept:
                result.weights[layer.weight] = q
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
                progress(first + k + 1, len(layers))
        del inputs


def _take(batches: Iterable[Mapping[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = []
    have = 0
    for batch in batches:
        if have >= samples:
            break
        keep = min(samples - have, batch_size_of(batch))
        out.append({k: np.asarray(v)[:keep] for k, v in batch.items()})
        have += keep
    return out


def _rows_per_sample(config: AdaRoundConfig, feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    total = sum(batch_size_of(b) for b in feeds)
    return max(1, math.ceil(config.rows / total))


def _run_collect(
    model: onnx.ModelProto,
    semantics: str,
    layers: Sequence[Layer],
    tensors: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: AdaRoundConfig,
    first: int,
    threads: int | None,
    reduce: Callable[[Layer, np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """Sampled rows of each layer's input ``tensors`` over ``feeds``, mapped by ``reduce``; one pass."""
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [t for t in dict.fromkeys(tensors) if t not in graph_inputs]
    sess = ort_core.cpu_session(_prefix(instrument(model, wanted)), semantics, threads) if wanted else None
    per = _rows_per_sample(config, feeds)
    parts: list[list[np.ndarray]] = [[] for _ in layers]
    for b, batch in enumerate(feeds):
        ran = dict(zip(wanted, sess.run(wanted, dict(batch)), strict=True)) if sess else {}
        values = {**{k: np.asarray(v) for k, v in batch.items()}, **ran}
        for i, (layer, t) in enumerate(zip(layers, tensors, strict=True)):
            rows = layer.rows(np.asarray(values[t], np.float32), per, row_rng(config.seed, first + i, b))
            parts[i].append(reduce(layer, rows))
        del ran, values
    return [np.concatenate(p) for p in parts]


def _prefix(model: onnx.ModelProto) -> onnx.ModelProto:
    """Only the nodes its outputs need (the quantized prefix is re-run per chunk: skip the rest)."""
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in model.graph.node
        for a in n.attribute
    ):
        return model  # subgraphs read outer tensors without listing them: keep everything
    producer = {o: n for n in model.graph.node for o in n.output}
    needed: set[int] = set()
    stack = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if t in seen or node is None:
            continue
        seen.add(t)
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    kept = [n for n in model.graph.node if id(n) in needed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _float_targets(
    cache: GraphCache,
    layers: Sequence[Layer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: AdaRoundConfig,
    threads: int | None,
) -> dict[str, np.ndarray]:
    """W x_fp on the sampled rows of every layer ([R, G, O/G]); only the outputs are kept, not the inputs."""

    def output(layer: Layer, rows: np.ndarray) -> np.ndarray:
        w = layer.to_matrix(cache.graph.constant(layer.weight).astype(np.float32))
        return np.einsum("rgi,goi->rgo", rows, w).astype(np.float32)

    acts = [layer.activation for layer in layers]
    values = _run_collect(cache.model, ort_core.REFERENCE, layers, acts, feeds, config, 0, threads, output)
    return {layer.weight: v for layer, v in zip(layers, values, strict=True)}


def _quantized_inputs(
    cache: GraphCache,
    plan: QdqPlan,
    first: int,
    chunk: Sequence[Layer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: AdaRoundConfig,
    threads: int | None,
) -> list[np.ndarray]:
    """The chunk's input rows as the quantized graph (``plan``) feeds them: after their Q/DQ."""
    qmodel = apply_qdq(cache, plan, check=False)
    by_name = {n.name: n for n in qmodel.graph.node}
    tensors = [by_name[layer.node].input[0] for layer in chunk]
    return _run_collect(
        qmodel, ort_core.REFERENCE, chunk, tensors, feeds, config, first, threads, lambda _, r: r
    )


def _learn_layer(
    layer: Layer,
    w: np.ndarray,
    scales: np.ndarray,
    x_q: np.ndarray,
    target: np.ndarray,
    config: AdaRoundConfig,
    index: int,
) -> tuple[np.ndarray, float, float]:
    """(int8 weight in ONNX layout, nearest relative error, learned relative error)."""
    import torch

    qmax = wq.INT8_MAX
    wm = layer.to_matrix(w)  # [G, O, I]
    if not config.asymmetric:
        target = np.einsum("rgi,goi->rgo", x_q, wm).astype(np.float32)
    s = scales.reshape(wm.shape[0], wm.shape[1], 1)
    scaled = wm / s
    floor = np.floor(scaled)
    rest = np.clip(scaled - floor, 1e-4, 1 - 1e-4)
    # The last quarter of the rows (other images: rows are stored sample by sample) only judges the result.
    split = max(1, (3 * x_q.shape[0]) // 4) if x_q.shape[0] > 1 else 1
    x, x_val = torch.from_numpy(x_q[:split]), torch.from_numpy(x_q[split:] if split < x_q.shape[0] else x_q)
    y, y_val = (
        torch.from_numpy(target[:split]),
        torch.from_numpy(target[split:] if split < x_q.shape[0] else target),
    )
    ts = torch.from_numpy(s.astype(np.float32))
    tfloor = torch.from_numpy(floor.astype(np.float32))
    # V such that h(V) = the fractional part: learning starts at the float weight itself.
    v = torch.nn.Parameter(
        torch.from_numpy(-np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1).astype(np.float32))
    )
    opt = torch.optim.Adam([v], lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed * 100_003 + index)
    rows = x.shape[0]
    denom = float((y_val**2).mean()) or 1.0

    def soft() -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def weight(h: torch.Tensor) -> torch.Tensor:
        return torch.clamp(tfloor + h, -qmax, qmax) * ts

    warm = int(config.warmup * config.iterations)
    for step in range(config.iterations):
        pick = torch.randint(rows, (min(config.batch_rows, rows),), generator=gen)
        h = soft()
        out = torch.einsum("rgi,goi->rgo", x[pick], weight(h))
        recon = ((out - y[pick]) ** 2).sum(dim=(1, 2)).mean()
        loss = recon
        if step >= warm:
            frac = (step - warm) / max(1, config.iterations - warm)
            beta = config.beta[1] + 0.5 * (config.beta[0] - config.beta[1]) * (1 + math.cos(math.pi * frac))
            reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
            loss = recon + config.reg_weight * reg
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        hard = (soft() >= 0.5).float()
        learned = torch.clamp(tfloor + hard, -qmax, qmax)
        nearest = torch.clamp(torch.round(torch.from_numpy(scaled.astype(np.float32))), -qmax, qmax)

        def error(q: torch.Tensor) -> float:
            return float(((torch.einsum("rgi,goi->rgo", x_val, q * ts) - y_val) ** 2).mean()) / denom

        q_int = learned.numpy().astype(np.int8)
        return layer.from_matrix(q_int), error(nearest), error(learned)
