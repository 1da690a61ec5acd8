"""SmoothQuant (Xiao et al. 2023) for MatMul/Gemm activation inputs with outlier channels.

A few input channels of a transformer's LayerNorm / GELU outputs are 10-100x larger than the rest, so one
per-tensor INT8 scale leaves the other channels a handful of levels. SmoothQuant moves that range into
the weights, which are quantized per output channel and can take it:

    s_j = max|X_j|^a / max|W_j|^(1 - a),   X' = X / s (folded into the producer),   W' = diag(s) W

The float graph is unchanged (calibrators/smooth_groups.py folds s exactly; no op is added, so the Q/DQ
placement and TensorRT's fusions stay as they were). Here: the statistics (one pass over the calibration
data: a running per-channel max|X| and a bounded sample of rows per tensor) and the choice of alpha per
group, by the consumers' INT8 output error on those rows over a grid; a group that smoothing does not
help stays as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from calibrators import smooth_groups
from calibrators.collect import instrument
from calibrators.graph_index import GraphIndex, ensure_node_names
from calibrators.smooth_groups import Candidate
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # 1.0: MiniLM's GELU outputs (measured)
# auto smooths when some MatMul/Gemm input has a channel whose max|x| is this many times the median
# channel's (MiniLM-L6: 9-60x on LayerNorm and GELU outputs; an image model's Gemm input: ~3x).
OUTLIER_RATIO = 8.0
MIN_GAIN = 0.05  # smoothing a group must cut its consumers' INT8 output error by 5 %
ROWS = 512  # sampled rows (tokens) per tensor for the alpha search: bounded memory
ROWS_PER_BATCH = 64
_AMAX_FRACTIONS = np.linspace(0.2, 1.0, 9)

Feeds = Mapping[str, np.ndarray]


@dataclass
class _Stats:
    """Per-channel max|x| and sampled rows, each kept for two folds (even / odd calibration samples), so
    alpha can be judged on rows its scale was not measured on."""

    channel_max: np.ndarray  # [2, C]: per fold
    rows: list[list[np.ndarray]] = field(default_factory=lambda: [[], []])
    count: list[int] = field(default_factory=lambda: [0, 0])  # rows kept per fold

    def sample(self, fold: int | None = None) -> np.ndarray:
        parts = self.rows[0] + self.rows[1] if fold is None else self.rows[fold]
        return np.concatenate(parts) if parts else np.zeros((0, self.channel_max.shape[1]), np.float32)

    @property
    def overall_max(self) -> np.ndarray:
        return np.asarray(self.channel_max.max(axis=0))


@dataclass(frozen=True)
class SmoothGroup:
    """One smoothed (or deliberately kept) activation and its consumers."""

    tensor: str
    consumers: tuple[str, ...]
    producer: str
    duplicated_producer: bool  # a LayerNormalization copied for the MatMuls (its output has other readers)
    outlier_ratio: float  # max / median of the per-channel max|x|
    alpha: float | None  # None: kept unsmoothed (smoothing did not cut the error by MIN_GAIN)
    error_off: float  # consumers' relative INT8 output error (sum of squares / signal) unsmoothed
    error_on: float  # .. with the chosen alpha (= error_off when kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "consumers": list(self.consumers),
            "producer": self.producer,
            "duplicated_producer": self.duplicated_producer,
            "outlier_ratio": round(self.outlier_ratio, 2),
            "alpha": self.alpha,
            "error_off": self.error_off,
            "error_on": self.error_on,
        }


@dataclass
class SmoothReport:
    """What --smooth-quant decided, recorded in the result JSON / fidelity report."""

    mode: str
    enabled: bool
    reason: str
    groups: list[SmoothGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it cannot be smoothed
    # tensor -> (its group, s) as folded: QAT re-applies the same s to its fine-tuned export (not in JSON)
    scales: dict[str, tuple[Candidate, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def smoothed(self) -> list[SmoothGroup]:
        return [g for g in self.groups if g.alpha is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "enabled": self.enabled,
            "reason": self.reason,
            "smoothed": len(self.smoothed),
            "groups": [g.to_json() for g in self.groups],
            "skipped": dict(self.skipped),
        }


def _measure(
    model: onnx.ModelProto, tensors: list[str], batches: Iterable[Feeds], threads: int | None, seed: int
) -> dict[str, _Stats]:
    """Running per-channel max|x| (last axis) and up to ROWS sampled rows of each tensor, per fold (the
    calibration samples alternate between the two folds)."""
    session = ort_core.cpu_session(instrument(model, tensors), ort_core.REFERENCE, threads)
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    stats: dict[str, _Stats] = {}
    first = 0  # index of the batch's first sample
    for batch in batches:
        for name, value in zip(names, session.run(names, dict(batch)), strict=True):
            v = np.asarray(value, np.float32)
            per_sample = v.reshape(v.shape[0], -1, v.shape[-1])  # [B, tokens, C]
            st = stats.setdefault(name, _Stats(np.zeros((2, v.shape[-1]), np.float32)))
            folds = (first + np.arange(per_sample.shape[0])) % 2
            for fold in (0, 1):
                part = per_sample[folds == fold].reshape(-1, v.shape[-1])
                if not part.shape[0]:
                    continue
                np.maximum(st.channel_max[fold], np.abs(part).max(axis=0), out=st.channel_max[fold])
                take = min(ROWS_PER_BATCH // 2, ROWS // 2 - st.count[fold], part.shape[0])
                if take > 0:
                    st.rows[fold].append(part[rng.choice(part.shape[0], take, replace=False)])
                    st.count[fold] += take
        first += int(np.asarray(next(iter(batch.values()))).shape[0])
    return stats


def _quantize(x: np.ndarray, amax: np.ndarray | float) -> np.ndarray:
    scale = np.asarray(np.maximum(amax, 1e-12) / 127.0, dtype=x.dtype)
    return np.clip(np.round(x / scale), -127, 127) * scale


def _act_amax(x: np.ndarray) -> float:
    """Per-tensor amax of least squared error on ``x`` (as the default mse range method picks)."""
    top = float(np.abs(x).max()) if x.size else 0.0
    best, best_err = top, np.inf
    for amax in top * _AMAX_FRACTIONS:
        err = float(((_quantize(x, amax) - x) ** 2).sum())
        if err < best_err:
            best, best_err = float(amax), err
    return best


def _weight_quantized(w: np.ndarray) -> np.ndarray:
    """(K, N) weight, per output channel (column) symmetric INT8, max range (as the Q/DQ plan does)."""
    return _quantize(w, np.abs(w).max(axis=0, keepdims=True))


def group_error(
    x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, fit: np.ndarray | None = None
) -> float:
    """The consumers' INT8 output error: mean over rows (tokens) of ||xW - Q(x/s) Q(diag(s)W)||^2 / ||xW||^2,
    with the activation amax chosen on ``fit`` rows (default: ``x`` itself). Per token, as the LayerNorm
    after the layer sees it: a sum over all tokens would be ruled by the few tokens with massive
    activations and trade every other token's precision for theirs."""
    scale = (np.ones(x.shape[1]) if s is None else s).astype(np.float32)
    amax = _act_amax((x if fit is None else fit) / scale)
    xq = _quantize(x / scale, amax)  # float32 rows: the search's cost is these products
    signal = np.zeros(x.shape[0])
    noise = np.zeros(x.shape[0])
    for w in weights:
        exact = x @ w.astype(np.float32)
        got = xq @ _weight_quantized(w * scale[:, None]).astype(np.float32)
        signal += (exact**2).sum(axis=1)
        noise += ((exact - got) ** 2).sum(axis=1)
    return float(np.mean(noise / np.maximum(signal, 1e-30)))


def crossfit_error(
    st: _Stats, weights: list[np.ndarray], alpha: float | None, crossfit: bool = True
) -> float:
    """``group_error`` with s and the activation amax measured on one fold and the error on the other,
    both ways, averaged: a scale fitted to the calibration maxima is judged on tokens that did not set
    them (MiniLM-L6: alpha 1.0 normalises every GELU channel to its calibration max, and held-out tokens
    exceed it up to 11x and clip). The rows' own error with fewer than two samples, or ``crossfit`` False."""
    folds = [f for f in (0, 1) if st.count[f]]
    if len(folds) < 2 or not crossfit:
        x = st.sample()
        s = None if alpha is None else smoothing_scale(st.overall_max, weights, alpha)
        return group_error(x, weights, s)
    errors = []
    for fit, test in ((0, 1), (1, 0)):
        s = None if alpha is None else smoothing_scale(st.channel_max[fit], weights, alpha)
        errors.append(group_error(st.sample(test), weights, s, fit=st.sample(fit)))
    return float(np.mean(errors))


def smoothing_scale(channel_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^a / max|W_j|^(1-a), W_j: channel j's row in every consumer; 1 for dead channels."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    x_max = channel_max.astype(np.float64)
    s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
    return np.where((x_max > 0) & (w_max > 0), s, 1.0)


def outlier_ratio(channel_max: np.ndarray) -> float:
    median = float(np.median(channel_max))
    return float(channel_max.max()) / median if median > 0 else 0.0


def _choose(
    cand: Candidate, st: _Stats, weights: list[np.ndarray], crossfit: bool
) -> tuple[SmoothGroup, np.ndarray | None]:
    off = crossfit_error(st, weights, None, crossfit)
    best_alpha, best_err = None, off
    for alpha in ALPHAS:
        err = crossfit_error(st, weights, alpha, crossfit)
        if err < best_err:
            best_alpha, best_err = alpha, err
    if best_err > off * (1 - MIN_GAIN):
        best_alpha, best_err = None, off
    best_s = None if best_alpha is None else smoothing_scale(st.overall_max, weights, best_alpha)
    group = SmoothGroup(
        cand.tensor,
        tuple(c.node for c in cand.consumers),
        cand.producer,
        cand.duplicate and best_s is not None,
        outlier_ratio(st.overall_max),
        best_alpha,
        off,
        best_err,
    )
    return group, best_s


def _weights(g: GraphIndex, cand: Candidate) -> list[np.ndarray]:
    """Each consumer's weight as (K in, N out)."""
    out = []
    for c in cand.consumers:
        w = g.constant(c.weight).astype(np.float64)
        out.append(w.T if c.transposed else w)
    return out


def smooth(
    model: onnx.ModelProto,
    batches: Iterable[Feeds],
    mode: str,
    quantized: set[str],
    *,
    threads: int | None = None,
    seed: int = 0,
    crossfit: bool = True,
) -> tuple[onnx.ModelProto, SmoothReport]:
    """``model`` with SmoothQuant folded into the groups where it helps (``mode`` on, or auto and some
    input has outlier channels), and the report; ``quantized``: the activations that will get Q/DQ.
    ``crossfit`` False judges alpha on the rows that set the scale (the former choice; for the bench)."""
    if mode not in MODES:
        raise TrtbuildError(f"unknown --smooth-quant '{mode}'", f"use one of {', '.join(MODES)}")
    if mode == "off":
        return model, SmoothReport(mode, False, "off")
    model = ensure_node_names(model)  # groups name their producer and consumers
    candidates, skipped = smooth_groups.find_candidates(model, quantized)
    if not candidates:
        if mode == "on":
            detail = (
                f" ({len(skipped)} MatMul/Gemm inputs skipped: {next(iter(skipped.values()))})"
                if skipped
                else ""
            )
            raise TrtbuildError(
                f"--smooth-quant on: the model has no MatMul/Gemm activation input whose producer can "
                f"absorb a per-channel scale{detail}",
                "use --smooth-quant auto or off for this model",
            )
        return model, SmoothReport(mode, False, "no smoothable MatMul/Gemm activation inputs", [], skipped)
    stats = _measure(model, [c.tensor for c in candidates], batches, threads, seed)
    ratios = {c.tensor: outlier_ratio(stats[c.tensor].overall_max) for c in candidates}
    worst = max(ratios.values())
    if mode == "auto" and worst < OUTLIER_RATIO:
        reason = f"no outlier channels (largest max/median channel ratio {worst:.1f} < {OUTLIER_RATIO:g})"
        return model, SmoothReport(mode, False, reason, [], skipped)
    groups, scales = [], {}
    index = GraphIndex(model)
    for cand in candidates:
        group, s = _choose(cand, stats[cand.tensor], _weights(index, cand), crossfit)
        groups.append(group)
        if s is not None:
            scales[cand.tensor] = (cand, s)
    reason = "on" if mode == "on" else f"outlier channels (max/median channel ratio up to {worst:.1f})"
    log.info(
        "SmoothQuant: %d of %d MatMul/Gemm inputs smoothed, %d skipped",
        len(scales),
        len(groups),
        len(skipped),
    )
    return smooth_groups.apply(model, scales), SmoothReport(mode, True, reason, groups, skipped, scales)


def for_quantize(
    model: onnx.ModelProto,
    batches: Iterable[Feeds],
    mode: str,
    quantized: set[str],
    *,
    activation_type: str,
    ranges_given: bool,
    threads: int | None,
    seed: int,
) -> tuple[onnx.ModelProto, SmoothReport]:
    """quantize()'s step: smooth before calibrating, so the ranges are measured on the smoothed graph."""
    if mode not in MODES:
        raise TrtbuildError(f"unknown --smooth-quant '{mode}'", f"use one of {', '.join(MODES)}")
    if ranges_given:
        if mode == "on":
            raise TrtbuildError(
                "--smooth-quant on with given ranges: they belong to the unsmoothed graph",
                "calibrate instead of passing ranges, or use --smooth-quant off",
            )
        return model, SmoothReport(mode, False, "ranges given (they belong to the unsmoothed graph)")
    if mode == "auto" and activation_type == "fp8":
        return model, SmoothReport(mode, False, "FP8 keeps outlier channels (its steps grow with magnitude)")
    return smooth(model, batches, mode, quantized, threads=threads, seed=seed)
