"""Mixed INT8/FP8 per layer (`--precision int8,fp8`): on the real EfficientNet-Lite0 and real photos the
merged graph has FP8 Q/DQ exactly on the chosen layers and INT8 elsewhere and runs in ONNX Runtime; on a
graph with transformer-like outlier channels, FP8 meets a gate that float fallback cannot within its
compute limit; mixed graphs plan only for GPUs and TensorRT versions that run FP8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli

from calibrators import fidelity
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.qdq import QdqOptions, apply_qdq
from calibrators.qdq_mixed import MixedPlanner
from calibrators.qdq_scales import GraphCache
from calibrators.quantize import quantize, upgrade_opset
from calibrators.quantize_settings import QuantizeSettings
from trtbuild import examples
from trtbuild.core import metrics
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError
from trtbuild.plan import make_plan


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return examples.normalize_imagenet(examples.photo_crops(24, seed=4))


@pytest.fixture(scope="module")
def planner(effnet_onnx: Path, photos: np.ndarray) -> MixedPlanner:
    model = upgrade_opset(onnx.load(str(effnet_onnx)), 19)
    collection = collect(model, [{"images": photos[:16]}], batch_size=8, show_progress=False)
    return MixedPlanner(
        GraphCache(model),
        compute_ranges(collection, "mse"),
        compute_ranges(collection, "mse", grid="fp8"),
        QdqOptions(),
    )


def _dq_types(model: onnx.ModelProto) -> dict[str, int]:
    """Each Conv/Gemm's activation input -> the element type its DequantizeLinear reads."""
    producers = {o: n for n in model.graph.node for o in n.output}
    zero_points = {i.name: i.data_type for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers.get(node.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear":
                out[node.name] = zero_points[dq.input[2]]
    return out


def test_chosen_layers_get_fp8_qdq_the_rest_int8(planner: MixedPlanner, photos: np.ndarray) -> None:
    all_int8 = planner.plan()
    chosen = [n for n in all_int8.quantized_nodes if n in planner.fp8_capable][:6]
    mixed = planner.plan(chosen)
    assert sorted(mixed.fp8_nodes) == sorted(chosen)
    assert sorted(mixed.quantized_nodes) == sorted(all_int8.quantized_nodes)  # none lost to float
    assert not any(e.node in chosen for e in mixed.excluded)
    graph = apply_qdq(planner.cache.model, mixed)
    types = _dq_types(graph)
    assert {types[n] for n in chosen} == {onnx.TensorProto.FLOAT8E4M3FN}
    int8_layers = [n for n in all_int8.quantized_nodes if n not in chosen and n in types]
    assert int8_layers and {types[n] for n in int8_layers} == {onnx.TensorProto.INT8}
    # Runs in ONNX Runtime and stays close to FP32 on held-out photos (FP8 is not always closer than INT8:
    # E4M3 keeps 3 mantissa bits, so which layers gain is measured by the fallback, tested below).
    held = {"images": photos[16:]}
    ref = ort_core.cpu_session(planner.cache.model).run(None, held)[0]
    mix = fidelity.session(graph).run(None, held)[0]
    assert metrics.sqnr_db(ref, mix) > 15.0


def test_a_tensor_read_by_int8_and_fp8_layers_gets_one_pair_of_each(tmp_path: Path) -> None:
    """Q, K and V read one activation; with Q in FP8 and K, V in INT8 the activation gets one Q/DQ pair of
    each precision, every reader rewired to its own, and the graph runs close to FP32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), f"w{i}")
        for i in range(3)
    ]
    graph = helper.make_graph(
        [
            *(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)),
            helper.make_node("Sum", ["y0", "y1", "y2"], ["y"], name="sum"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 64])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = rng.standard_normal((16, 8, 64)).astype(np.float32)
    collection = collect(model, [{"x": x}], batch_size=8, show_progress=False)
    planner = MixedPlanner(
        GraphCache(model),
        compute_ranges(collection, "mse"),
        compute_ranges(collection, "mse", grid="fp8"),
        QdqOptions(),
    )
    mixed = planner.plan(["proj0"])
    pairs = {a.dtype: a for a in mixed.activations.values() if a.tensor == "x"}
    assert sorted(pairs) == ["fp8", "int8"]
    assert {c[0] for c in pairs["fp8"].consumers} == {"proj0"}
    assert {c[0] for c in pairs["int8"].consumers} == {"proj1", "proj2"}
    graph_out = apply_qdq(model, mixed)
    readers = {n.name: n.input[0] for n in graph_out.graph.node if n.name.startswith("proj")}
    assert readers["proj0"] != readers["proj1"] == readers["proj2"]
    ref = ort_core.cpu_session(model).run(None, {"x": x})[0]
    out = fidelity.session(graph_out).run(None, {"x": x})[0]
    assert metrics.sqnr_db(ref, out) > 25.0


def _outlier_model(path: Path) -> tuple[Path, np.ndarray]:
    """MatMul -> Relu -> MatMul whose input has two channels 60x the others, the way transformer
    activations do: per-tensor INT8 steps then swallow the small channels, E4M3 keeps them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32)
    x[:, :2] *= 60
    return path, x


def test_int8_fp8_meets_a_gate_that_float_fallback_cannot(tmp_path: Path) -> None:
    """All-INT8 measures cosine ~0.991; keeping mm1 float would put 80% of the MACs in float (over the
    50% limit), so float fallback stops; mm1 in FP8 passes with nothing float."""
    model, x = _outlier_model(tmp_path / "outliers.onnx")
    base = QuantizeSettings(holdout=32, min_fidelity="cosine=0.997", output_kind=["y=regression"])
    with pytest.raises(TrtbuildError, match="auto-fallback stopped"):
        quantize(model, x, tmp_path / "float", base, show_progress=False, auto_fallback=True)
    result = quantize(
        model, x, tmp_path / "mixed", base, show_progress=False, auto_fallback=True, fallback_precision="fp8"
    )
    assert result.passed and result.plan.fp8_nodes == ["mm1"] and not result.plan.excluded
    assert result.onnx_path.name == "outliers.int8fp8.onnx" and result.float_compute == 0.0
    assert 0.5 < result.fp8_compute < 1.0 and result.to_json()["fp8_layers"] == ["mm1"]
    kinds = {i.data_type for i in onnx.load(str(result.onnx_path)).graph.initializer}
    assert {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT8} <= kinds

    # Plans: strongly typed on an FP8 GPU; A100 (sm80) and TensorRT 8.6 refuse with the reason.
    plan = make_plan(model, "h100", "int8", qdq_onnx=result.onnx_path, out_root=str(tmp_path))
    assert plan.strongly_typed and any("mixed INT8/FP8" in n for n in plan.notes)
    with pytest.raises(TrtbuildError, match="FP8 needs sm89"):
        make_plan(model, "a100", "int8", qdq_onnx=result.onnx_path, out_root=str(tmp_path))
    with pytest.raises(TrtbuildError, match="FP8 needs TensorRT 10.0"):
        make_plan(model, "l4", "int8", trt_version="8.6", qdq_onnx=result.onnx_path, out_root=str(tmp_path))


def test_mixed_needs_auto_fallback_on_int8() -> None:
    with pytest.raises(TrtbuildError, match="through auto-fallback"):
        QuantizeSettings(fallback_precision="fp8")
    with pytest.raises(TrtbuildError, match="through auto-fallback"):
        QuantizeSettings(fallback_precision="fp8", auto_fallback=True, activation_type="uint8")


def test_cli_refuses_int8_fp8_for_ort_cpu(effnet_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        [
            "quantize",
            str(effnet_onnx),
            "--data",
            "x",
            "--precision",
            "int8,fp8",
            "--activation-type",
            "uint8",
        ],
        capsys,
    )
    assert code == 2 and "mixed INT8/FP8 graphs are for TensorRT" in err and "Traceback" not in err


def test_cli_int8_fp8_on_a_third_party_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Opset 12, weights as Constant nodes, names with spaces/slashes/colons, a fixed batch of 1: the
    weights are found (moved into initializers), quantized, and the run writes its set."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32))
    w2 = numpy_helper.from_array((rng.standard_normal((64, 16)) / 8).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W 1"], value=w1),
            helper.make_node("Constant", [], ["w2/x:0"], value=w2),
            helper.make_node("MatMul", ["in:0", "W 1"], ["h"], name="mm/1"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2/x:0"], ["out:0"], name="mm/2"),
        ],
        "third party",
        [helper.make_tensor_value_info("in:0", TensorProto.FLOAT, [1, 8, 64])],
        [helper.make_tensor_value_info("out:0", TensorProto.FLOAT, [1, 8, 16])],
    )
    model = tmp_path / "third.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), model)
    x = np.random.default_rng(1).standard_normal((64, 8, 64)).astype(np.float32)
    np.save(tmp_path / "data.npy", x)
    code, out, err = run_cli(
        [
            "quantize",
            str(model),
            "--data",
            str(tmp_path / "data.npy"),
            "--precision",
            "int8,fp8",
            "--holdout",
            "16",
            "--min-fidelity",
            "cosine=0.99",
            "--output-kind",
            "out:0=regression",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    written = onnx.load(str(tmp_path / "third.int8.onnx"))
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in written.graph.initializer) >= 2  # both weights
    assert not any(n.op_type == "Constant" for n in written.graph.node)
