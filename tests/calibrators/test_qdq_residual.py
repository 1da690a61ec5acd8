"""INT8 and FP8 placement of residual Adds (calibrators/qdq_residual.py): the skip input of an Add that only
feeds a LayerNorm (fused or decomposed, as third-party opset-13 exports write it) gets no Q/DQ; a
conv-style residual whose output is requantized keeps it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.qdq import QdqOptions, plan_qdq
from calibrators.qdq_select import quantizable_activations
from calibrators.ranges import RangeSet, TensorRange

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT
D = 16


def _c(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.2).astype(np.float32), name)


def _layernorm(src: str, decomposed: bool) -> list[onnx.NodeProto]:
    if not decomposed:
        return [helper.make_node("LayerNormalization", [src, "gamma", "beta"], ["ln"], axis=-1)]
    return [
        helper.make_node("ReduceMean", [src], ["mu"], axes=[-1]),
        helper.make_node("Sub", [src, "mu"], ["xc"]),
        helper.make_node("Pow", ["xc", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["xc", "std"], ["norm"]),
        helper.make_node("Mul", ["norm", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["ln"]),
    ]


def _block(decomposed: bool, residual_also_to_matmul: bool = False) -> onnx.ModelProto:
    """x -> fc (MatMul + bias) -> Add(., x) -> LayerNorm -> fc2 -> y: a post-LN transformer sublayer."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Add", ["hb", "x"], ["s"], name="residual"),
        *_layernorm("s", decomposed),
        helper.make_node("MatMul", ["ln", "W2"], ["y"], name="fc2"),
    ]
    outputs = [helper.make_tensor_value_info("y", F, [1, 8, D])]
    if residual_also_to_matmul:  # the Add's output is requantized: the skip keeps its Q/DQ
        nodes.append(helper.make_node("MatMul", ["s", "W3"], ["z"], name="fc3"))
        outputs.append(helper.make_tensor_value_info("z", F, [1, 8, D]))
    inits = [_c("W1", D, D), _c("b1", D), _c("W2", D, D), _c("W3", D, D), _c("gamma", D), _c("beta", D)]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("two", 2.0), ("eps", 1e-5))]
    inputs = [helper.make_tensor_value_info("x", F, [1, 8, D])]
    graph = helper.make_graph(nodes, "block", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13 if decomposed else 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _plan(model: onnx.ModelProto, activation_type: str = "int8"):
    names = quantizable_activations(model)
    ranges = RangeSet("minmax", {n: TensorRange(n, 4.0, -4.0, 4.0) for n in names})
    return names, plan_qdq(model, ranges, QdqOptions(activation_type=activation_type))


@pytest.mark.parametrize("activation_type", ["int8", "fp8"])
@pytest.mark.parametrize("decomposed", [False, True], ids=["LayerNormalization", "opset13-decomposed"])
def test_skip_into_layernorm_gets_no_qdq(decomposed: bool, activation_type: str) -> None:
    names, plan = _plan(_block(decomposed), activation_type)
    readers = {(node, idx) for node, idx in plan.activations["x"].consumers}
    assert readers == {("fc", 0)}  # the MatMul's input, not the residual Add's skip
    assert "hb" not in plan.activations and "s" not in plan.activations
    assert set(plan.quantized_nodes) == {"fc", "fc2"}  # every MatMul stays INT8
    assert "ln" in names and "ln" in plan.activations  # fc2's input still calibrated and quantized


@pytest.mark.parametrize("activation_type", ["int8", "fp8"])
def test_skip_keeps_qdq_where_the_add_output_is_requantized(activation_type: str) -> None:
    _, plan = _plan(_block(decomposed=False, residual_also_to_matmul=True), activation_type)
    assert ("residual", 1) in plan.activations["x"].consumers
    assert ("fc3", 0) in plan.activations["s"].consumers


def test_uint8_placement_unchanged_by_the_int8_rule() -> None:
    """ORT CPU graphs quantize a residual Add fully or not at all (QLinearAdd); into a LayerNorm: not."""
    _, plan = _plan(_block(decomposed=False), "uint8")
    assert ("residual", 1) not in plan.activations["x"].consumers
