"""Bias correction of INT8 weight rounding: exact on a hand-built conv, streamed channel means, and the
real EfficientNet-Lite0 on real photos (where uncorrected depthwise convs cost several dB of logit SQNR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators import bias_correction as bc
from calibrators import ort_cpu
from calibrators import weights as wq
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.histogram import TensorStats
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from calibrators.ranges import RangeSet
from trtbuild import examples
from trtbuild.core import ort as ort_core


def _run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], semantics: str = ort_core.REFERENCE
) -> np.ndarray:
    """Reference Q/DQ semantics by default: the math under test, not this CPU's int8 kernels."""
    return np.asarray(ort_core.cpu_session(model, semantics).run(None, feeds)[0])


def _conv_model(weight: np.ndarray, bias: np.ndarray, group: int) -> onnx.ModelProto:
    c_in = weight.shape[1] * group
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c_in, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("group", [1, 2, 8])
def test_output_shift_is_the_exact_mean_error_of_a_conv_with_rounded_weights(group: int) -> None:
    rng = np.random.default_rng(group)
    c_in, c_out = 8, 8
    weight = rng.normal(0, 1, (c_out, c_in // group, 3, 3)).astype(np.float32)
    weight[:, :, 0, 0] *= 25  # a large tap: coarse per-channel steps, as after folding BatchNorm
    bias = rng.normal(0, 1, c_out).astype(np.float32)
    scales = wq.per_channel_scales(weight, 0)
    rounded = wq.dequantize_weight(wq.quantize_weight(weight, scales, 0), scales, 0)
    mean = rng.uniform(-3, 3, c_in)
    x = np.broadcast_to(mean[None, :, None, None], (1, c_in, 6, 6)).astype(np.float32)  # E[x] per channel
    exact = _run(_conv_model(rounded, bias, group), {"x": x}) - _run(
        _conv_model(weight, bias, group), {"x": x}
    )
    shift = bc.output_shift(rounded - weight, mean, "Conv", {"group": group})
    assert shift is not None and np.abs(shift).max() > 1e-3  # rounding really shifts the output
    np.testing.assert_allclose(exact[0, :, 2, 2], shift, atol=1e-4)
    fixed = bc.corrected_bias(bias, shift, "Conv", {"group": group})
    after = _run(_conv_model(rounded, fixed, group), {"x": x}) - _run(
        _conv_model(weight, bias, group), {"x": x}
    )
    assert np.abs(after).max() < 1e-4


def test_gemm_shift_honours_trans_b_alpha_beta_and_skips_trans_a() -> None:
    rng = np.random.default_rng(0)
    d = rng.normal(0, 0.01, (5, 3))  # [N, K] with transB
    mu = rng.normal(0, 1, 3)
    shift = bc.output_shift(d, mu, "Gemm", {"transB": 1, "alpha": 2.0})
    assert shift is not None
    np.testing.assert_allclose(shift, 2.0 * d @ mu)
    np.testing.assert_allclose(
        bc.corrected_bias(np.zeros(5), shift, "Gemm", {"beta": 0.5}), -shift / 0.5, 1e-6
    )
    assert bc.output_shift(d.T, mu, "Gemm", {"transA": 1}) is None
    assert bc.output_shift(d, np.ones(4), "Gemm", {"transB": 1}) is None  # channel count mismatch


def test_channel_means_stream_exactly_and_give_up_on_inconsistent_shapes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, (12, 5, 4, 4)).astype(np.float32)
    x[:, 3] += 7.0
    one, split = TensorStats("t"), TensorStats("t")
    one.update(x.copy(), overwrite=True)  # overwrite: the histogram reuses x; the means come first
    for part in np.array_split(x, 5):
        split.update(part)
    expected = x.astype(np.float64).mean(axis=(0, 2, 3))
    assert one.channel_mean is not None and split.channel_mean is not None
    np.testing.assert_allclose(one.channel_mean, expected, rtol=1e-6)
    np.testing.assert_allclose(split.channel_mean, expected, rtol=1e-6)
    merged = TensorStats("t")
    for part in np.array_split(x, 3):
        piece = TensorStats("t")
        piece.update(part)
        merged.merge(piece)
    np.testing.assert_allclose(merged.channel_mean, expected, rtol=1e-6)  # type: ignore[arg-type]
    bad = TensorStats("t")
    bad.update(x[:2])
    bad.update(rng.normal(size=(2, 6, 4, 4)).astype(np.float32))
    assert bad.channel_mean is None and bad.count == 2 * 5 * 16 + 2 * 6 * 16


def _sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / ((reference - test) ** 2).sum()))


@pytest.fixture(scope="module")
def effnet_case(effnet_onnx: Path) -> dict:
    x = examples.normalize_imagenet(examples.photo_crops(48, seed=5))
    calib, held = x[:24], x[24:]
    model = onnx.load(str(effnet_onnx))
    collection = collect(
        model,
        [{"images": calib[i : i + 1]} for i in range(len(calib))],
        tensors=quantizable_activations(model),
        show_progress=False,
    )
    return {
        "model": model,
        "collection": collection,
        "held": held,
        "reference": _run(model, {"images": held}),
    }


def test_bias_correction_lifts_int8_effnet_fidelity_on_held_out_photos(
    effnet_case: dict, tmp_path: Path
) -> None:
    model, held, reference = effnet_case["model"], effnet_case["held"], effnet_case["reference"]
    ranges = compute_ranges(effnet_case["collection"], "minmax")
    plain_plan = plan_qdq(model, ranges, QdqOptions(bias_correction=False))
    plan = plan_qdq(model, ranges)  # on by default
    corrected = [w for w in plan.weights.values() if w.bias_shift is not None]
    assert len(corrected) >= 45  # every quantized conv and the classifier Gemm have their own bias
    assert all(w.bias_shift is None for w in plain_plan.weights.values())
    plain = _sqnr_db(reference, _run(apply_qdq(model, plain_plan), {"images": held}))
    fixed = _sqnr_db(reference, _run(apply_qdq(model, plan), {"images": held}))
    assert fixed > plain + 2.0, (plain, fixed)  # measured here: ~+4 dB
    # The saved ranges carry the channel means, so planning from the file corrects the same way.
    loaded = RangeSet.load(ranges.save(tmp_path / "ranges.json"))
    again = plan_qdq(model, loaded)
    for name, w in plan.weights.items():
        assert w.bias_shift is not None or again.weights[name].bias_shift is None
        if w.bias_shift is not None:
            redone = again.weights[name].bias_shift
            assert redone is not None
            np.testing.assert_allclose(np.array(redone), np.array(w.bias_shift), rtol=1e-5, atol=1e-7)


def test_corrected_graph_keeps_one_bias_per_conv_and_runs_with_uint8_kernels(effnet_case: dict) -> None:
    model, held, reference = effnet_case["model"], effnet_case["held"], effnet_case["reference"]
    ranges = compute_ranges(effnet_case["collection"], "minmax")
    # The weight format that is exact on this CPU's fused kernels (int7 where u8 x s8 saturates).
    fmt = ort_cpu.choose().weight_format
    qmodel = apply_qdq(model, plan_qdq(model, ranges, QdqOptions(activation_type="uint8", weight_format=fmt)))
    inits = {i.name for i in qmodel.graph.initializer}
    assert not any(name.endswith("_corrected") for name in inits)  # uint8: folded into the int32 bias
    plain = apply_qdq(
        model,
        plan_qdq(
            model, ranges, QdqOptions(activation_type="uint8", bias_correction=False, weight_format=fmt)
        ),
    )
    held_feed = {"images": held}
    fused = ort_core.ORT_CPU  # what ORT runs on this machine, fused integer kernels included
    assert _sqnr_db(reference, _run(qmodel, held_feed, fused)) > _sqnr_db(
        reference, _run(plain, held_feed, fused)
    )
    int8 = apply_qdq(model, plan_qdq(model, ranges))
    int8_inits = {i.name for i in int8.graph.initializer}
    convs = [n for n in int8.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert sum(n.input[2].endswith("_corrected") for n in convs) >= 45
    assert all(n.input[2] in int8_inits for n in convs)  # no dangling bias; originals dropped when unused
