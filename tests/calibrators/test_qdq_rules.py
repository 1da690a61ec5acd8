"""Q/DQ placement rules, each on a small hand-built ONNX graph, plus apply_qdq validity in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators import weights as wq
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from calibrators.ranges import RangeSet, TensorRange
from trtbuild.core.errors import TrtbuildError

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def _w(name: str, *shape: int, scale: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ranges_from_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> RangeSet:
    """Min/max of every tensor that will get Q/DQ (a tiny stand-in for calibration)."""
    names = quantizable_activations(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_inputs = {i.name for i in probe.graph.input}
    for n in names:
        if n not in graph_inputs:
            probe.graph.output.append(helper.make_tensor_value_info(n, F, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True)) | feeds
    return RangeSet(
        "minmax",
        {
            n: TensorRange(n, float(np.abs(values[n]).max()), float(values[n].min()), float(values[n].max()))
            for n in names
        },
    )


def _consumers(plan, tensor: str) -> set[str]:
    return {node for node, _ in plan.activations[tensor].consumers} if tensor in plan.activations else set()


# --------------------------------------------------------------------------------------------- graphs


@pytest.fixture(scope="module")
def residual_model() -> onnx.ModelProto:
    """x -> conv1 -> relu -> a ; a -> conv2 -> b ; add(b, a) -> conv3 -> y (a ResNet block)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "a"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w3"], ["y"], name="conv3"),
    ]
    inits = [_w("w1", 8, 8, 3, 3), _w("b1", 8), _w("w2", 8, 8, 3, 3), _w("b2", 8), _w("w3", 8, 8, 1, 1)]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", F, [1, 8, 8, 8])],
        inits,
    )


def test_weighted_inputs_quantized_outputs_not(residual_model: onnx.ModelProto) -> None:
    feeds = {"x": RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)}
    plan = plan_qdq(residual_model, _ranges_from_ort(residual_model, feeds))
    assert _consumers(plan, "x") == {"conv1"}
    assert "conv2" in _consumers(plan, "a")
    assert _consumers(plan, "s") == {"conv3"}
    assert "c1" not in plan.activations and "y" not in plan.activations  # no Q/DQ on outputs
    assert set(plan.quantized_nodes) == {"conv1", "conv2", "conv3"}


def test_residual_add_quantizes_skip_not_conv_branch(residual_model: onnx.ModelProto) -> None:
    feeds = {"x": RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)}
    ranges = _ranges_from_ort(residual_model, feeds)
    plan = plan_qdq(residual_model, ranges)
    assert ("add", 1) in plan.activations["a"].consumers  # skip input
    assert "b" not in plan.activations  # conv branch left for epilogue fusion
    # ORT CPU (uint8) only fuses a fully quantized Add, so there both inputs get Q/DQ.
    plan_u8 = plan_qdq(residual_model, ranges, QdqOptions(activation_type="uint8"))
    assert ("add", 0) in plan_u8.activations["b"].consumers
    assert plan_u8.activations["a"].zero_point != 0 or ranges["a"].min >= 0


def test_per_channel_weight_axis_per_op() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv"),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], name="deconv"),
        helper.make_node("Flatten", ["t"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm_n", transB=0),
        helper.make_node("Gemm", ["g", "wgt"], ["h"], name="gemm_t", transB=1),
        helper.make_node("MatMul", ["h", "wm"], ["y"], name="matmul"),
    ]
    inits = [
        _w("wc", 6, 4, 3, 3),
        _w("wt", 6, 5, 2, 2),
        _w("wg", 5 * 3 * 3, 7),
        _w("wgt", 9, 7),
        _w("wm", 9, 11),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [2, 4, 4, 4])],
        [helper.make_tensor_value_info("y", F, [2, 11])],
        inits,
    )
    feeds = {"x": RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)}
    plan = plan_qdq(model, _ranges_from_ort(model, feeds))
    axes = {name: w.axis for name, w in plan.weights.items()}
    assert axes == {"wc": 0, "wt": 1, "wg": 1, "wgt": 0, "wm": 1}
    counts = {name: len(w.scales) for name, w in plan.weights.items()}
    assert counts == {"wc": 6, "wt": 5, "wg": 7, "wgt": 9, "wm": 11}
    # scales are per-channel max|w| / 127 along that axis
    wc = numpy_helper.to_array(inits[0])
    np.testing.assert_allclose(plan.weights["wc"].scales, np.abs(wc).max(axis=(1, 2, 3)) / 127, rtol=1e-6)
    q = apply_qdq(model, plan)
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "wt_quantized")
    assert helper.get_attribute_value(dq.attribute[0]) == 1
    out_f = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    out_q = ort.InferenceSession(q.SerializeToString()).run(None, feeds)[0]
    cos = float((out_f * out_q).sum() / np.linalg.norm(out_f) / np.linalg.norm(out_q))
    assert cos > 0.99


def test_weight_quantization_roundtrip() -> None:
    w = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w[3] *= 50  # one loud channel must not coarsen the others
    scales = wq.per_channel_scales(w, 0)
    q = wq.quantize_weight(w, scales, 0)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    err = np.abs(wq.dequantize_weight(q, scales, 0) - w).max(axis=(1, 2, 3))
    assert np.all(err <= scales / 2 + 1e-7)


@pytest.fixture(scope="module")
def concat_model() -> onnx.ModelProto:
    """Two convs of very different range -> Concat -> MaxPool -> conv."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["c"], name="concat", axis=1),
        helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "wc"], ["y"], name="conv_c"),
    ]
    inits = [_w("wa", 8, 4, 1, 1, scale=0.1), _w("wb", 8, 4, 1, 1, scale=3.0), _w("wc", 8, 16, 1, 1)]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", F, [1, 8, 4, 4])],
        inits,
    )


def test_concat_and_pool_share_one_scale(concat_model: onnx.ModelProto) -> None:
    feeds = {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    ranges = _ranges_from_ort(concat_model, feeds)
    assert ranges["b"].amax > 5 * ranges["a"].amax  # the inputs really differ
    plan = plan_qdq(concat_model, ranges)
    group = {plan.activations[t].group for t in ("a", "b", "c", "p")}
    assert len(group) == 1, "Concat inputs, output and pool output must share one scale"
    expected = max(ranges[t].amax for t in ("a", "b", "c", "p")) / 127
    assert [plan.activations[t].scale for t in ("a", "b", "c", "p")] == pytest.approx([expected] * 4)
    assert any(sorted(m) == ["a", "b", "c", "p"] for m in plan.groups.values())
    q = apply_qdq(concat_model, plan)
    assert ort.InferenceSession(q.SerializeToString()).run(None, feeds)[0].shape == (1, 8, 4, 4)


def test_box_score_concat_head_stays_float() -> None:
    """YOLO-style head: boxes (pixels) concatenated with sigmoid scores -> output, plus a refine conv."""
    nodes = [
        helper.make_node("Conv", ["x", "wf"], ["feat"], name="stem"),
        helper.make_node("Conv", ["feat", "wbox"], ["box_raw"], name="box_conv"),
        helper.make_node("Mul", ["box_raw", "stride"], ["boxes"], name="box_scale"),
        helper.make_node("Conv", ["feat", "wcls"], ["cls_raw"], name="cls_conv"),
        helper.make_node("Sigmoid", ["cls_raw"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["det"], name="head_concat", axis=1),
        helper.make_node("Conv", ["det", "wr"], ["refined"], name="refine_conv"),
    ]
    inits = [
        _w("wf", 8, 3, 1, 1),
        _w("wbox", 4, 8, 1, 1),
        _w("wcls", 6, 8, 1, 1),
        _w("wr", 4, 10, 1, 1),
        numpy_helper.from_array(np.array(320.0, np.float32), "stride"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("det", F, [1, 10, 8, 8]),
            helper.make_tensor_value_info("refined", F, [1, 4, 8, 8]),
        ],
        inits,
    )
    feeds = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    plan = plan_qdq(model, _ranges_from_ort(model, feeds), QdqOptions(tiny_conv_min_channels=1))
    excluded = plan.excluded_nodes()
    assert "head_concat" in excluded and "box coordinates" in excluded["head_concat"]
    assert "refine_conv" in excluded  # reads the head: stays float
    for t in ("boxes", "scores", "det"):
        assert t not in plan.activations
    assert "box_conv" in plan.quantized_nodes and "cls_conv" in plan.quantized_nodes


def test_attention_mask_path_and_score_matmul_excluded() -> None:
    """BERT-style attention: scores = QK^T / sqrt(d) + (1 - mask) * -1e9 -> Softmax -> @ V -> Linear."""
    nodes = [
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="scores_matmul"),
        helper.make_node("Div", ["qk", "sqrt_d"], ["scaled"], name="scale"),
        helper.make_node("Cast", ["mask"], ["mask_f"], name="mask_cast", to=F),
        helper.make_node("Sub", ["one", "mask_f"], ["inv"], name="mask_sub"),
        helper.make_node("Mul", ["inv", "neg_big"], ["bias"], name="mask_mul"),
        helper.make_node("Add", ["scaled", "bias"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="context_matmul"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="out_proj"),
        helper.make_node("MatMul", ["masked", "wleak"], ["leak"], name="leaky_matmul"),
    ]
    d, s = 16, 8
    inits = [_w(n, d, d) for n in ("wq", "wk", "wv", "wo")] + [
        _w("wleak", s, 4),
        numpy_helper.from_array(np.array(4.0, np.float32), "sqrt_d"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "neg_big"),
    ]
    inputs = [
        helper.make_tensor_value_info("h", F, [1, "seq", d]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 1, "seq"]),
    ]
    model = _model(
        nodes,
        inputs,
        [
            helper.make_tensor_value_info("o", F, [1, "seq", d]),
            helper.make_tensor_value_info("leak", F, [1, "seq", 4]),
        ],
        inits,
    )
    excluded = {e.node: e.reason for e in _plan_without_ranges(model)}
    assert "leaky_matmul" in excluded and "mask" in excluded["leaky_matmul"]
    assert "attention score" in excluded["scores_matmul"]
    assert "attention score" in excluded["context_matmul"]  # probs @ V: both activations
    assert "softmax" in excluded
    names = quantizable_activations(model)
    assert "masked" not in names and "bias" not in names
    assert set(names) == {"h", "ctx"}
    # With a short static sequence, the score MatMuls may be quantized.
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = s
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_value = s
    short = {e.node for e in _plan_without_ranges(model, attention_max_seq=64)}
    assert "scores_matmul" not in short and "leaky_matmul" in short


def _plan_without_ranges(model: onnx.ModelProto, **options):
    from calibrators.qdq import ensure_node_names, select_qdq

    return select_qdq(ensure_node_names(model), QdqOptions(**options)).excluded


def test_huge_calibrated_range_is_never_used() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [4, 8])],
        [helper.make_tensor_value_info("y", F, [4, 8])],
        [_w("w", 8, 8)],
    )
    plan = plan_qdq(model, RangeSet("minmax", {"x": TensorRange("x", 3.0e38, -3.0e38, 1.0)}))
    assert not plan.activations and "mm" in plan.excluded_nodes()


def test_tiny_conv_and_gemv_stay_float() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="tiny_head"),  # 1 output channel
        helper.make_node("Flatten", ["a"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wv"], ["y"], name="gemv", transB=1),  # 1 output: GEMV
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [2, 8, 4, 4])],
        [helper.make_tensor_value_info("y", F, [2, 1])],
        [_w("w1", 1, 8, 3, 3), _w("wv", 1, 4)],
    )
    reasons = {e.node: e.reason for e in _plan_without_ranges(model)}
    assert "tiny conv" in reasons["tiny_head"]
    assert "GEMV" in reasons["gemv"]
    assert quantizable_activations(model) == []


def test_user_exclusions_by_regex_and_op_type(residual_model: onnx.ModelProto) -> None:
    feeds = {"x": RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)}
    ranges = _ranges_from_ort(residual_model, feeds)
    plan = plan_qdq(residual_model, ranges, QdqOptions(exclude_nodes=("conv[13]",)))
    assert plan.quantized_nodes == ["conv2"]
    assert "--exclude conv[13]" in plan.excluded_nodes()["conv1"]
    assert "x" not in plan.activations
    plan = plan_qdq(residual_model, ranges, QdqOptions(exclude_op_types=("Conv",)))
    assert plan.quantized_nodes == [] and not plan.activations
    assert quantizable_activations(residual_model, exclude_nodes=["conv.*"]) == []
    with pytest.raises(TrtbuildError, match="not a valid regex"):
        QdqOptions(exclude_nodes=("conv[",))


def test_missing_range_and_old_opset_are_clear_errors(residual_model: onnx.ModelProto) -> None:
    with pytest.raises(TrtbuildError, match="no calibrated range"):
        plan_qdq(residual_model, RangeSet("minmax", {}))
    old = onnx.ModelProto()
    old.CopyFrom(residual_model)
    old.opset_import[0].version = 11
    with pytest.raises(TrtbuildError, match="opset 11"):
        plan_qdq(old, RangeSet("minmax", {}))


def test_uint8_asymmetric_scale_and_zero_point(residual_model: onnx.ModelProto) -> None:
    feeds = {"x": (RNG.random((1, 8, 8, 8)) * 3 + 1).astype(np.float32)}  # all positive: 1..4
    ranges = _ranges_from_ort(residual_model, feeds)
    act = plan_qdq(residual_model, ranges, QdqOptions(activation_type="uint8")).activations["x"]
    assert act.dtype == "uint8" and act.zero_point == 0  # [0, max] (range always includes 0)
    assert act.scale == pytest.approx(ranges["x"].max / 255, rel=1e-6)
    act8 = plan_qdq(residual_model, ranges).activations["x"]
    assert act8.zero_point == 0 and act8.scale == pytest.approx(ranges["x"].amax / 127, rel=1e-6)
    q = apply_qdq(residual_model, plan_qdq(residual_model, ranges, QdqOptions(activation_type="uint8")))
    zp = next(i for i in q.graph.initializer if i.name == "x_zero_point")
    assert zp.data_type == TensorProto.UINT8
