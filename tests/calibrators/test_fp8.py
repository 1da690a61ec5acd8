"""FP8 (E4M3) Q/DQ: the numpy grid against ONNX Runtime's FP8 QuantizeLinear, TensorRT's FP8 placement
rules, the MSE range search on the FP8 grid, `trtbuild quantize --precision fp8` on a real transformer (FP8
beats INT8 there) and `trtbuild plan --precision fp8` quantizing by itself or refusing GPUs without FP8."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calibrators import fidelity, fp8
from calibrators import weights as wq
from calibrators.histogram import TensorStats
from calibrators.methods import mse_amax
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq
from calibrators.quantize import quantize, upgrade_opset
from calibrators.ranges import TensorRange
from trtbuild.cli import main
from trtbuild.core import ort as ort_core
from trtbuild.core import output_set
from trtbuild.core.errors import TrtbuildError


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _qdq_graph(scale: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0]),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),  # Relu -> Q: ORT's ClipQuantRewrite must stay off for FP8
        helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 19)]
    )
    model.ir_version = 9
    return model


def test_numpy_fp8_grid_is_onnx_runtimes() -> None:
    """Round-to-nearest-even, subnormals and saturation at 448, exactly as ORT's FP8 QuantizeLinear, with
    the Relu kept (ORT's default ReluQuantRewrite would drop it before an FP8 Q: trtbuild/core/ort.py)."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.standard_normal(5000) * 10.0 ** rng.uniform(-4, 1, 5000), [0.0, 500.0, 1e6, 1e-9]]
    ).astype(np.float32)
    scale = 0.05
    got = ort_core.cpu_session(_qdq_graph(scale), ort_core.REFERENCE).run(None, {"x": x})[0]
    ours = fp8.round_fp8(np.maximum(x, 0) / np.float32(scale)) * np.float32(scale)
    np.testing.assert_array_equal(got, ours.astype(np.float32))
    assert got.max() == pytest.approx(448 * scale)  # saturates, never NaN
    grid = np.unique(fp8.round_fp8(np.concatenate([[0.0], np.geomspace(2.0**-10, 448, 200_000)])))
    assert len(grid) == 127 and grid[1] == 2.0**-9  # 126 positive E4M3 values (subnormals from 2^-9) + 0


def test_mse_range_search_rounds_on_the_fp8_grid() -> None:
    """On a heavy-tailed tensor the INT8 search clips hard; on FP8's log-like grid clipping buys little,
    so the FP8 range is wider, and each range is the better one on its own grid."""
    rng = np.random.default_rng(1)
    values = rng.standard_t(3, 200_000).astype(np.float32)
    stats = TensorStats("t")
    stats.update(values.copy())
    amax_int8, amax_fp8 = mse_amax(stats), mse_amax(stats, grid="fp8")
    assert amax_fp8 > amax_int8

    def int8_error(amax: float) -> float:
        s = amax / 127
        return float(np.mean((np.clip(np.rint(values / s), -127, 127) * s - values) ** 2))

    def fp8_error(amax: float) -> float:
        s = amax / fp8.E4M3_MAX
        return float(np.mean((fp8.round_fp8(values / s) * s - values) ** 2))

    assert fp8_error(amax_fp8) < fp8_error(amax_int8)
    assert int8_error(amax_int8) < int8_error(amax_fp8)


def _conv_net(opset: int = 13, batch: int | str = "n") -> onnx.ModelProto:
    """A third-party-like CNN: odd names, Constant-node weights, opset 13, a depthwise conv, a 7x7 conv,
    a narrow conv, a pool and a residual Add."""
    rng = np.random.default_rng(0)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name)
        )

    nodes = [
        const("w.stem", rng.standard_normal((32, 3, 3, 3)) * 0.3),
        const("w dw", rng.standard_normal((32, 1, 3, 3)) * 0.3),
        const("w/pw", rng.standard_normal((32, 32, 1, 1)) * 0.2),
        const("w7", rng.standard_normal((32, 32, 7, 7)) * 0.03),
        const("w_narrow", rng.standard_normal((8, 32, 1, 1)) * 0.2),
        helper.make_node("Conv", ["in:0", "w.stem"], ["a"], pads=[1, 1, 1, 1], name="stem conv"),
        helper.make_node("Relu", ["a"], ["a_r"]),
        helper.make_node("Conv", ["a_r", "w dw"], ["b"], pads=[1, 1, 1, 1], group=32, name="dw/conv"),
        helper.make_node("Relu", ["b"], ["b_r"]),
        helper.make_node("Conv", ["b_r", "w/pw"], ["c"], name="pw.conv"),
        helper.make_node("Add", ["c", "a_r"], ["d"], name="residual"),
        helper.make_node("MaxPool", ["d"], ["e"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["e", "w7"], ["f"], pads=[3, 3, 3, 3], name="big kernel"),
        helper.make_node("Conv", ["f", "w_narrow"], ["out:0"], name="narrow"),
    ]
    x = helper.make_tensor_value_info("in:0", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("out:0", TensorProto.FLOAT, [batch, 8, 8, 8])
    return helper.make_model(
        helper.make_graph(nodes, "odd", [x], [y]), opset_imports=[helper.make_opsetid("", opset)]
    )


@pytest.mark.parametrize("opset", [12, 13])
def test_fp8_placement_follows_tensorrt_fp8_rules(opset: int) -> None:
    model = upgrade_opset(_conv_net(opset), fp8.FP8_OPSET)
    assert model.opset_import[0].version == fp8.FP8_OPSET and model.ir_version >= 9
    ranges = {t: TensorRange(t, 4.0, -4.0, 4.0) for t in ("in:0", "a_r", "b_r", "c", "d", "e", "f")}
    plan = plan_qdq(model, ranges, QdqOptions(activation_type="fp8"))
    int8 = plan_qdq(model, ranges, QdqOptions(activation_type="int8"))
    assert plan.quantized_nodes == ["pw.conv"]
    reasons = plan.excluded_nodes()
    assert "taps" in reasons["big kernel"] and "small-channel" in reasons["narrow"]
    assert "small-channel" in reasons["dw/conv"] and "small-channel" in reasons["stem conv"]
    assert {"dw/conv", "big kernel", "narrow"} <= set(int8.quantized_nodes)  # INT8 quantizes those
    assert "e" in int8.activations and "e" not in plan.activations  # no FP8 pooling: no Q/DQ around it
    assert all(a.dtype == "fp8" and a.scale == pytest.approx(4.0 / 448) for a in plan.activations.values())
    qmodel = apply_qdq(model, plan)
    weights = {i.name: i for i in qmodel.graph.initializer}
    assert weights["w/pw_quantized"].data_type == TensorProto.FLOAT8E4M3FN
    zero_points = [weights[n.input[2]] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.data_type == TensorProto.FLOAT8E4M3FN for z in zero_points)
    scales = numpy_helper.to_array(weights["w/pw_scale"])
    w = next(numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.output[0] == "w/pw")
    np.testing.assert_allclose(scales, np.abs(w).reshape(32, -1).max(1) / 448, rtol=1e-6)
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = ort_core.cpu_session(model).run(None, {"in:0": x})[0]
    got = ort_core.cpu_session(qmodel).run(None, {"in:0": x})[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert 0.99 < cos < 1.0


def test_fp8_needs_opset_19_and_fp8_weights() -> None:
    ranges = {t: TensorRange(t, 4.0, -4.0, 4.0) for t in ("in:0", "a_r", "b_r", "c", "d", "e", "f")}
    with pytest.raises(TrtbuildError, match="opset 19"):
        apply_qdq(_conv_net(), plan_qdq(_conv_net(), ranges, QdqOptions(activation_type="fp8")))
    with pytest.raises(TrtbuildError, match="FP8 weights and FP8 activations"):
        QdqOptions(activation_type="uint8", weight_format="fp8")
    assert QdqOptions(activation_type="fp8").weight_format == wq.FP8


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    from test_quantize_models import build_minilm_onnx

    return build_minilm_onnx(tmp_path_factory.mktemp("minilm"))


def test_quantize_fp8_minilm_beats_int8(minilm: tuple[Path, list], tmp_path: Path) -> None:
    """MiniLM's activations have outliers: FP8's wide grid keeps them and the small values both, so the FP8
    graph is closer to FP32 than plain per-tensor INT8 (same data, same held-out samples; SmoothQuant off:
    with it, INT8 catches up, docs/smoothquant.md); ORT runs it on the CPU."""
    path, samples = minilm
    data = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    results = {
        p: quantize(
            path,
            data,
            tmp_path / p,
            activation_type=p,
            holdout=8,
            min_fidelity="cosine=0.9",
            smooth_quant="off",
        )
        for p in ("int8", "fp8")
    }
    fp8_result = results["fp8"]
    assert fp8_result.onnx_path.name == "minilm.fp8.onnx"
    qmodel = onnx.load(str(fp8_result.onnx_path))
    assert next(o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx")) == 19
    report = json.loads(fp8_result.report_path.read_text())
    assert report["activation_type"] == "fp8" and report["fidelity"]["semantics"] == ort_core.REFERENCE
    attention = [e for e in fp8_result.plan.excluded if "attention" in e.reason]
    assert attention  # score MatMuls on unknown sequence length stay float, as for INT8
    # No residual Add reads an FP8 Q/DQ: each feeds a LayerNorm, so its fused output stays FP16 in TensorRT
    # and a Q/DQ on its skip would only add rounding error (calibrators/qdq_residual.py).
    dequantized = {n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    adds = [n for n in qmodel.graph.node if n.op_type == "Add"]
    assert adds and not [n.name for n in adds if dequantized & set(n.input)]
    cos = {p: r.fidelity.outputs[0].cosine for p, r in results.items()}
    assert cos["fp8"] > cos["int8"] and cos["fp8"] > 0.99, cos
    # The written graph, re-run from disk in a fresh session, gives the reported fidelity.
    held = [{k: v[-8:] for k, v in data.items()}]
    reference = fidelity.run_batches(fidelity.session(onnx.load(str(path))), held)
    again = fidelity.run_batches(fidelity.session(str(fp8_result.onnx_path)), held)
    assert fidelity.compare(reference, again).outputs[0].cosine == pytest.approx(cos["fp8"], abs=0.01)
    # TensorRT's legacy calibration cache is INT8-only: the FP8 set has none, and an FP8 run into the INT8
    # run's folder removes that run's cache (it would not match the FP8 ranges written beside it).
    assert report["cache"] is None and "cache" not in report[output_set.MANIFEST_KEY]
    assert not list((tmp_path / "fp8").glob("*.calib.cache"))
    int8_cache = results["int8"].cache_path
    assert int8_cache is not None and int8_cache.is_file()
    quantize(path, data, tmp_path / "int8", activation_type="fp8", holdout=8, min_fidelity="cosine=0.9")
    assert not int8_cache.exists()


@pytest.fixture(params=["n", 1], ids=["dynamic-batch", "batch-1"])
def conv_data(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    model = tmp_path / "net.onnx"
    onnx.save(_conv_net(batch=request.param), str(model))
    data = tmp_path / "data.npz"
    x = np.random.default_rng(3).standard_normal((40, 3, 16, 16)).astype(np.float32)
    arrays: dict[str, Any] = {"in:0": x}  # Any: numpy's stub types **kwds like allow_pickle
    np.savez(data, **arrays)
    return model, data


@pytest.mark.parametrize("target", ["a100", "orin-jp6.2", "xavier-jp5"])
def test_plan_fp8_refuses_gpus_without_fp8(
    conv_data: tuple[Path, Path], tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = conv_data
    out = tmp_path / "engines"
    args = ["plan", str(model), "-t", target, "-p", "fp8", "--data", str(data), "--out", str(out)]
    code, stdout, stderr = run(args, capsys)
    assert code == 2 and not stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "cannot run FP8" in lines[0], stderr
    assert "sm89" in lines[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_quantize_fp8_refuses_uint8_activations(
    conv_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = conv_data
    args = ["quantize", str(model), "--data", str(data), "--precision", "fp8", "--activation-type", "uint8"]
    code, _, stderr = run([*args, "--out-dir", str(tmp_path / "q")], capsys)
    assert code == 2 and stderr.startswith("error:") and "uint8" in stderr and len(stderr.splitlines()) == 1
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("target,trt", [("h100", None), ("l4", "11.4")])
def test_plan_fp8_quantizes_by_itself(
    conv_data: tuple[Path, Path],
    tmp_path: Path,
    target: str,
    trt: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No --qdq-onnx: the plan quantizes at FP8 from --data (gated), then builds it strongly typed with FP16
    float parts, on TensorRT 10.x and 11.x alike."""
    model, data = conv_data
    out = tmp_path / "engines"
    args = ["plan", str(model), "-t", target, "-p", "fp8", "--data", str(data), "--out", str(out), "--json"]
    code, stdout, stderr = run([*args, *(["--trt-version", trt] if trt else [])], capsys)
    assert code == 0, stderr
    plan = json.loads(stdout)["plan"]
    assert plan["onnx_kind"] == "qdq" and plan["strongly_typed"] and not plan["builder_flags"]
    graph = onnx.load(plan["onnx"])
    q_types = {
        i.data_type
        for i in graph.graph.initializer
        if i.name in {n.input[2] for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    }
    assert q_types == {TensorProto.FLOAT8E4M3FN}
    assert (out / "net" / "net.fp8.onnx").is_file() and (out / "net" / "net.fidelity.json").is_file()
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert np.isfinite(ort_core.cpu_session(graph).run(None, {"in:0": x})[0]).all()


@pytest.mark.slow  # about 2-5 minutes on 2 cores: an export and two quantize runs with a fallback search
def test_fp8_auto_fallback_on_a_dynamo_export_with_batch_1(
    effnet_model: torch.nn.Module, tmp_path: Path
) -> None:
    """The product's export (dynamo, fixed batch 1) of EfficientNet-Lite0 at FP8 on real photos: a gate a
    quarter of the way from the plain FP8 graph to perfect makes auto-fallback keep a few layers FP16."""
    from export.pipeline import export_model
    from trtbuild import examples

    photos = examples.write_photo_folder(tmp_path / "photos", 24, seed=3)
    path = export_model(
        effnet_model,
        ["images:1x3x224x224"],
        tmp_path / "effnet.onnx",
        dynamic_batch=False,
        output_names=["logits"],
    ).onnx_path
    common: dict[str, Any] = {"samples": 8, "holdout": 16, "show_progress": False, "activation_type": "fp8"}
    plain = quantize(path, photos, tmp_path / "plain", min_fidelity=0, **common)
    base = plain.fidelity.outputs[0].cosine
    assert plain.fidelity.semantics == ort_core.REFERENCE and 0.9 < base < 1.0
    wanted = base + (1.0 - base) * 0.25
    result = quantize(
        path,
        photos,
        tmp_path / "out",
        min_fidelity=[f"logits:cosine={wanted:.6f}"],
        auto_fallback=True,
        **common,
    )
    assert result.fallback is not None and not result.fallback.baseline.passed and result.passed
    assert 1 <= len(result.fallback.kept_float) < len(result.plan.quantized_nodes) // 2
    assert result.fidelity.outputs[0].cosine >= wanted and result.onnx_path.name == "effnet.fp8.onnx"
