"""Memory plan per device: weight bytes per precision, activation peak at the plan's max shapes, and
whether both (plus the builder's workspace) fit the target's memory.

Weights come from the initializers: FP32 4 bytes, FP16 2, INT8 1 (+ per-channel FP32 scales), INT4 1/2
(+ per-block FP16 scales); the float parts that stay unquantized are FP16 for every reduced precision
(TensorRT builds those plans strongly typed with FP16 float parts). Activations come from ONNX shape
inference with every input at its max shape and a liveness sweep in graph (topological) order: a tensor
lives from the node that makes it to its last reader (graph inputs and outputs, the caller's buffers,
for the whole run), and the peak is the largest live sum. The DequantizeLinear outputs of constant
weights are not counted: TensorRT fuses them into the GEMM. That is the "tensorrt" runtime model, what
plans use; the "onnxruntime" one is what running the graph in ORT's CPU session needs: ORT's execution
order (which dequantizes the weights early), every dequantized weight, and the temporaries of its Where
kernel (measured against ORT by bench/bench_int4.py --memory-only).
Device memory: Jetson memory is shared with the OS and other processes, so a stated share is reserved;
discrete GPUs keep a fixed reserve for the CUDA context and runtime.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.onnx_file import constants_to_initializers
from trtbuild.targets import Target

PRECISIONS = ("fp32", "fp16", "int8", "int4-weights")
RUNTIMES = ("tensorrt", "onnxruntime")
JETSON_RESERVED_SHARE = 0.25  # OS, display, camera and other processes share a Jetson's DRAM
DGPU_RESERVED_GIB = 1.0  # CUDA context, cuDNN/cuBLAS handles, TensorRT runtime
INT4_BLOCK = 128
_GIB = 2**30
_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_FLOAT_BYTES = {"fp32": 4, "fp16": 2, "int8": 2, "int4-weights": 2}


def _element_bytes(data_type: int) -> float:
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 0.5
    return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)


def _weights_of(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Initializer name -> (op type, reduction size) for the weights of Conv/ConvTranspose/Gemm/MatMul."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            tensor = inits.get(node.input[1])
            if tensor is not None and tensor.data_type in _FLOAT and len(tensor.dims) >= 2:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                k = int(tensor.dims[1] if attrs.get("transB", 0) else tensor.dims[0])
                out[tensor.name] = (node.op_type, k)
    return out


def weight_bytes(
    model: onnx.ModelProto, precision: str, float_bytes: int | None = None, block: int = INT4_BLOCK
) -> int:
    """Bytes of the weights when built in ``precision``; ``float_bytes`` overrides the size of the float
    parts (4 to check an ONNX file whose float parts are FP32)."""
    if precision not in PRECISIONS:
        raise TrtbuildError(f"no memory model for precision '{precision}'", f"use one of {PRECISIONS}")
    fbytes = float_bytes if float_bytes is not None else _FLOAT_BYTES[precision]
    if any(n.op_type == "Constant" for n in model.graph.node):
        # third-party exports hold their weights in Constant nodes: TensorRT stores them as weights too
        # (they were counted as 0 bytes: EfficientNet-Lite0's 17.8 MB file planned as no weights)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        constants_to_initializers(copy.graph)
        model = copy
    quantized = _weights_of(model) if precision in ("int8", "int4-weights") else {}
    total = 0.0
    for tensor in model.graph.initializer:
        count = math.prod(tensor.dims)
        layer = quantized.get(tensor.name)
        if tensor.data_type not in _FLOAT:
            total += count * _element_bytes(tensor.data_type)
        elif precision == "int8" and layer is not None:
            channels = tensor.dims[1] if layer[0] == "MatMul" else tensor.dims[0]
            total += count + channels * 4  # codes + per-channel scales
        elif precision == "int4-weights" and layer is not None and layer[0] in ("MatMul", "Gemm"):
            k = layer[1]
            if k % block == 0 and len(tensor.dims) == 2:
                total += count / 2 + count / block * fbytes  # packed codes + per-block scales
            else:
                total += count * fbytes
        else:
            total += count * fbytes
    return int(math.ceil(total))


def _concrete(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # Weights dequantized from constants have the constant's shape: give them as inputs of that shape, so
    # shape inference never has to follow INT4/INT8 types (ONNX Runtime's symbolic inference cannot).
    inits = {t.name: t for t in copy.graph.initializer}
    keep = []
    for node in copy.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            scale = inits.get(node.input[1])
            elem = scale.data_type if scale is not None else TensorProto.FLOAT
            dims = list(inits[node.input[0]].dims)
            copy.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], elem, dims))
        else:
            keep.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(keep)
    for value in copy.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name], strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    try:  # ONNX Runtime's symbolic inference follows shape arithmetic (BERT's Slice/Expand/Where) ...
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _scratch_directory():
            inferred = SymbolicShapeInference.infer_shapes(copy, auto_merge=True)
        if inferred is not None:
            return inferred
    except Exception:  # ... but refuses some graphs (unknown ops): then ONNX's own, best effort
        pass
    return onnx.shape_inference.infer_shapes(copy, data_prop=True)


@contextlib.contextmanager
def _scratch_directory() -> Iterator[None]:
    """Run in a temporary working directory: when ORT's symbolic inference cannot infer every shape it
    saves the whole model, weights as external data, as ``sym_shape_infer_temp.onnx`` (and a data file)
    into the *current* directory before raising, so `trtbuild plan` / `targets --model` on an INT4 graph
    left a copy of the model in the user's folder."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="trtbuild-shapes-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(here)


def _ort_order(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The order ONNX Runtime's CPU session executes ``nodes`` in (GraphViewer's default order, ORT 1.x):
    Constant nodes become initializers; then a depth-first walk up from the nodes nobody reads, the last
    node first, each node's producers visited highest index first, a node emitted once all its producers
    are. A weight's DequantizeLinear thus runs as soon as the walk meets it, long before its MatMul."""
    kept = [i for i, n in enumerate(nodes) if n.op_type != "Constant"]
    producer = {out: i for i in kept for out in nodes[i].output if out}
    inputs = {i: sorted({producer[x] for x in nodes[i].input if x in producer}) for i in kept}
    read = {j for i in kept for j in inputs[i]}
    stack: list[tuple[int, bool]] = [(i, False) for i in kept if i not in read]
    visited: set[int] = set()
    order: list[onnx.NodeProto] = []
    while stack:
        index, leave = stack.pop()
        if leave:
            order.append(nodes[index])
        elif index not in visited:
            visited.add(index)
            stack.append((index, True))
            stack.extend((j, False) for j in inputs[index])
    return order


@dataclass(frozen=True)
class ActivationPeak:
    bytes: int
    at_node: str
    unknown: tuple[str, ...]  # tensors without an inferred shape (not counted: the peak is a lower bound)


def activation_peak(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]],
    float_bytes: int | None = None,
    count_weight_dequant: bool = False,
    runtime: str = "tensorrt",
    shapes_from: onnx.ModelProto | None = None,
) -> ActivationPeak:
    """The largest sum of live activation bytes over the graph at ``shapes`` (input name -> dims).
    ``float_bytes``: size of float activations (None: their ONNX type's). ``count_weight_dequant``: count
    the float weights DequantizeLinear makes from constants (ONNX Runtime materialises them; TensorRT
    fuses them, so plans leave them out). ``runtime``: "tensorrt" sweeps in graph order; "onnxruntime"
    sweeps in the order ORT's CPU session runs and counts the dequantized weights (what ORT needs).
    ``shapes_from``: a graph with the same activation names to infer their shapes on (the float graph of a
    quantized one, where shape inference follows it better)."""
    if runtime not in RUNTIMES:
        raise TrtbuildError(f"no activation model for runtime '{runtime}'", f"use one of {RUNTIMES}")
    inferred = _concrete(shapes_from or model, shapes)
    info = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    info.update({v.name: v.type.tensor_type for v in inferred.graph.input})
    constants = {t.name for t in model.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    dequantized = {  # weights dequantized from constants: the constant's dims, the scale's float type
        n.output[0]: (list(inits[n.input[0]].dims), inits[n.input[1]].data_type)
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits
    }
    nodes = list(model.graph.node)
    if runtime == "onnxruntime":  # ORT runs its own order and materialises every dequantized weight
        nodes, count_weight_dequant = _ort_order(nodes), True
    for node in nodes:
        if node.op_type == "Constant" or (
            not count_weight_dequant and node.op_type == "DequantizeLinear" and node.input[0] in constants
        ):
            constants.update(node.output)
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    # The caller owns the input and output buffers (ORT's feeds, TensorRT's bindings): live throughout.
    for value in [*model.graph.input, *model.graph.output]:
        last_use[value.name] = len(nodes)
    unknown: list[str] = []

    def size(name: str) -> int:
        if name in dequantized:
            dims, elem = dequantized[name]
            each = float_bytes if float_bytes is not None else _element_bytes(elem)
            return int(math.prod(dims) * each)
        tensor = info.get(name)
        dims = [] if tensor is None else tensor.shape.dim
        if tensor is None or not tensor.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            unknown.append(name)
            return 0
        elem = tensor.elem_type
        each = float_bytes if float_bytes is not None and elem in _FLOAT else _element_bytes(elem)
        return int(math.prod(d.dim_value for d in dims) * each)

    def dims(name: str) -> list[int] | None:
        if name in inits:
            return list(inits[name].dims)
        tensor = info.get(name)
        if (
            tensor is None
            or not tensor.HasField("shape")
            or any(not d.HasField("dim_value") for d in tensor.shape.dim)
        ):
            return None
        return [d.dim_value for d in tensor.shape.dim]

    def scratch(node: onnx.NodeProto) -> int:
        """Bytes a kernel allocates beyond its outputs while it runs (ONNX Runtime's CPU kernels)."""
        if runtime != "onnxruntime" or node.op_type != "Where":
            return 0
        # ORT's Where broadcasts (condition, X) and (condition, Y) into two temporaries, then merges them.
        out = size(node.output[0])
        in_dims = [dims(x) for x in node.input]
        if any(d is None for d in in_dims) or not out:
            return 2 * out
        cond, x, y = (d or [] for d in in_dims)
        numel = math.prod(dims(node.output[0]) or [1])
        return sum(out * math.prod(np.broadcast_shapes(tuple(cond), tuple(v))) // numel for v in (x, y))

    live = {i.name: size(i.name) for i in model.graph.input if i.name not in constants}
    peak, at = sum(live.values()), "inputs"
    for index, node in enumerate(nodes):
        for name in node.output:
            if name and name not in constants:
                live[name] = size(name)
        current = sum(live.values()) + scratch(node)
        if current > peak:
            peak, at = current, node.name or node.op_type
        for name in [n for n in live if last_use.get(n, -1) <= index]:
            del live[name]
    return ActivationPeak(peak, at, tuple(unknown))


def usable_bytes(target: Target) -> tuple[int, str]:
    """(bytes a TensorRT engine may use on ``target``, how the reserve was taken)."""
    total = target.memory_gib * _GIB
    if target.kind == "jetson":
        reserve = f"{JETSON_RESERVED_SHARE:.0%} of the shared {target.memory_gib:g} GiB kept for the OS"
        return int(total * (1 - JETSON_RESERVED_SHARE)), reserve
    return int(total - DGPU_RESERVED_GIB * _GIB), f"{DGPU_RESERVED_GIB:g} GiB kept for the CUDA context"


@dataclass(frozen=True)
class MemoryPlan:
    target: str
    precision: str
    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int
    device_bytes: int  # usable on the target
    reserve: str
    unknown_shapes: int

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.device_bytes

    def describe(self) -> str:
        gib = lambda b: f"{b / _GIB:.2f} GiB"  # noqa: E731
        return (
            f"{gib(self.needed_bytes)} = weights {gib(self.weight_bytes)} + activations "
            f"{gib(self.activation_bytes)} at max shapes + workspace {gib(self.workspace_bytes)}; "
            f"{self.target} has {gib(self.device_bytes)} usable ({self.reserve})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "precision": self.precision,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "workspace_bytes": self.workspace_bytes,
            "needed_bytes": self.needed_bytes,
            "device_bytes": self.device_bytes,
            "reserve": self.reserve,
            "fits": self.fits,
            "unknown_shapes": self.unknown_shapes,
        }


def plan_memory(
    model: onnx.ModelProto,
    target: Target,
    precision: str,
    shapes: Mapping[str, Sequence[int]],
    workspace_mib: int | None = None,
    activations_from: onnx.ModelProto | None = None,
) -> MemoryPlan:
    """The memory plan of ``model`` built in ``precision`` for ``target`` at max ``shapes``;
    ``activations_from``: the float graph to take the activation peak from (same activations)."""
    activation_bytes = 4 if precision == "fp32" else 2
    peak = activation_peak(activations_from or model, shapes, activation_bytes)
    device, reserve = usable_bytes(target)
    return MemoryPlan(
        target=target.id,
        precision=precision,
        weight_bytes=weight_bytes(model, precision),
        activation_bytes=peak.bytes,
        workspace_bytes=(target.workspace_mib if workspace_mib is None else workspace_mib) * 2**20,
        device_bytes=device,
        reserve=reserve,
        unknown_shapes=len(peak.unknown),
    )


def check_fits(plan: MemoryPlan, model_name: str) -> None:
    """Refuse a plan whose engine cannot fit its target."""
    if plan.fits:
        return
    raise TrtbuildError(
        f"{model_name} in {plan.precision} does not fit {plan.target}: needs {plan.describe()}",
        "use a smaller precision (int4-weights, int8, fp16), smaller max shapes (--shape), a smaller "
        "--workspace, or a target with more memory",
    )


# Precisions the memory model has no own row for are sized like the closest one it has.
_SIZED_AS = {"bf16": "fp16", "fp8": "int8"}


def for_build_plan(plan: Any) -> MemoryPlan:
    """The memory plan of a :class:`trtbuild.plan.BuildPlan`: its source model at its max shapes (an INT4
    plan counts the INT4 graph's own weights, whatever its block size, and the FP32 graph's activations:
    the same tensors, and ONNX Runtime's shape inference follows the float graph better)."""
    from trtbuild.plan import fp16_qdq_source
    from trtbuild.targets import get_target

    precision = _SIZED_AS.get(plan.precision, plan.precision)
    source = onnx.load(plan.source_onnx, load_external_data=False)  # sizes come from dims, not data
    model = source
    if precision == "int4-weights":
        model = onnx.load(str(fp16_qdq_source(plan.onnx) or plan.onnx), load_external_data=False)
    shapes = {spec.name: spec.max for spec in plan.inputs}
    return plan_memory(model, get_target(plan.target), precision, shapes, plan.workspace_mib, source)
