"""Fidelity measures the model, not the CPU: reference Q/DQ semantics for TensorRT graphs, and ORT-CPU
graphs built so that ORT's fused int8 kernels are exact on the CPU they run on (issue: x86 CPUs without VNNI,
whose u8 x s8 multiply-add saturates in int16).

These tests hold on any CPU: they check the sessions themselves (what ORT fuses), compare ORT against an
independent NumPy evaluation (onnx.reference), and simulate the saturating instruction in NumPy on a real
layer's real data, so they fail on a VNNI machine too if the remedy were dropped.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from calibrators import fallback, fidelity, ort_cpu
from calibrators import weights as wq
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from trtbuild import examples
from trtbuild.core import cpu
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "QLinearAdd"}


@pytest.fixture(scope="module")
def effnet_calibrated(effnet_onnx: Path) -> dict:
    model = onnx.load(str(effnet_onnx))
    photos = examples.normalize_imagenet(examples.photo_crops(24, seed=5))
    collection = collect(
        model,
        [photos[i : i + 4] for i in range(0, 16, 4)],
        tensors=quantizable_activations(model),
        show_progress=False,
    )
    return {"model": model, "ranges": compute_ranges(collection, "mse"), "held": photos[16:]}


def _fused_ops(model: onnx.ModelProto, semantics: str, tmp_path: Path) -> Counter[str]:
    optimized = tmp_path / f"optimized_{semantics}.onnx"
    ort_core.cpu_session(model, semantics, optimized_model_path=optimized)
    return Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def _sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(((ref.astype(np.float64) - test) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / noise)


# --------------------------------------------------------------------------------- reference semantics


def test_gate_sessions_cannot_fuse_qdq_into_integer_kernels(effnet_calibrated: dict, tmp_path: Path) -> None:
    model, ranges = effnet_calibrated["model"], effnet_calibrated["ranges"]
    trt_graph = apply_qdq(model, plan_qdq(model, ranges))
    reference_ops = _fused_ops(trt_graph, ort_core.REFERENCE, tmp_path)
    assert not INTEGER_KERNELS & set(reference_ops), reference_ops
    assert reference_ops["QuantizeLinear"] >= 45  # activations are still rounded to the int8 grid
    # The same graph under ORT's own semantics does get integer kernels on this CPU: the option matters.
    assert INTEGER_KERNELS & set(_fused_ops(trt_graph, ort_core.ORT_CPU, tmp_path))
    # Every session the gate and the fallback search build for a TensorRT graph uses reference semantics.
    options = ort_core.session_options(fidelity.semantics_for_activations("int8"))
    assert options.get_session_config_entry("session.disable_quant_qdq") == "1"
    planner = fallback._Planner(model, ranges, QdqOptions())
    assert planner.semantics == ort_core.REFERENCE
    assert (
        fidelity.measure(model, trt_graph, [{"images": effnet_calibrated["held"]}]).semantics == "reference"
    )


def _small_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv (+ residual) -> GlobalAveragePool -> Flatten -> Gemm, seeded weights."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [
            init("w1", 32, 16, 3, 3),
            init("b1", 32),
            init("w2", 32, 32, 3, 3, scale=0.1),
            init("b2", 32),
            init("w3", 10, 32),
            init("b3", 10),
        ],
    )
    # Opset 21: onnx.reference implements DequantizeLinear from opset 19 on.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("activation_type", ["int8", "uint8"])
def test_reference_semantics_equal_an_independent_numpy_evaluation(activation_type: str) -> None:
    model = _small_cnn()
    rng = np.random.default_rng(1)
    data = rng.normal(0, 1, (24, 16, 12, 12)).astype(np.float32)
    collection = collect(
        model,
        [data[i : i + 8] for i in range(0, 16, 8)],
        tensors=quantizable_activations(model),
        show_progress=False,
    )
    options = QdqOptions(activation_type=activation_type, tiny_conv_min_channels=1, tiny_conv_min_fan_in=1)
    qmodel = apply_qdq(model, plan_qdq(model, compute_ranges(collection, "minmax"), options))
    assert Counter(n.op_type for n in qmodel.graph.node)["QuantizeLinear"] >= 3
    held = data[16:]
    ours = ort_core.cpu_session(qmodel, ort_core.REFERENCE).run(None, {"x": held})[0]
    numpy_eval = ReferenceEvaluator(qmodel).run(None, {"x": held})[0]
    # Same math up to float summation order: far below one quantization step of the output.
    np.testing.assert_allclose(ours, numpy_eval, rtol=1e-4, atol=1e-4 * float(np.abs(numpy_eval).max()))
    float_out = ort_core.cpu_session(model).run(None, {"x": held})[0]
    assert not np.allclose(ours, float_out, atol=1e-5)  # and the graph really is quantized


# --------------------------------------------------------------------------------- the saturating kernel


def _vpmaddubsw_gemm(a_u8: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int]:
    """A [M, K] uint8 x [N, K] int8 GEMM as AVX2's VPMADDUBSW computes it: adjacent pairs of u8 x s8
    products summed into a saturating int16, then accumulated in int32. Returns (result, saturations)."""
    if a_u8.shape[1] % 2:
        a_u8, w = np.pad(a_u8, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
    half = a_u8.shape[1] // 2
    a = a_u8.astype(np.int32).reshape(a_u8.shape[0], 1, half, 2)
    b = w.astype(np.int32).reshape(1, w.shape[0], half, 2)
    pairs = (a * b).sum(-1)
    clipped = np.clip(pairs, -(2**15), 2**15 - 1)
    return clipped.sum(-1), int((clipped != pairs).sum())


def _vpmaddwd_gemm(a_u8: np.ndarray, w_u8: np.ndarray) -> np.ndarray:
    """ORT's u8 x u8 path: both widened to int16, pairs summed into int32 (VPMADDWD): no saturation."""
    pairs = a_u8.astype(np.int64)[:, None, :] * w_u8.astype(np.int64)[None, :, :]
    assert (
        np.abs(pairs[..., : pairs.shape[-1] // 2 * 2].reshape(*pairs.shape[:2], -1, 2).sum(-1)).max() < 2**31
    )
    return pairs.sum(-1)


def test_u8s8_saturation_is_real_on_a_real_layer_and_both_remedies_remove_it(effnet_calibrated: dict) -> None:
    """EfficientNet-Lite0's 1x1 expand conv of block 9, fed real photos: with int8 weights thousands of
    VPMADDUBSW pairs saturate (the uint8 graph's error on AVX2 without VNNI); 7-bit weights never do, and
    uint8 weights through the u8 x u8 kernel are exact."""
    model, ranges = effnet_calibrated["model"], effnet_calibrated["ranges"]
    conv = next(n for n in model.graph.node if n.name == "/_blocks.9/_expand_conv/Conv")
    plan = plan_qdq(model, ranges, QdqOptions(activation_type="uint8"))
    act = plan.activations[conv.input[0]]
    probe = fallback._with_outputs(model, [conv.input[0]])
    x = ort_core.cpu_session(probe).run([conv.input[0]], {"images": effnet_calibrated["held"][:2]})[0]
    rows = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    a_u8 = np.clip(np.rint(rows / act.scale) + act.zero_point, 0, 255).astype(np.uint8)
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == conv.input[1]))
    weight = weight.reshape(weight.shape[0], -1)
    exact = {}
    for fmt in ("int8", "int7", "uint8"):
        scales = wq.per_channel_scales(weight, 0, wq.weight_qmax(fmt))
        q = wq.quantize_weight(weight, scales, 0).astype(np.int32)
        truth = a_u8.astype(np.int64) @ q.T.astype(np.int64)
        if fmt == "uint8":
            stored, zero = wq.stored_weight(q, fmt, scales.size)
            got = _vpmaddwd_gemm(a_u8, stored) - a_u8.astype(np.int64).sum(1, keepdims=True) * zero[0]
            saturations = 0
        else:
            got, saturations = _vpmaddubsw_gemm(a_u8, q)
        exact[fmt] = (saturations, float(np.abs(got - truth).max() / np.abs(truth).max()))
    assert exact["int8"][0] > 100 and exact["int8"][1] > 0.01, exact  # needed: int8 weights saturate
    assert exact["int7"] == (0, 0.0) and exact["uint8"] == (0, 0.0), exact  # sufficient: both are exact


# --------------------------------------------------------------------------------- the ORT-CPU graph


def test_cpu_kinds_and_weight_formats() -> None:
    assert cpu.classify("x86_64", {"avx2", "fma"}).u8s8_saturates
    assert cpu.classify("x86_64", {"avx2", "avx512bw"}).kind == "x86-avx512"
    assert not cpu.classify("x86_64", {"avx2", "avx_vnni"}).u8s8_saturates
    assert not cpu.classify("x86_64", {"avx512bw", "avx512_vnni"}).u8s8_saturates
    assert not cpu.classify("x86_64", {"amx_int8"}).u8s8_saturates
    assert not cpu.classify("aarch64", {"asimddp"}).u8s8_saturates
    assert ort_cpu.choose("x86-avx2").weight_format == "int7"
    assert ort_cpu.choose("x86-avx512").weight_format == "int7"
    assert ort_cpu.choose("x86-vnni").weight_format == "int8"
    assert ort_cpu.choose("arm64").weight_format == "int8"
    assert ort_cpu.choose("x86-avx2", "uint8").weight_format == "uint8"
    # Depthwise convs: int8 wherever ORT's depthwise kernels cannot saturate, as asked otherwise.
    assert [ort_cpu.choose(k).depthwise for k in ("x86-avx2", "x86-avx512", "x86-vnni", "arm64")] == [
        "int8"
    ] * 4
    assert ort_cpu.choose("x86-avx2", "int7").depthwise == "int7"
    assert ort_cpu.choose("x86-avx2", "uint8").depthwise == "uint8"
    with pytest.raises(TrtbuildError, match="depthwise weight format"):
        QdqOptions(activation_type="int8", depthwise_weight_format="int8")
    with pytest.raises(TrtbuildError, match="saturate"):
        ort_cpu.choose("x86-avx2", "int8")
    with pytest.raises(TrtbuildError, match="unknown CPU kind"):
        cpu.named("pentium")
    with pytest.raises(TrtbuildError, match="TensorRT takes symmetric int8"):
        QdqOptions(activation_type="int8", weight_format="int7")
    detected = cpu.detect()
    assert detected.detected and detected.kind in (*cpu.CPU_KINDS, "other")


def test_ort_cpu_graph_is_exact_on_this_cpu_and_records_its_choice(effnet_calibrated: dict) -> None:
    """The graph built for this machine runs in ORT's fused kernels as its Q/DQ semantics say; a graph
    built for a VNNI CPU (int8 weights) does too where this CPU has VNNI, and does not where it lacks it."""
    model, ranges, held = effnet_calibrated["model"], effnet_calibrated["ranges"], effnet_calibrated["held"]
    here = cpu.detect()
    for kind in ("auto", "x86-vnni"):
        target = ort_cpu.choose(kind)
        options = QdqOptions(activation_type="uint8", **target.formats())
        graph = apply_qdq(model, plan_qdq(model, ranges, options))
        # int8 depthwise weights (codes past 63) even where the other layers need 7 bits: exact below too
        assert ort_cpu.largest_weight_code(graph, skip_depthwise=False) > 63
        ort_core.set_metadata(graph, target.metadata())
        assert ort_core.semantics_for(graph) == ort_core.ORT_CPU
        fused = ort_core.cpu_session(graph, ort_core.ORT_CPU).run(None, {"images": held})[0]
        exact = ort_core.cpu_session(graph, ort_core.REFERENCE).run(None, {"images": held})[0]
        agreement = _sqnr_db(exact, fused)  # how far ORT's kernels are from the graph's own math
        warning = ort_cpu.saturation_warning(graph, here)
        if kind == "auto" or not here.u8s8_saturates:
            assert agreement > 30, (kind, here, agreement)  # requantization rounding only
            assert warning is None
        else:
            assert agreement < 25, (kind, here, agreement)  # measured: ~14 dB on an AVX2 EPYC
            assert warning is not None and "saturate" in warning
