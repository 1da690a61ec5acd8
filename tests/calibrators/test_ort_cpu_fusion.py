"""The ORT-CPU (uint8) graph fuses into ONNX Runtime's integer kernels at least as well as ORT's own
quantizer's graph, folds exporters' explicit Pads into the convs exactly, and leaves TensorRT's placement
alone (docs/ort-cpu-int8.md)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators import fidelity, ort_cpu
from calibrators import qdq_rewrite as rewrite
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from calibrators.quantize import QuantizeResult, quantize
from calibrators.ranges import RangeSet
from trtbuild import examples
from trtbuild.core import ort as ort_core

INTEGER_KERNELS = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul"}


def _optimized(model: onnx.ModelProto | Path, tmp_path: Path, name: str) -> onnx.ModelProto:
    """The graph ORT really runs at its default optimisation level."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def _unfused_qdq_pairs(model: onnx.ModelProto) -> int:
    """QuantizeLinear -> DequantizeLinear pairs left in an optimized graph: pure overhead between kernels."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node.op_type)
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and "DequantizeLinear" in readers.get(n.output[0], [])
    )


def _activation_qdq(model: onnx.ModelProto) -> int:
    """Q and DQ nodes on activations (weight DQs read initializers and are folded into the kernels)."""
    inits = {i.name for i in model.graph.initializer}
    return sum(
        1
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits
    )


@pytest.fixture(scope="module")
def effnet_ranges(effnet_onnx: Path, photo_batch: np.ndarray) -> RangeSet:
    model = onnx.load(str(effnet_onnx))
    samples = [{"images": photo_batch[i : i + 1]} for i in range(12)]
    return compute_ranges(
        collect(model, samples, tensors=quantizable_activations(model), show_progress=False), "mse"
    )


def test_uint8_graph_fuses_at_least_as_well_as_orts_quantizer(
    effnet_onnx: Path, effnet_int8_onnx: Path, effnet_ranges: RangeSet, tmp_path: Path
) -> None:
    model = onnx.load(str(effnet_onnx))
    options = QdqOptions(activation_type="uint8", **ort_cpu.choose().formats())
    plan = plan_qdq(model, effnet_ranges, options)
    ours_graph = apply_qdq(model, plan)
    ours = _optimized(ours_graph, tmp_path, "ours")
    theirs = _optimized(effnet_int8_onnx, tmp_path, "ort")
    ops, ort_ops = Counter(n.op_type for n in ours.graph.node), Counter(n.op_type for n in theirs.graph.node)
    # Every conv the plan quantized runs as QLinearConv: the only float convs are the ones the plan keeps
    # float (the 3-channel stem and the depthwise conv it feeds), and no explicit Pad is left between DQ
    # and Q.
    float_convs = [e.node for e in plan.excluded if e.op_type == "Conv"]
    assert ops["Conv"] + ops["FusedConv"] == len(float_convs) == 2, (ops, float_convs)
    assert ops["QLinearConv"] + len(float_convs) >= ort_ops["QLinearConv"], (ops, ort_ops)
    for op in INTEGER_KERNELS - {"QLinearConv"}:
        assert ops[op] >= ort_ops[op], (op, ops, ort_ops)
    assert ops["Pad"] == 0 and ort_ops["Pad"] > 0, (ops, ort_ops)
    # No Q -> DQ pair left between quantized ops, and fewer activation Q/DQ than ORT's own graph keeps.
    assert _unfused_qdq_pairs(ours) == 0, ops
    assert _activation_qdq(ours) < _activation_qdq(theirs), (ops, ort_ops)
    photos = examples.normalize_imagenet(examples.photo_crops(8, seed=11))
    report = fidelity.measure(model, ours_graph, [{"images": photos}])
    assert report.semantics == ort_core.ORT_CPU
    assert report.outputs[0].cosine > 0.99 and report.outputs[0].sqnr_db > 15, report.summary()


def test_output_qdq_is_for_ort_only(effnet_onnx: Path, effnet_ranges: RangeSet) -> None:
    """The head conv's output (after its ReLU6) and the pool's output get Q/DQ in the ORT-CPU graph, so ORT
    forms QLinearConv and QLinearGlobalAveragePool; TensorRT's graph never quantizes a conv output."""
    model = onnx.load(str(effnet_onnx))
    head, pooled = "/_swish_1/Clip_output_0", "/_avg_pooling/GlobalAveragePool_output_0"
    u8 = plan_qdq(model, effnet_ranges, QdqOptions(activation_type="uint8"))
    trt = plan_qdq(model, effnet_ranges, QdqOptions(activation_type="int8"))
    assert head in u8.activations and pooled in u8.activations
    assert u8.activations[head].group != u8.activations[pooled].group  # the pool requantizes
    assert head not in trt.activations and pooled not in trt.activations
    assert head in effnet_ranges and pooled in effnet_ranges  # calibration measured them


def test_layers_kept_float_stay_float_in_orts_kernels(
    effnet_onnx: Path, effnet_ranges: RangeSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT's WeightBiasQuantization quantizes the float weight of a Conv/Gemm fed by a per-tensor DQ (also
    behind a Pad it fuses or a Reshape it propagates through) per tensor: layers kept float -- here every
    depthwise conv (a Pad before each) and the classifier Gemm (behind the pool's Reshape) -- ran as
    per-tensor integer kernels (cosine 0.96). Guarded, they run as float layers and ORT's kernels agree
    with the graph's reference semantics, which the guard does not change."""
    model = onnx.load(str(effnet_onnx))
    kept = [
        n.name
        for n in model.graph.node
        if n.op_type == "Gemm"
        or (n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    ]
    assert len(kept) == 17  # 16 depthwise convs and the classifier
    options = QdqOptions(
        activation_type="uint8", exclude_nodes=tuple(map(re.escape, kept)), **ort_cpu.choose().formats()
    )
    plan = plan_qdq(model, effnet_ranges, options)
    graph = apply_qdq(model, plan)
    optimized = _optimized(graph, tmp_path, "kept_float")
    integer = [n.name for n in optimized.graph.node if n.op_type in INTEGER_KERNELS]
    assert not [name for name in integer if any(name.startswith(k) for k in kept)], integer
    assert not any(
        n.op_type == "DequantizeLinear"
        and n.input[0] in {i.name for i in optimized.graph.initializer}
        and n.name.endswith("_weight_dq")
        for n in optimized.graph.node
    )
    photos = [{"images": examples.normalize_imagenet(examples.photo_crops(8, seed=11))}]
    ort_kernels = fidelity.measure(model, graph, photos).outputs[0]
    reference = fidelity.measure(model, graph, photos, semantics=ort_core.REFERENCE).outputs[0]
    assert ort_kernels.cosine > 0.995 and abs(ort_kernels.cosine - reference.cosine) < 0.002, (
        ort_kernels.cosine,
        reference.cosine,
    )
    # The guard only duplicates DQs per axis: the graph computes exactly what it did without it.
    monkeypatch.setattr(rewrite, "guard_float_layers", lambda m: [])
    unguarded = apply_qdq(model, plan)

    def per_axis(g: onnx.ModelProto) -> int:
        return sum(
            n.op_type == "DequantizeLinear" and n.name.endswith("_per_axis_DequantizeLinear")
            for n in g.graph.node
        )

    # every kept layer but the first depthwise conv, which reads the float stem
    assert (per_axis(graph), per_axis(unguarded)) == (len(kept) - 1, 0)
    runs = [
        fidelity.run_batches(fidelity.session(g, semantics=ort_core.REFERENCE), photos)
        for g in (graph, unguarded)
    ]
    for name, values in runs[0].items():
        np.testing.assert_array_equal(values, runs[1][name])


def _padded_model(opset: int) -> onnx.ModelProto:
    """A third-party-like CNN: fixed batch 1, Constant-node weights, odd names, TF-style explicit Pads
    (one computed from constants, as exporters write static padding, one an initializer)."""
    rng = np.random.default_rng(0)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], name=f"const:{name}", value=numpy_helper.from_array(value)
        )

    nodes = [
        const("w stem", (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)),
        helper.make_node(
            "Conv", ["image:0", "w stem"], ["stem/out"], name="stem conv", strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("Relu", ["stem/out"], ["stem/relu"], name="stem relu"),
        const("pads i64", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.float32)),
        helper.make_node("Cast", ["pads i64"], ["pads computed"], name="pads cast", to=TensorProto.INT64),
        helper.make_node("Pad", ["stem/relu", "pads computed"], ["dw/padded"], name="dw pad"),
        const("w dw", (rng.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32)),
        helper.make_node(
            "Conv", ["dw/padded", "w dw"], ["dw/out"], name="dw conv", group=16, kernel_shape=[3, 3]
        ),
        helper.make_node("Clip", ["dw/out", "zero", "six"], ["dw/relu6"], name="dw relu6"),
        helper.make_node("Pad", ["dw/relu6", "pads2"], ["pw/padded"], name="pw pad"),
        const("w pw", (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)),
        helper.make_node(
            "Conv", ["pw/padded", "w pw"], ["pw/out"], name="pw conv", strides=[2, 2], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["pw/out"], ["pw/relu"], name="pw relu"),
        helper.make_node("GlobalAveragePool", ["pw/relu"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flat"),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads2"),
    ]
    graph = helper.make_graph(
        nodes,
        "third party",
        [helper.make_tensor_value_info("image:0", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _photos(n: int) -> np.ndarray:
    return examples.normalize_imagenet(examples.photo_crops(n, seed=5))[:, :, 80:144, 80:144].copy()


def _quantize_third_party(tmp_path: Path, **settings: Any) -> QuantizeResult:
    """The opset-12, fixed-batch-1 padded model quantized for ORT CPU on 16 + 8 held-out photo crops."""
    source = tmp_path / "third_party.onnx"
    onnx.save(_padded_model(12), str(source))
    photos = _photos(24)
    return quantize(
        source,
        [{"image:0": photos[i : i + 1]} for i in range(len(photos))],
        tmp_path / "out",
        holdout=8,
        min_fidelity="cosine=0.98",
        activation_type="uint8",
        show_progress=False,
        **settings,
    )


def test_pad_fold_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _padded_model(13)
    photos = _photos(8)
    samples = [{"image:0": photos[i : i + 1]} for i in range(len(photos))]
    tensors = [*quantizable_activations(model), "image:0"]  # the stem's input too (quantized below)
    ranges = compute_ranges(collect(model, samples, tensors=tensors, show_progress=False), "minmax")
    # The stem quantized too: a float stem would keep the depthwise conv it feeds float with it (and its Pad).
    options = QdqOptions(activation_type="uint8", tiny_conv_min_channels=1, tiny_conv_min_fan_in=1)
    plan = plan_qdq(model, ranges, options)
    folded = apply_qdq(model, plan)
    monkeypatch.setattr(rewrite, "fold_pads", lambda m: 0)
    unfolded = apply_qdq(model, plan)
    assert Counter(n.op_type for n in unfolded.graph.node)["Pad"] == 2
    assert Counter(n.op_type for n in folded.graph.node)["Pad"] == 0
    pads = {
        n.name: [a.ints for a in n.attribute if a.name == "pads"][0]
        for n in folded.graph.node
        if "conv" in n.name
    }
    assert list(pads["dw conv"]) == [1, 1, 1, 1] and list(pads["pw conv"]) == [0, 0, 1, 1]
    for semantics in (ort_core.REFERENCE, ort_core.ORT_CPU):
        a = fidelity.run_batches(fidelity.session(folded, semantics=semantics), samples)
        b = fidelity.run_batches(fidelity.session(unfolded, semantics=semantics), samples)
        np.testing.assert_allclose(a["features"], b["features"], rtol=0, atol=1e-6)


def test_third_party_opset12_batch1_model_quantizes_for_ort_cpu(tmp_path: Path) -> None:
    """An opset-12, fixed-batch-1 model through the whole pipeline: upgraded, calibrated (the extra output
    tensors included), gated as ORT really runs it, and fully fused."""
    result = _quantize_third_party(tmp_path)
    assert result.passed and result.fidelity.semantics == ort_core.ORT_CPU
    assert "pw/relu" in result.plan.activations and "pooled" in result.plan.activations
    ops = Counter(n.op_type for n in _optimized(result.onnx_path, tmp_path, "tp").graph.node)
    assert ops["QLinearConv"] == 1 and ops["QLinearGlobalAveragePool"] == 1 and ops["Pad"] == 0, ops
    # the 3-channel stem stays float by rule, and so does the depthwise conv it feeds (both Pads fused)
    assert ops["Conv"] + ops["FusedConv"] == 2, ops


def test_learned_rounding_reads_the_folded_pads_of_a_third_party_model(tmp_path: Path) -> None:
    """Learned rounding of the ORT-CPU graph on an opset-12, fixed-batch-1 model whose exporter wrote Pad ->
    Conv: the Pad is folded into the conv there (qdq_fold_pads.py), so the conv's input rows must be gathered
    with the conv's own pads (before, the rows did not match the conv's output and learning crashed)."""
    result = _quantize_third_party(tmp_path, rounding="learned")
    assert result.passed and result.rounding is not None
    learned = {layer.weight for layer in result.rounding.layers}
    pw_weight = next(n.input[1] for n in _padded_model(12).graph.node if n.name == "pw conv")
    assert pw_weight in learned and not result.rounding.skipped
