"""One weighted layer as a grouped matrix product, for learned rounding (calibrators/adaround.py).

Conv (2-D), Gemm and MatMul with a constant weight all become Y[r, g, o] = sum_i X[r, g, i] W[g, o, i]
over sampled rows r: output positions of a conv (its input patches gathered at those positions) or rows of
a Gemm/MatMul. Rows are sampled, not all kept, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from calibrators.graph_index import GraphIndex
from calibrators.qdq_types import WeightQdq


@dataclass(frozen=True)
class Layer:
    """A weighted node whose weight rounding can be learned."""

    weight: str
    node: str
    op_type: str
    activation: str  # the node's data input (in the float graph)
    attrs: Mapping[str, Any]
    shape: tuple[int, ...]  # the weight's ONNX shape
    axis: int  # the per-channel axis

    @property
    def groups(self) -> int:
        return int(self.attrs.get("group", 1)) if self.op_type == "Conv" else 1

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """The ONNX weight as [G, O/G, I] (I: input channels per group x kernel taps)."""
        if self.op_type == "Conv":
            g = self.groups
            return w.reshape(g, w.shape[0] // g, -1)
        if self.op_type == "Gemm" and int(self.attrs.get("transB", 0)):
            return w[None]
        return w.T[None]  # Gemm without transB, MatMul: [K, N]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        if self.op_type == "Conv":
            return m.reshape(self.shape)
        if self.op_type == "Gemm" and int(self.attrs.get("transB", 0)):
            return m[0]
        return m[0].T

    def rows(self, x: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` sampled rows of the layer's input per sample of ``x``: [N*count, G, I]."""
        if self.op_type == "Conv":
            return _conv_rows(x, self, count, rng)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        pick = np.stack([rng.choice(flat.shape[1], min(count, flat.shape[1]), replace=False) for _ in flat])
        rows = np.take_along_axis(flat, pick[:, :, None], axis=1)
        return rows.reshape(-1, 1, x.shape[-1]).astype(np.float32)


def _conv_rows(x: np.ndarray, layer: Layer, count: int, rng: np.random.Generator) -> np.ndarray:
    kh, kw = layer.shape[2], layer.shape[3]
    strides = list(layer.attrs.get("strides", [1, 1]))
    dil = list(layer.attrs.get("dilations", [1, 1]))
    pads = list(layer.attrs.get("pads", [0, 0, 0, 0]))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (xp.shape[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (xp.shape[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    n = x.shape[0]
    per = min(count, out_h * out_w)
    pos = np.stack([rng.choice(out_h * out_w, per, replace=False) for _ in range(n)])  # [N, P]
    oy, ox = (pos // out_w) * strides[0], (pos % out_w) * strides[1]
    batch = np.arange(n)[:, None]
    taps = [xp[batch, :, oy + i * dil[0], ox + j * dil[1]] for i in range(kh) for j in range(kw)]  # [N,P,C]
    patches = np.stack(taps, axis=-1)  # [N, P, C, kh*kw]; C-major then taps, as the weight flattens
    g = layer.groups
    return patches.reshape(n * per, g, -1).astype(np.float32)


def learnable_layers(model: onnx.ModelProto, g: GraphIndex, weights: Mapping[str, WeightQdq]) -> list[Layer]:
    """The planned weights whose rounding can be learned, in graph order: one consumer, a 2-D Conv, a Gemm
    without transA, or a MatMul whose weight is its second input."""
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    out: list[Layer] = []
    for name, wplan in weights.items():
        if len(wplan.consumers) != 1:
            continue  # a shared weight's rounding cannot serve two different inputs
        node_name, idx = wplan.consumers[0]
        node = g.by_name[node_name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape = tuple(g.constant(name).shape)
        ok = (
            (node.op_type == "Conv" and idx == 1 and len(shape) == 4)
            or (node.op_type == "Gemm" and idx == 1 and len(shape) == 2 and not int(attrs.get("transA", 0)))
            or (node.op_type == "MatMul" and idx == 1 and len(shape) == 2)
        )
        if ok:
            out.append(Layer(name, node_name, node.op_type, node.input[0], attrs, shape, wplan.axis))
    return sorted(out, key=lambda layer: order[layer.node])


def row_rng(seed: int, layer: int, batch: int) -> np.random.Generator:
    """The same rows for the float and the quantized pass of one layer and batch."""
    return np.random.default_rng([seed, layer, batch])


def batch_size_of(batch: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0])


def names(layers: Sequence[Layer]) -> list[str]:
    return [layer.weight for layer in layers]
