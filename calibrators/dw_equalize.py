"""Per-channel equalization of depthwise-conv inputs (``--equalize-depthwise``).

TensorRT quantizes an activation with one scale per tensor. A depthwise conv reads each input channel on
its own, so when the channels' ranges differ by 10-100x (PP-OCR's LCNet: a learnable affine after each
HardSwish), the small channels get a handful of int8 levels and no choice of amax helps: on the PP-OCRv4
detector, keeping the depthwise convs float lifts the output cosine from 0.91 to 0.97.

The fix keeps them int8 and exact in float: for a depthwise conv (group == input channels) reading x,

    y[o] = sum_k w[o, k] x[c(o), k]  ==  sum_k (w[o, k] s[c]) (x[c, k] / s[c])

so a Mul by 1/s (s[c] = the channel's calibration max over the tensor's max) goes in front of the conv
and its weights are scaled by s per output channel; every channel then spans the same range, and the
per-channel weight quantization sees only a scaled channel (same relative error). In TensorRT the Mul is
a pointwise op fused into the producer's epilogue. Other readers of x keep reading x unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators.collect import instrument
from calibrators.graph_index import GraphIndex, copy_model, ensure_node_names
from trtbuild.core import ort as ort_core

log = logging.getLogger(__name__)

MIN_SCALE = 1e-4  # a channel near zero is not blown up further than this (its values are noise)
SAMPLES = 32  # calibration samples the channel maxima are measured on
MIN_SPREAD = 2.0  # equalize only where the largest channel max is this many times the median one
SUFFIX = ".dw_equalized"


def count_depthwise(model: onnx.ModelProto) -> int:
    """How many depthwise convs ``model`` has (what a failed gate's hint names)."""
    return len(depthwise_convs(model, GraphIndex(model)))


def depthwise_convs(model: onnx.ModelProto, g: GraphIndex) -> list[onnx.NodeProto]:
    """2-D Convs with one input channel per group and a constant weight."""
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or not g.is_constant(node.input[1]):
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = g.constant(node.input[1])
        if group > 1 and w.ndim == 4 and w.shape[1] == 1 and w.shape[0] % group == 0:
            out.append(node)
    return out


def channel_absmax(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    threads: int | None,
) -> dict[str, np.ndarray]:
    """max |x| per channel (axis 1) of each tensor over ``batches`` (one float pass)."""
    inputs = {i.name for i in model.graph.input}
    wanted = [t for t in tensors if t not in inputs]
    sess = ort_core.cpu_session(instrument(model, wanted), ort_core.REFERENCE, threads) if wanted else None
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        values = dict(zip(wanted, sess.run(wanted, dict(batch)), strict=True)) if sess else {}
        values.update({k: np.asarray(v) for k, v in batch.items()})
        for t in tensors:
            x = np.abs(np.asarray(values[t], np.float32))
            m = x.max(axis=tuple(i for i in range(x.ndim) if i != 1))
            out[t] = m if t not in out else np.maximum(out[t], m)
    return out


def equalize_depthwise(
    model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]], threads: int | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose depthwise convs with unbalanced input channels (on ``batches``) read an
    equalized input; also the names of the convs changed. The float function is unchanged."""
    model = ensure_node_names(copy_model(model))
    g = GraphIndex(model)
    convs = depthwise_convs(model, g)
    maxima = channel_absmax(model, list(dict.fromkeys(n.input[0] for n in convs)), batches, threads)
    changed: list[str] = []
    new_nodes: dict[str, onnx.NodeProto] = {}  # conv name -> its Mul, inserted just before it
    for node in convs:
        m = maxima[node.input[0]].astype(np.float64)
        top = float(m.max()) if m.size else 0.0
        if top <= 0.0 or top < MIN_SPREAD * float(np.median(m)):
            continue
        s = np.maximum(m / top, MIN_SCALE)
        w = g.constant(node.input[1]).astype(np.float32)
        per_out = np.repeat(s, w.shape[0] // s.size).astype(np.float32)
        scaled = (w * per_out[:, None, None, None]).astype(np.float32)
        weight_name = f"{node.input[1]}{SUFFIX}"  # a new initializer: a shared weight stays as it is
        model.graph.initializer.append(numpy_helper.from_array(scaled, weight_name))
        inv_name = f"{node.name}{SUFFIX}.inv_scale"
        inv = (1.0 / s).astype(np.float32).reshape(1, -1, *([1] * 2))
        model.graph.initializer.append(numpy_helper.from_array(inv, inv_name))
        x_eq = f"{node.input[0]}{SUFFIX}.{node.name}"
        new_nodes[node.name] = helper.make_node(
            "Mul", [node.input[0], inv_name], [x_eq], name=f"{node.name}{SUFFIX}"
        )
        node.input[0] = x_eq
        node.input[1] = weight_name
        changed.append(node.name)
    if new_nodes:
        ordered = []
        for node in model.graph.node:
            if node.name in new_nodes:
                ordered.append(new_nodes[node.name])
            ordered.append(node)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
        _drop_unread(model)
        log.info(f"equalized the input channels of {len(changed)} of {len(convs)} depthwise convs")
    return model, changed


def _drop_unread(model: onnx.ModelProto) -> None:
    """Remove the weights (initializers or Constant nodes) that no node reads any more."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in read]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    inits = [i for i in model.graph.initializer if i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
