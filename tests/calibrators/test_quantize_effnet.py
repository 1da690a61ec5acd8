"""Quantizing the real EfficientNet-Lite0 on real photos: gate, artifacts, ORT INT8 kernels, fallback, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import run_cli as _run_cli

from calibrators import fallback, fidelity, ort_cpu
from calibrators.cache import read_cache_with_header
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.methods import DEFAULT_METHOD
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from calibrators.ranges import RangeSet
from trtbuild import examples


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_photo_folder(tmp_path_factory.mktemp("photos"), 40, seed=3)


@pytest.fixture(scope="module")
def cli_run(effnet_onnx: Path, photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("quantized")
    from click.testing import CliRunner

    from trtbuild.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "quantize",
            str(effnet_onnx),
            "--data",
            str(photo_folder),
            "--samples",
            "24",
            "--holdout",
            "16",
            "--out-dir",
            str(out),
            "--auto-fallback",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return {"out": out, "summary": json.loads(result.stdout)}


def test_cli_quantize_meets_default_gate_and_writes_all_artifacts(cli_run: dict) -> None:
    summary, out = cli_run["summary"], cli_run["out"]
    assert summary["fidelity"]["passed"] is True
    logits = summary["fidelity"]["outputs"][0]
    assert logits["top1_agreement"] >= 0.99 and logits["kl"] is not None
    assert summary["calibration_samples"] == 24 and summary["holdout_samples"] == 16
    assert summary["quantized_layers"] >= 45  # at most 4 of 50 layers float: the stem and few fallbacks
    floats = {f["node"]: f["reason"] for f in summary["float_layers"]}
    assert "/_conv_stem/Conv" in floats and len(floats) <= 4, floats
    assert all("auto-fallback" in why for node, why in floats.items() if node != "/_conv_stem/Conv")
    model = onnx.load(str(out / "efficientnet_lite0.int8.onnx"))
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] >= 49 and ops["DequantizeLinear"] >= 2 * 49
    ranges = RangeSet.load(out / "efficientnet_lite0.ranges.json")
    assert ranges.method == DEFAULT_METHOD
    header, scales = read_cache_with_header(out / "efficientnet_lite0.calib.cache")
    assert header.startswith("TRT-") and "EntropyCalibration2" in header
    for name, r in ranges.items():  # the cache and the ranges come from the same numbers
        assert scales[name] == pytest.approx(r.amax / 127, rel=1e-6)
    # Every activation Q/DQ in the graph uses the same numbers (shared groups take the group's max).
    for init in model.graph.initializer:
        if init.name.endswith("_scale") and init.name[: -len("_scale")] in ranges:
            t = init.name[: -len("_scale")]
            assert float(onnx.numpy_helper.to_array(init)) >= ranges[t].amax / 127 * (1 - 1e-6)
    report = json.loads((out / "efficientnet_lite0.fidelity.json").read_text())
    assert report["plan"]["activation_type"] == "int8"
    # A TensorRT graph is judged by its reference Q/DQ semantics, and both the report and the graph say so.
    assert report["fidelity"]["semantics"] == "reference" and report["target"] == "tensorrt"
    assert {p.key: p.value for p in model.metadata_props}["trtbuild.qdq_target"] == "tensorrt"


def test_uint8_graph_runs_with_fused_int8_kernels(effnet_onnx: Path, cli_run: dict, tmp_path: Path) -> None:
    model = onnx.load(str(effnet_onnx))
    ranges = RangeSet.load(cli_run["out"] / "efficientnet_lite0.ranges.json")
    fmt = ort_cpu.choose().weight_format  # int7 where this CPU's u8 x s8 kernels saturate
    qmodel = apply_qdq(model, plan_qdq(model, ranges, QdqOptions(activation_type="uint8", weight_format=fmt)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(qmodel.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert fused["QLinearConv"] >= 45, fused  # real integer convolutions, not float convs on dequantized data
    assert fused["QLinearAdd"] >= 5 and fused["QGemm"] == 1, fused
    photos = examples.normalize_imagenet(examples.photo_crops(8, seed=11))
    report = fidelity.measure(model, qmodel, [{"images": photos}])
    assert report.semantics == "ort-cpu"  # measured as ORT really runs it here, fused kernels included
    assert report.outputs[0].cosine > 0.99 and report.outputs[0].sqnr_db > 15, report.summary()


def test_gate_failure_exits_2_and_writes_nothing(
    effnet_onnx: Path, photo_batch: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Random crops give low-margin predictions: min-max INT8 flips some top-1s, below the 99% gate."""
    np.save(tmp_path / "crops.npy", photo_batch[:24])
    out = tmp_path / "out"
    code, _, err = _run_cli(
        [
            "quantize",
            str(effnet_onnx),
            "--data",
            str(tmp_path / "crops.npy"),
            "--samples",
            "8",
            "--holdout",
            "16",
            "--method",
            "minmax",
            "--out-dir",
            str(out),
        ],
        capsys,
    )
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "fidelity below the gate" in error_lines[0]
    assert "--auto-fallback" in error_lines[0]
    assert "FAIL" in err  # the report table explains which output failed
    assert not out.exists() or not any(out.iterdir())


def test_auto_fallback_lifts_a_failing_model_over_the_gate(
    effnet_onnx: Path, photo_batch: np.ndarray
) -> None:
    model = onnx.load(str(effnet_onnx))
    calib, held = photo_batch[:16], photo_batch[16:]
    collection = collect(
        model,
        [calib[i : i + 1] for i in range(16)],
        tensors=quantizable_activations(model),
        show_progress=False,
    )
    ranges = compute_ranges(collection, "minmax")
    # Min-max ranges without bias correction, held to a cosine a third of the way from there to perfect.
    options = QdqOptions(bias_correction=False)
    plain = fidelity.measure(model, apply_qdq(model, plan_qdq(model, ranges, options)), [{"images": held}])
    base_cos = plain.outputs[0].cosine
    wanted = base_cos + (1 - base_cos) / 3
    threshold = fidelity.parse_min_fidelity([f"logits:cosine={wanted:.6f}"])
    result = fallback.auto_fallback(model, ranges, options, [{"images": held}], threshold)
    assert not result.baseline.passed, "the forced configuration must fail the gate before fallback"
    assert result.passed and result.final.outputs[0].cosine >= wanted
    total = len(plan_qdq(model, ranges).quantized_nodes)
    assert 1 <= len(result.kept_float) < total // 2, result.trials
    assert result.float_compute < 0.5 and result.stopped is None
    assert result.final.score() < result.baseline.score()
    why = result.why()
    assert set(why) == set(result.kept_float) and all(s.gain > 0 for s in why.values())
    reasons = {e.node: e.reason for e in result.plan.excluded}
    assert all("auto-fallback" in reasons[n] for n in result.kept_float)
    # the model returned is the verified one
    rerun = fidelity.measure(model, result.model, [{"images": held}], threshold)
    assert rerun.passed


def _tiny_relu_model(path: Path) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["logits"])],
        "relu",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 224, 224])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_model", "does not exist"),
        ("empty_folder", "no images"),
        ("bad_fidelity", "--min-fidelity"),
        ("bad_regex", "not a valid regex"),
        ("no_quantizable_ops", "no quantizable ops"),
        ("wrong_shape", "the model expects"),
        ("holdout_too_big", "cannot hold out"),
        ("bad_trt_version", "TensorRT"),
    ],
)
def test_cli_bad_inputs_exit_2_one_line_nothing_written(
    case: str,
    expected: str,
    effnet_onnx: Path,
    photo_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    model, data, extra = str(effnet_onnx), str(photo_folder), ["--samples", "4", "--holdout", "4"]
    if case == "missing_model":
        model = str(tmp_path / "nope.onnx")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif case == "bad_fidelity":
        extra += ["--min-fidelity", "lots"]
    elif case == "bad_regex":
        extra += ["--exclude", "conv["]
    elif case == "no_quantizable_ops":
        model = str(_tiny_relu_model(tmp_path / "relu.onnx"))
    elif case == "wrong_shape":
        np.save(tmp_path / "x.npy", np.zeros((12, 3, 100, 100), np.float32))
        data = str(tmp_path / "x.npy")
    elif case == "holdout_too_big":
        extra = ["--holdout", "400"]
    elif case == "bad_trt_version":
        extra += ["--trt-version", "banana"]
    code, stdout, err = _run_cli(["quantize", model, "--data", data, "--out-dir", str(out), *extra], capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected.lower() in lines[0].lower()
    assert not out.exists() or not any(out.iterdir())
    assert stdout == ""
