"""AIMET encodings (0.6.1 and 1.0.0) from ranges calibrated on EfficientNet-Lite0 with real photos."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from calibrators import encodings as enc
from calibrators.calibrate import calibrate
from calibrators.encodings import qualcomm_activation_tensors
from calibrators.ranges import RangeSet, TensorRange
from calibrators.weights import per_channel_scales
from trtbuild.core.errors import TrtbuildError
from trtbuild.ship.qualcomm import qualcomm_ready_onnx


@pytest.fixture(scope="module")
def static_model(effnet_onnx: Path) -> onnx.ModelProto:
    model, _ = qualcomm_ready_onnx(onnx.load(str(effnet_onnx)))
    return model


@pytest.fixture(scope="module")
def ranges(effnet_onnx: Path, photo_batch: np.ndarray) -> RangeSet:
    return calibrate(
        effnet_onnx,
        photo_batch[:12],
        "percentile",
        tensors=qualcomm_activation_tensors(effnet_onnx),
        show_progress=False,
    )


@pytest.fixture(scope="module")
def encset(static_model: onnx.ModelProto, ranges: RangeSet) -> enc.EncodingSet:
    return enc.build_encodings(static_model, ranges)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    # Exact Q/DQ semantics: ORT's QDQ fusions would swap in its own int8 kernels.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])


def test_asymmetric_encoding_represents_zero_and_covers_range() -> None:
    e = enc.asymmetric(-1.0, 3.0)
    ((lo, hi),) = e.min_max()
    assert e.offset[0] <= 0 and e.scale[0] > 0
    assert lo <= -1.0 + e.scale[0] and hi >= 3.0 - e.scale[0]
    assert -e.offset[0] * e.scale[0] == pytest.approx(-lo)  # zero is an exact quantization level
    assert enc.asymmetric(0.0, 6.0).offset == (0,)  # ReLU6 output: all levels for [0, 6]


def test_weights_are_per_channel_symmetric_on_the_output_axis(
    static_model: onnx.ModelProto, encset: enc.EncodingSet
) -> None:
    inits = {t.name: numpy_helper.to_array(t) for t in static_model.graph.initializer}
    convs = [n for n in static_model.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in encset.params for n in convs)
    for node in convs:
        e, w = encset.params[node.input[1]], inits[node.input[1]]
        assert e.axis == 0 and len(e.scale) == w.shape[0]
        amax = np.abs(w).reshape(w.shape[0], -1).max(1)
        # An all-zero channel gets scale 1 (it quantizes to 0), the same scale the Q/DQ graph stores.
        np.testing.assert_allclose(e.scale, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(np.float32(e.scale), per_channel_scales(w, 0))
        assert set(e.offset) == {-128} and e.symmetric
    gemm = next(n for n in static_model.graph.node if n.op_type == "Gemm")
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    out_channels = inits[gemm.input[1]].shape[0 if trans_b else 1]
    assert len(encset.params[gemm.input[1]].scale) == out_channels == 1000


def test_activations_follow_ranges_and_skip_fused_conv_outputs(
    static_model: onnx.ModelProto, ranges: RangeSet, encset: enc.EncodingSet
) -> None:
    assert "images" in encset.activations
    for name, e in encset.activations.items():
        lo, hi = e.min_max()[0]
        want_lo, want_hi = ranges[name].clipped()
        assert not e.symmetric and e.offset[0] <= 0 and lo <= 0 <= hi
        assert lo == pytest.approx(want_lo, abs=e.scale[0]) and hi == pytest.approx(want_hi, abs=e.scale[0])
    readers: dict[str, list[str]] = {}
    for n in static_model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    fused = [
        o for n in static_model.graph.node if n.op_type == "Conv" for o in n.output if readers[o] == ["Clip"]
    ]
    assert fused and not set(fused) & set(encset.activations)  # Conv+ReLU6 run as one op on HTP


def test_written_documents_have_the_right_field_types(
    tmp_path: Path, static_model: onnx.ModelProto, encset: enc.EncodingSet
) -> None:
    old = json.loads(enc.write_encodings(encset, tmp_path / "a.encodings", "0.6.1").read_text())
    new = json.loads(enc.write_encodings(encset, tmp_path / "b.encodings", "1.0.0").read_text())
    enc.validate_encodings(old, static_model)
    enc.validate_encodings(new, static_model)
    entry = old["activation_encodings"]["images"][0]
    assert entry["is_symmetric"] == "False" and entry["dtype"] == "int" and entry["bitwidth"] == 8
    conv_w = next(n.input[1] for n in static_model.graph.node if n.op_type == "Conv")
    assert all(e["is_symmetric"] == "True" and e["offset"] == -128 for e in old["param_encodings"][conv_w])
    by_name = {e["name"]: e for e in new["param_encodings"]}
    assert by_name[conv_w]["is_sym"] is True and by_name[conv_w]["enc_type"] == "PER_CHANNEL"
    assert len(by_name[conv_w]["scale"]) == len(old["param_encodings"][conv_w])
    act = next(e for e in new["activation_encodings"] if e["name"] == "images")
    assert act["is_sym"] is False and act["enc_type"] == "PER_TENSOR" and act["dtype"] == "INT"


@pytest.mark.parametrize(
    ("version", "mutate", "message"),
    [
        ("0.6.1", lambda d: d["activation_encodings"]["images"][0].update(offset=5), "offset must be <= 0"),
        ("0.6.1", lambda d: d["activation_encodings"]["images"][0].update(is_symmetric=False), "string"),
        ("0.6.1", lambda d: d["activation_encodings"]["images"][0].update(scale=0.0), "scale must be > 0"),
        ("0.6.1", lambda d: d["activation_encodings"]["images"][0].update(min=0.5), "min <= 0 <= max"),
        ("1.0.0", lambda d: d["activation_encodings"][0].update(is_sym="False"), "JSON boolean"),
        ("1.0.0", lambda d: d["activation_encodings"][0].update(offset=[12]), "offset must be <= 0"),
        (
            "1.0.0",
            lambda d: d["param_encodings"][0].update(offset=[-127] * len(d["param_encodings"][0]["offset"])),
            "must have offset -128",
        ),
        (
            "1.0.0",
            lambda d: d["param_encodings"][0].update(
                scale=d["param_encodings"][0]["scale"][:-1], offset=d["param_encodings"][0]["offset"][:-1]
            ),
            "PER_CHANNEL needs",
        ),
        ("1.0.0", lambda d: d.update(version="2.5.0"), "version"),
    ],
)
def test_validator_rejects_wrong_signs_types_and_lengths(
    static_model: onnx.ModelProto, encset: enc.EncodingSet, version: str, mutate: object, message: str
) -> None:
    doc = copy.deepcopy(enc.to_json(encset, version))
    enc.validate_encodings(doc, static_model)
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(TrtbuildError, match=message):
        enc.validate_encodings(doc, static_model)


def test_validator_rejects_unknown_tensor_names(
    static_model: onnx.ModelProto, encset: enc.EncodingSet
) -> None:
    doc = enc.to_json(encset, "0.6.1")
    doc["activation_encodings"]["not_in_model"] = doc["activation_encodings"]["images"]
    with pytest.raises(TrtbuildError, match="no tensor of that name"):
        enc.validate_encodings(doc, static_model)


def test_ranges_from_another_model_are_refused(static_model: onnx.ModelProto) -> None:
    foreign = RangeSet("minmax", {"x": TensorRange("x", 1.0, -1.0, 1.0)})
    with pytest.raises(TrtbuildError, match="none of the calibrated tensor names"):
        enc.build_encodings(static_model, foreign)


def test_simulated_int8_model_keeps_fp32_predictions(
    static_model: onnx.ModelProto, encset: enc.EncodingSet, photo_batch: np.ndarray
) -> None:
    held_out = photo_batch[16:28]  # not used for calibration
    fp32 = _run(static_model, held_out)
    sim_model = enc.simulate(static_model, encset)
    assert sum(n.op_type == "QuantizeLinear" for n in sim_model.graph.node) == len(encset.activations) + len(
        encset.params
    )
    sim = _run(sim_model, held_out)
    agreement = float((fp32.argmax(1) == sim.argmax(1)).mean())
    cosine = float(
        np.mean(np.sum(fp32 * sim, 1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(sim, axis=1)))
    )
    assert agreement >= 0.6 and cosine > 0.97, (agreement, cosine)
    assert not np.allclose(fp32, sim, atol=1e-3)  # really quantized


def test_symmetric_activation_option(static_model: onnx.ModelProto, ranges: RangeSet) -> None:
    sym = enc.build_encodings(static_model, ranges, activation_symmetric=True)
    e = sym.activations["images"]
    assert e.symmetric and e.offset == (-128,) and e.scale[0] == pytest.approx(ranges["images"].amax / 127)
    enc.validate_encodings(enc.to_json(sym, "1.0.0"), static_model)


def test_matmul_weight_axis_is_last() -> None:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) - 5, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [w],
    )
    e = enc.weight_encodings(helper.make_model(graph))["w"]
    assert e.axis == 1 and len(e.scale) == 4


def test_an_all_zero_channel_has_one_scale_everywhere() -> None:
    """Qualcomm encodings and the Q/DQ graph agree on every weight scale, an all-zero channel included."""
    from onnx import helper

    from calibrators.qdq import QdqOptions, plan_qdq
    from calibrators.ranges import TensorRange

    w = np.random.default_rng(0).normal(size=(4, 8, 3, 3)).astype(np.float32)
    w[2] = 0.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    encoded = enc.weight_encodings(model)["w"].scale
    planned = plan_qdq(model, {"x": TensorRange("x", 1.0, -1.0, 1.0)}, QdqOptions()).weights["w"].scales
    assert encoded == planned and encoded[2] == 1.0
