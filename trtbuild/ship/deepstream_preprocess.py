"""Calibration preprocessing as nvinfer expresses it, and the graph change that makes it exact.

nvinfer feeds ``y = net-scale-factor * (x - offsets[c])`` for 0..255 pixels ``x``: one scale for all
channels. Calibration fed ``y = (x * scale - mean[c]) / std[c]``, so ``offsets[c] = mean[c] / scale`` and,
when the std is the same for every channel, ``net-scale-factor = scale / std``. With per-channel std (the
ImageNet default) no single factor is exact, so nvinfer gets ``scale / mean(std)`` and the graph gains one
``Mul`` by ``mean(std) / std[c]`` in front: the tensor the rest of the graph (its Q/DQ nodes, the
calibration cache) knows by the input's name is then exactly the calibrated input again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators.preprocess import Preprocess
from trtbuild.core.errors import TrtbuildError

RAW_SUFFIX = "__nvinfer"  # the new graph input: what nvinfer feeds


@dataclass(frozen=True)
class NvinferPreprocess:
    net_scale_factor: float
    offsets: tuple[float, ...]
    color_format: str  # "rgb" | "gray"
    input_order: str  # "NCHW" | "NHWC"
    channel_scale: tuple[float, ...] | None  # folded into the graph when std differs per channel


def nvinfer_preprocess(pre: Preprocess) -> NvinferPreprocess:
    if pre.dtype != "float32" and pre.dtype != "float16":
        raise TrtbuildError(
            f"nvinfer feeds float tensors, but calibration fed {pre.dtype} images",
            "calibrate with --dtype float32 for a DeepStream model",
        )
    mean = _per_channel(pre.mean, pre.channels)
    std = _per_channel(pre.std, pre.channels)
    offsets = tuple(m / pre.scale for m in mean)
    if len(set(std)) == 1:
        return NvinferPreprocess(pre.scale / std[0], offsets, _color(pre), pre.layout, None)
    ref = float(np.mean(std))
    return NvinferPreprocess(pre.scale / ref, offsets, _color(pre), pre.layout, tuple(ref / s for s in std))


def fold_channel_scale(
    src: str | os.PathLike[str], dest: str | os.PathLike[str], input_name: str, pre: NvinferPreprocess
) -> Path:
    """Write ``src`` with ``input_name`` fed through ``Mul(channel_scale)`` from a new input
    ``<input_name>__nvinfer``; the original tensor name now names the Mul's output."""
    assert pre.channel_scale is not None
    model = onnx.load(str(src))
    value = next((v for v in model.graph.input if v.name == input_name), None)
    if value is None:
        raise TrtbuildError(
            f"{Path(src).name} has no input '{input_name}'", "pass the graph made from this model"
        )
    raw = input_name + RAW_SUFFIX
    elem = value.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    shape = (-1, 1, 1) if pre.input_order == "NCHW" else (1, 1, -1)
    factor = numpy_helper.from_array(
        np.asarray(pre.channel_scale, dtype).reshape(shape), name=f"{input_name}__channel_scale"
    )
    value.name = raw
    model.graph.initializer.append(factor)
    model.graph.node.insert(
        0, helper.make_node("Mul", [raw, factor.name], [input_name], name=f"{input_name}__nvinfer_std")
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return Path(dest)


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return values * channels if len(values) == 1 else values


def _color(pre: Preprocess) -> str:
    return "rgb" if pre.channels == 3 else "gray"  # Preprocess reads images as RGB (or L)
