"""An ONNX graph evaluated with torch ops, for the gradients ONNX Runtime cannot give.

Learned rounding weights each layer's output error by how much the model's outputs depend on it
(calibrators/adaround_fisher.py); that needs d(outputs)/d(layer output), i.e. a backward pass through the
float graph. This evaluates the graph node by node with torch (float32, one thread as the caller sets it),
so autograd can differentiate it. It covers the ops of exported CNNs and MLPs, including the shape
arithmetic the TorchScript exporter writes around "same" padding; a graph with any other op raises
:class:`Unsupported` and the caller goes without the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

Tensor = Any  # torch.Tensor (torch is imported lazily, as in calibrators/adaround.py)
Op = Callable[[list[Tensor], dict[str, Any]], Tensor]


class Unsupported(Exception):
    """The graph has an op (or an attribute of one) this evaluator does not implement."""


def _torch() -> Any:
    import torch

    return torch


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _dtype(onnx_type: int) -> Any:
    torch = _torch()
    table: dict[int, Any] = {
        onnx.TensorProto.FLOAT: torch.float32,
        onnx.TensorProto.DOUBLE: torch.float64,
        onnx.TensorProto.FLOAT16: torch.float16,
        onnx.TensorProto.INT64: torch.int64,
        onnx.TensorProto.INT32: torch.int32,
        onnx.TensorProto.BOOL: torch.bool,
    }
    if onnx_type not in table:
        raise Unsupported(f"Cast to ONNX type {onnx_type}")
    return table[onnx_type]


def _constant(_: list[Tensor], a: dict[str, Any]) -> Tensor:
    if "value" not in a:
        raise Unsupported("Constant without a tensor value")
    return _torch().from_numpy(np.array(numpy_helper.to_array(a["value"])))


def _constant_of_shape(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    value = np.array(numpy_helper.to_array(a["value"])) if "value" in a else np.zeros(1, np.float32)
    return _torch().full(_ints(x[0]), value.reshape(-1)[0].item(), dtype=_torch().from_numpy(value).dtype)


def _gather(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    data, idx = x
    axis = int(a.get("axis", 0)) % data.dim()
    flat = idx.reshape(-1).long() % data.shape[axis]
    out = data.index_select(axis, flat)
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _axes(x: list[Tensor], a: dict[str, Any]) -> list[int]:
    return _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("axes", []))


def _unsqueeze(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    out = x[0]
    rank = out.dim() + len(_axes(x, a))
    for axis in sorted(v % rank for v in _axes(x, a)):
        out = out.unsqueeze(axis)
    return out


def _squeeze(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    axes = _axes(x, a)
    if not axes:
        return x[0].squeeze()
    out = x[0]
    for axis in sorted((v % out.dim() for v in axes), reverse=True):
        out = out.squeeze(axis)
    return out


def _slice(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= data.dim()
        picked = list(range(data.shape[axis]))[slice(start, end, step)]  # Python clamps as ONNX does
        data = data.index_select(axis, _torch().tensor(picked, dtype=_torch().long))
    return data


def _reshape(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    shape = _ints(x[1])
    if not int(a.get("allowzero", 0)):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


def _pad(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise Unsupported(f"Pad mode {a['mode']!r}")
    data = x[0]
    pads = _ints(x[1]) if len(x) > 1 else list(a["pads"])
    value = float(x[2].reshape(-1)[0]) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(data.dim()))
    n = len(axes)
    per_axis = {ax % data.dim(): (pads[i], pads[i + n]) for i, ax in enumerate(axes)}
    flat: list[int] = []
    for axis in reversed(range(data.dim())):  # torch pads the last axis first
        flat += list(per_axis.get(axis, (0, 0)))
    return _torch().nn.functional.pad(data, flat, value=value)


def _conv(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    data, w = x[0], x[1]
    if w.dim() != 4 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported("Conv other than 2-D with explicit pads")
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    data = _torch().nn.functional.pad(data, [left, right, top, bottom])
    return _torch().nn.functional.conv2d(
        data,
        w,
        x[2] if len(x) > 2 else None,
        stride=list(a.get("strides", [1, 1])),
        dilation=list(a.get("dilations", [1, 1])),
        groups=int(a.get("group", 1)),
    )


def _clip(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return x[0].clamp(None if lo is None else float(lo), None if hi is None else float(hi))


def _gemm(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    m, w = x[0], x[1]
    m = m.t() if int(a.get("transA", 0)) else m
    w = w.t() if int(a.get("transB", 0)) else w
    out = float(a.get("alpha", 1.0)) * (m @ w)
    if len(x) > 2 and x[2] is not None:
        out = out + float(a.get("beta", 1.0)) * x[2]
    return out


def _reduce_mean(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    axes = _axes(x, a) or list(range(x[0].dim()))
    return x[0].mean(dim=axes, keepdim=bool(int(a.get("keepdims", 1))))


def _flatten(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    axis = int(a.get("axis", 1)) % max(1, x[0].dim())
    return x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)


def _transpose(x: list[Tensor], a: dict[str, Any]) -> Tensor:
    return x[0].permute(list(a.get("perm", reversed(range(x[0].dim())))))


OPS: dict[str, Op] = {
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Shape": lambda x, a: _torch().tensor(list(x[0].shape), dtype=_torch().int64),
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda x, a: _torch().cat(list(x), dim=int(a["axis"])),
    "Slice": _slice,
    "Transpose": _transpose,
    "Cast": lambda x, a: x[0].to(_dtype(int(a["to"]))),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Identity": lambda x, a: x[0],
    "Pad": _pad,
    "Conv": _conv,
    "Clip": _clip,
    "Relu": lambda x, a: x[0].relu(),
    "Sigmoid": lambda x, a: x[0].sigmoid(),
    "Tanh": lambda x, a: x[0].tanh(),
    "Add": lambda x, a: x[0] + x[1],
    "Sub": lambda x, a: x[0] - x[1],
    "Mul": lambda x, a: x[0] * x[1],
    "Div": lambda x, a: x[0] / x[1],
    "MatMul": lambda x, a: x[0] @ x[1],
    "Gemm": _gemm,
    "GlobalAveragePool": lambda x, a: x[0].mean(dim=list(range(2, x[0].dim())), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Softmax": lambda x, a: x[0].softmax(int(a.get("axis", -1))),
}


def check_supported(model: onnx.ModelProto) -> None:
    """Raise :class:`Unsupported` naming the first op this evaluator lacks (before any data runs)."""
    for node in model.graph.node:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"op {node.domain + '.' if node.domain else ''}{node.op_type} ({node.name})")


def run(
    model: onnx.ModelProto, feeds: Mapping[str, Tensor], keep: Sequence[str] = (), track_weights: bool = False
) -> dict[str, Tensor]:
    """The graph outputs and the tensors in ``keep`` for torch ``feeds`` (autograd follows feeds that
    require grad; ``track_weights``: also the float initializers, for graphs whose inputs are ids)."""
    check_supported(model)
    torch = _torch()
    values: dict[str, Tensor] = {}
    for init in model.graph.initializer:
        t = torch.from_numpy(np.array(numpy_helper.to_array(init)))
        values[init.name] = t.requires_grad_(True) if track_weights and t.is_floating_point() else t
    values.update(feeds)
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = [values[i] if i else None for i in node.input]
        values[node.output[0]] = OPS[node.op_type](inputs, attrs)
    wanted = [o.name for o in model.graph.output] + list(keep)
    return {t: values[t] for t in dict.fromkeys(wanted)}
