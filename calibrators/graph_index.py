"""A read-only index over one ONNX graph: producers, consumers, constants, element types and shapes.

Placement rules, scale planning and the rewrite all look tensors up through it (docs/qdq-placement.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from calibrators import qdq_rules as rules
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.onnx_file import fixed_size, opset_of

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (plans refer to nodes by name); deterministic. A name the
    file gives a node stays that node's: an unnamed node's ``Op_index`` avoids every given name (a
    third-party file with an unnamed Gemm at index 5 and a node named "Gemm_5" had the latter renamed,
    so reports and --exclude pointed at the wrong layer)."""
    model = copy_model(model)
    given = {node.name for node in model.graph.node if node.name}
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen or (not node.name and name in given):
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return model


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


class GraphIndex:
    """Lookup tables over one (top-level) graph: producers, consumers, constants, element types, shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for idx, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, idx))
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input} - set(self.initializers)
        self.elem_type: dict[str, int] = {}
        self.shape: dict[str, list[int | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # shape inference is a hint only; rules fall back to "unknown"
            inferred = model
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            t = vi.type.tensor_type
            self.elem_type[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shape[vi.name] = [fixed_size(d) for d in t.shape.dim]
        for name, init in self.initializers.items():
            self.elem_type[name] = init.data_type
            self.shape[name] = list(init.dims)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def constant(self, name: str) -> np.ndarray:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return self.constants[name]

    def is_float_activation(self, name: str) -> bool:
        if not name or self.is_constant(name):
            return False
        return self.elem_type.get(name, TensorProto.FLOAT) in FLOAT_TYPES

    def origin(self, name: str) -> onnx.NodeProto | None:
        """The producer of ``name`` after skipping layout/movement ops."""
        node = self.producer.get(name)
        seen = 0
        while node is not None and rules.ROLES.get(node.op_type) is rules.Role.PASS_THROUGH and seen < 64:
            node = self.producer.get(node.input[0]) if node.input else None
            seen += 1
        return node

    def reaches_output(self, name: str) -> bool:
        """True when ``name`` flows to a graph output through movement ops only."""
        frontier, seen = [name], set()
        while frontier:
            t = frontier.pop()
            if t in self.graph_outputs:
                return True
            if t in seen:
                continue
            seen.add(t)
            for node, _ in self.consumers.get(t, []):
                if rules.ROLES.get(node.op_type) is rules.Role.PASS_THROUGH or node.op_type == "Concat":
                    frontier.extend(node.output)
        return False


def check_qdq_opset(model: onnx.ModelProto) -> None:
    opset = opset_of(model)
    if opset < MIN_QDQ_OPSET:
        raise TrtbuildError(
            f"the model uses ONNX opset {opset}; per-channel Q/DQ needs opset {MIN_QDQ_OPSET} or newer",
            "re-export with opset_version=17 (or convert with onnx.version_converter)",
        )
