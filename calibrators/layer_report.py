"""Per-layer accuracy of a Q/DQ model: each quantized layer's SQNR alone and cumulative (AIMET's quant
analyzer, in two ORT runs instead of one per layer).

- cumulative: the layer's output in the fully quantized graph against FP32. Only the layers upstream of
  it can change that output, so this is "every layer up to it quantized".
- alone: a copy of the layer, with its INT8 weights and the same activation Q/DQ, fed the FP32 values of
  its inputs, against its FP32 output: the damage this layer's own quantization does.

Every copy lives in one extended graph next to the quantized model, so one FP32 run (extra outputs) and
one run of that graph give every number, always under reference Q/DQ semantics (trtbuild/core/ort.py).
An input that is not quantized directly at the layer (e.g. through a Pad fed by a Q/DQ) is fed in FP32.
Histograms of the worst layers' inputs come from calibration (calibrators/histogram.py), with the
range the Q/DQ uses, so one can see what the chosen amax clips.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from calibrators.collect import instrument
from calibrators.histogram import TensorStats
from calibrators.qdq import QdqPlan, ensure_node_names
from trtbuild.core import ort as ort_core

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]
ALONE = "__alone"  # suffix of the copies' nodes and output tensors
FED = "__fp32"  # suffix of the graph inputs that feed them FP32 values
DEFAULT_SAMPLES = 8  # held-out samples the report runs: SQNR over 8 images is stable to ~0.1 dB
WORST = 5


@dataclass(frozen=True)
class LayerAccuracy:
    """One quantized layer."""

    node: str
    op_type: str
    output: str
    input: str | None  # the quantized activation it reads (its histogram is drawn for the worst layers)
    sqnr_alone_db: float
    sqnr_cumulative_db: float
    range_lo: float | None = None  # what the input's Q/DQ represents: (qmin - zp) * scale ..
    range_hi: float | None = None  # .. (qmax - zp) * scale
    clipped: float | None = None  # share of calibration values of the input beyond that range

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


@dataclass
class LayerReport:
    layers: list[LayerAccuracy]  # graph order
    samples: int
    seconds: float
    semantics: str = ort_core.REFERENCE
    histograms: dict[str, TensorStats] = field(default_factory=dict)  # input tensor -> calibration stats

    def worst(self, n: int = WORST) -> list[LayerAccuracy]:
        """The ``n`` layers whose own quantization hurts most (lowest SQNR alone)."""
        return sorted(self.layers, key=lambda layer: layer.sqnr_alone_db)[:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "semantics": self.semantics,
            "seconds": round(self.seconds, 2),
            "worst": [layer.node for layer in self.worst()],
            "layers": [layer.to_json() for layer in self.layers],
        }


def _finite(value: Any) -> Any:
    """JSON has no inf: an exact layer (no noise) is reported as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from initializers alone (weights and their DequantizeLinear outputs)."""
    known = {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # nodes are in topological order
        if all(not t or t in known for t in node.input):
            known.update(node.output)
    return known


def _qdq_source(model: onnx.ModelProto, tensor: str) -> tuple[str, str, str] | None:
    """(quantized tensor, scale, zero point) when ``tensor`` is an activation DequantizeLinear output."""
    producers = {o: n for n in model.graph.node for o in n.output}
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.input[0], q.input[1], q.input[2] if len(q.input) > 2 else ""


@dataclass
class _Extended:
    model: onnx.ModelProto
    fp32_inputs: list[str]  # FP32 tensors to feed (graph input name = tensor + FED)
    watched: list[str]  # outputs of the quantized layers (FP32 and cumulative)


def _extend(qmodel: onnx.ModelProto, fp32: onnx.ModelProto, nodes: Sequence[str]) -> _Extended:
    """The quantized model plus, per layer in ``nodes``, its "alone" copy fed FP32 inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(qmodel)
    q_nodes = {n.name: n for n in model.graph.node}
    fp_nodes = {n.name: n for n in fp32.graph.node}
    constant = _constant_tensors(model)
    fed: dict[str, str] = {}  # FP32 tensor -> its graph input
    chains: dict[tuple[str, str, str], str] = {}  # (tensor, scale, zp) -> re-quantized FP32 input
    added: list[onnx.NodeProto] = []
    for name in nodes:
        q_node, fp_node = q_nodes[name], fp_nodes[name]
        inputs = []
        for q_in, fp_in in zip(q_node.input, fp_node.input, strict=True):
            if not q_in or q_in in constant:
                inputs.append(q_in)  # weights (already INT8-dequantized), biases, empty optionals
                continue
            if fp_in not in fed:
                fed[fp_in] = fp_in + FED
                model.graph.input.append(
                    helper.make_tensor_value_info(fed[fp_in], onnx.TensorProto.FLOAT, None)
                )
            source = _qdq_source(model, q_in)
            if source is None:  # not quantized at this layer: fed in FP32
                inputs.append(fed[fp_in])
                continue
            key = (fp_in, source[1], source[2])
            if key not in chains:
                tag = f"{fp_in}{FED}{len(chains)}"
                zp = [source[2]] if source[2] else []
                added.append(helper.make_node("QuantizeLinear", [fed[fp_in], source[1], *zp], [tag + "_q"]))
                added.append(
                    helper.make_node("DequantizeLinear", [tag + "_q", source[1], *zp], [tag + "_dq"])
                )
                chains[key] = tag + "_dq"
            inputs.append(chains[key])
        copy = onnx.NodeProto()
        copy.CopyFrom(q_node)
        copy.name = name + ALONE
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.extend(o + ALONE if o else "" for o in q_node.output)
        added.append(copy)
    model.graph.node.extend(added)
    watched = [q_nodes[n].output[0] for n in nodes]
    return _Extended(instrument(model, [*watched, *(w + ALONE for w in watched)]), list(fed), watched)


def _first_samples(batches: Sequence[Feeds], n: int) -> list[Feeds]:
    chosen: list[Feeds] = []
    count = 0
    for batch in batches:
        if count >= n:
            break
        chosen.append(batch)
        count += int(np.asarray(next(iter(batch.values()))).shape[0])
    return chosen


def _input_range(plan: QdqPlan, tensor: str | None) -> tuple[float | None, float | None]:
    act = plan.activations.get(tensor or "")
    if act is None:
        return None, None
    qmin, qmax = (-128, 127) if act.dtype == "int8" else (0, 255)
    return (qmin - act.zero_point) * act.scale, (qmax - act.zero_point) * act.scale


def _clipped(stats: TensorStats | None, lo: float | None, hi: float | None) -> float | None:
    """Share of |x| above the range's magnitude (the histogram is of |x|; min/max bound the rest)."""
    if stats is None or lo is None or hi is None or stats.count == 0:
        return None
    points, cumulative = stats.abs_cdf()
    limit = max(abs(lo), abs(hi))
    return float(1.0 - np.interp(limit, points, cumulative) / stats.count)


def analyze(
    model: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    plan: QdqPlan,
    batches: Sequence[Feeds],
    stats: Mapping[str, TensorStats] | None = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    threads: int | None = None,
) -> LayerReport:
    """SQNR alone and cumulative of every quantized layer of ``qmodel`` (made from ``model`` by ``plan``)
    on the first ``samples`` samples of ``batches``; ``stats``: calibration histograms by tensor."""
    start = time.perf_counter()
    fp32 = ensure_node_names(model)  # the names apply_qdq gave the quantized graph's nodes
    present = {n.name for n in qmodel.graph.node}
    nodes = [n for n in plan.quantized_nodes if n in present]
    ext = _extend(qmodel, fp32, nodes)
    graph_inputs = {i.name for i in fp32.graph.input}
    fp32_wanted = list(dict.fromkeys([*ext.fp32_inputs, *ext.watched]))
    fp32_sess = ort_core.cpu_session(instrument(fp32, fp32_wanted), ort_core.REFERENCE, threads)
    fp32_names = [o.name for o in fp32_sess.get_outputs()]
    q_sess = ort_core.cpu_session(ext.model, ort_core.REFERENCE, threads)
    q_names = [o.name for o in q_sess.get_outputs()]
    signal = dict.fromkeys(ext.watched, 0.0)
    noise_alone, noise_cum = dict(signal), dict(signal)
    count = 0
    for feeds in _first_samples(batches, samples):
        ref = dict(zip(fp32_names, fp32_sess.run(fp32_names, dict(feeds)), strict=True))
        ref.update({k: np.asarray(v) for k, v in feeds.items() if k in graph_inputs})
        q_feeds = {**feeds, **{t + FED: ref[t] for t in ext.fp32_inputs}}
        got = dict(zip(q_names, q_sess.run(q_names, q_feeds), strict=True))
        for t in ext.watched:
            r = ref[t].astype(np.float64)
            signal[t] += float((r**2).sum())
            noise_alone[t] += float(((r - got[t + ALONE]) ** 2).sum())
            noise_cum[t] += float(((r - got[t]) ** 2).sum())
        count += int(np.asarray(next(iter(feeds.values()))).shape[0])
    by_name = {n.name: n for n in fp32.graph.node}
    layers = []
    for name, out in zip(nodes, ext.watched, strict=True):
        act_in = next((t for t in by_name[name].input if t in plan.activations), None)
        lo, hi = _input_range(plan, act_in)
        layers.append(
            LayerAccuracy(
                name,
                plan.node_types.get(name, by_name[name].op_type),
                out,
                act_in,
                _sqnr(signal[out], noise_alone[out]),
                _sqnr(signal[out], noise_cum[out]),
                lo,
                hi,
                _clipped((stats or {}).get(act_in or ""), lo, hi),
            )
        )
    report = LayerReport(layers, count, time.perf_counter() - start)
    worst_inputs = [layer.input for layer in report.worst() if layer.input is not None]
    report.histograms = {t: stats[t] for t in worst_inputs if stats and t in stats}
    log.info("per-layer report: %d layers on %d samples in %.1f s", len(layers), count, report.seconds)
    return report
