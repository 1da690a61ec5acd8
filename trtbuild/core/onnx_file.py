"""The one checked way a command reads a model file: one error line for a missing, unreadable, truncated,
empty or invalid ONNX file, before any work starts (plan, bundle create, calibrate and quantize use it;
`prepare` adds its own preparation on top)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trtbuild.core.errors import TrtbuildError


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def load_model_file(
    path: str | os.PathLike[str], *, external_data: bool = True, label: str = "model"
) -> onnx.ModelProto:
    """Read and check ``path``; raise :class:`TrtbuildError` naming the problem and the fix."""
    file = Path(path)
    if file.is_dir():
        raise TrtbuildError(
            f"{label} '{file}' is a folder, not an .onnx file", "pass the path of the .onnx file"
        )
    if not file.is_file():
        raise TrtbuildError(f"{label} '{file}' does not exist", "check the path")
    try:
        model = onnx.load(str(file), load_external_data=external_data)
    except Exception as exc:  # protobuf's DecodeError, OSError for missing external data, ...
        raise TrtbuildError(
            f"{label} '{file}' is not a readable ONNX file ({type(exc).__name__}: {_first_line(exc)})",
            "pass a complete .onnx file (and its .data file if it has external data)",
        ) from exc
    if not model.graph.node or not model.graph.output:
        raise TrtbuildError(
            f"{label} '{file}' holds no graph (no nodes or no outputs: an empty or truncated file?)",
            "re-export the model",
        )
    # Structure, not onnx.checker: the checker also refuses graphs ORT and TensorRT run fine (an output
    # declared without a shape), and third-party files are often like that.
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    known |= {o for node in model.graph.node for o in node.output}
    dangling = sorted({t for node in model.graph.node for t in node.input if t and t not in known})
    if dangling:
        raise TrtbuildError(
            f"{label} '{file}' is not a valid ONNX graph (tensor(s) {', '.join(dangling[:3])} are read but "
            "never produced)",
            "re-export it, or run `trtbuild prepare` and fix what the checker names",
        )
    return model


def qdq_scale_type(model: onnx.ModelProto) -> int | None:
    """The element type of a Q/DQ graph's scales (FLOAT, or FLOAT16 when its float parts are FP16), or
    None for a graph without Q/DQ."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in inits:
            return inits[node.input[1]]
    return None


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset; 0 when it imports none."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` at opset ``target`` (onnx.version_converter), with the IR version that opset needs
    (float8 types need IR 9 at opset 19, int4 IR 10 at opset 21). The one converter every stage uses."""
    if opset_of(model) == target:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise TrtbuildError(
            f"the model uses opset {opset_of(model)} and onnx cannot convert it to opset {target} "
            f"({_first_line(exc)})",
            "re-export it at that opset (opset_version in torch.onnx.export)",
        ) from exc
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    converted.ir_version = max(converted.ir_version, needed)
    return converted


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Move top-level Constant nodes that hold tensors into initializers (TensorRT and the quantizers
    look for weights there). Subgraph constants stay: they belong to their Loop/If body."""
    outputs = {o.name for o in graph.output}
    keep, moved = [], 0
    for node in graph.node:
        tensor = (
            _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        )
        if tensor is None or node.output[0] in outputs:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            value = onnx.helper.get_attribute_value(attr)
            dtype = np.float32 if "float" in attr.name else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return None  # sparse or string constants stay nodes


# What trtbuild's writers append to a model's stem (<m>.int8.onnx, <m>.int8.fp16.onnx, <m>.fp16.onnx, ...).
WRITTEN_TAGS = ("fp16", "int8", "fp8", "int8fp8", "int4", "int4int8")


def model_name(onnx_path: str | os.PathLike[str]) -> str:
    """The model a file is of: its name without `.onnx` and without the precision tags trtbuild appends.
    Other dots stay (third-party files such as `ch_ppocr_mobile_v2.0_cls_infer.onnx`: cutting at the
    first dot named it `ch_ppocr_mobile_v2`, which another version of the model would share)."""
    name = Path(onnx_path).name.removesuffix(".onnx")
    while (parts := name.rpartition("."))[0] and parts[2] in WRITTEN_TAGS:
        name = parts[0]
    return name


def fixed_size(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """An axis's declared size, or None when it is dynamic: a symbol, unset, or -1 (Paddle2ONNX writes its
    dynamic axes so). Any other negative size is returned, for the input checks to refuse."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value != -1 else None


def dedupe_value_info(graph: onnx.GraphProto) -> int:
    """Drop repeated ``value_info`` entries of one tensor (onnxslim 0.1.98 writes each twice, e.g. for
    Magika); keep the first. Tools that retype a tensor update one entry and leave the other, so the FP16
    converter's output declared a tensor both FP32 and FP16 and ONNX Runtime refused to load it. Returns
    how many entries were dropped."""
    seen: set[str] = set()
    keep = []
    for info in graph.value_info:
        if info.name not in seen:
            seen.add(info.name)
            keep.append(info)
    dropped = len(graph.value_info) - len(keep)
    if dropped:
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return dropped
