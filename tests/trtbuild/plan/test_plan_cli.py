"""`trtbuild plan / build / inspect` on the real EfficientNet-Lite0 ONNX, through the CLI's error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trtbuild.cli import main
from trtbuild.plan import BuildPlan
from trtbuild.trtexec import render


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def model(tmp_path: Path, effnet_onnx: Path) -> Path:
    path = tmp_path / "effnet.onnx"
    shutil.copy(effnet_onnx, path)
    return path


def test_plan_saves_plan_and_script(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_root = model.parent / "engines"
    code, out, err = run(
        [
            "plan",
            str(model),
            "-t",
            "h100",
            "-p",
            "fp16",
            "--out",
            str(out_root),
            "--shape",
            "images:1x3x224x224,8x3x224x224,32x3x224x224",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    payload = json.loads(out)
    plan = BuildPlan.load(payload["plan_path"])
    assert plan.to_json() == payload["plan"]
    assert plan.precision == "fp16" and plan.trt_version == "10.13" and plan.builder_flags == ("FP16",)
    assert plan.inputs[0].opt_shape == (8, 3, 224, 224)
    script = Path(payload["trtexec_script"])
    text = script.read_text()
    assert script.stat().st_mode & 0o111 and text.startswith("#!/usr/bin/env bash")
    assert "--fp16" in text and "--optShapes=images:8x3x224x224" in text
    assert Path(payload["plan_path"]).parent == out_root / "effnet" / "plans"


def test_plan_table_and_trt11_fp16_graph(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TensorRT 11 has no FP16 flag: `plan` writes the FP16 graph and plans a strongly typed build from it."""
    out_root = model.parent / "engines"
    code, out, err = run(
        ["plan", str(model), "-t", "a100", "-p", "fp16", "--trt-version", "11.4", "--out", str(out_root)],
        capsys,
    )
    assert code == 0, err
    assert "strongly typed" in out and "trtexec --onnx=" in out
    plan = BuildPlan.load(out_root / "effnet" / "plans" / "a100-fp16-trt11.4.plan.json")
    assert plan.onnx_kind == "fp16" and Path(plan.onnx).is_file() and plan.strongly_typed
    argv = render(plan)
    assert not {"--fp16", "--stronglyTyped"} & set(argv)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["-t", "a100", "-p", "fp8"], "cannot run FP8"),
        (["-t", "thor", "-p", "fp16", "--dla-core", "0"], "has no DLA"),
        (["-t", "a100", "-p", "int8", "--calib-cache", "CACHE", "--dla-core", "0"], "has no DLA"),
        (
            ["-t", "h100", "-p", "int8", "--trt-version", "11.4", "--calib-cache", "CACHE"],
            "removed calibrators",
        ),
        (["-t", "xavier-jp5", "-p", "bf16"], "cannot run BF16"),
        (["-t", "xavier-jp5", "-p", "fp16", "--opt-level", "3"], "needs TensorRT 8.6+"),
        (["-t", "h100", "-p", "bf16", "--trt-version", "11.4"], "BF16-typed graph"),
        (["-t", "h100", "-p", "int8"], "needs a Q/DQ graph or a calibration cache"),
        (["-t", "nope", "-p", "fp16"], "unknown target"),
        (["-t", "h100", "-p", "fp64"], "unknown precision"),
        (["-t", "h100", "-p", "fp16", "--shape", "images:1x3"], "rank"),
        (["-t", "h100", "-p", "fp16", "--shape", "pixels:1x3x224x224"], "model's inputs"),
        (["-t", "h100", "-p", "int8", "--qdq-onnx", "missing.onnx"], "does not exist"),
        # The cache says 10.3; TensorRT 10.13 would skip it and calibrate on random data.
        (["-t", "h100", "-p", "int8", "--calib-cache", "CACHE"], "has header TRT-100300-EntropyCalibration2"),
        (["-t", "orin-jp7", "-p", "fp16", "--dla-core", "0"], "TensorRT 10.16 has no DLA support"),
        (["-t", "orin-jp7", "-p", "fp16", "--trt-version", "10.13"], "ships TensorRT 10.16, not 10.13"),
        (["-t", "h100", "-p", "fp16", "--trt-version", "8.10.0"], "not a release trtbuild knows"),
    ],
)
def test_bad_combinations_exit_2(
    model: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    cache = model.parent / "effnet.calib.cache"
    cache.write_text("TRT-100300-EntropyCalibration2\nimages: 3c008912\n")
    args = [str(cache) if a == "CACHE" else a for a in args]
    out_root = model.parent / "engines"
    code, out, err = run(["plan", str(model), *args, "--out", str(out_root)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], err
    assert not out_root.exists()  # nothing written


def test_build_without_tensorrt_names_plan_and_script(
    model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_root = model.parent / "engines"
    code, _, _ = run(["plan", str(model), "-t", "orin-jp6.2", "-p", "fp16", "--out", str(out_root)], capsys)
    assert code == 0
    plan_path = out_root / "effnet" / "plans" / "orin-jp6.2-fp16-trt10.3.plan.json"
    code, out, err = run(["build", str(plan_path)], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "TensorRT" in line and str(plan_path) in line and "10.3" in line
    assert str(plan_path).replace(".plan.json", ".trtexec.sh") in line
    assert not Path(BuildPlan.load(plan_path).engine).exists()
    # From the ONNX directly: the plan and trtexec script are saved first, and the message points at both.
    code, out, err = run(["build", str(model), "-t", "h100", "-p", "fp16", "--out", str(out_root)], capsys)
    assert code == 2 and ".plan.json" in err and ".trtexec.sh" in err
    code, out, err = run(["build", str(model)], capsys)
    assert code == 2 and "--target and --precision" in err


def test_inspect_without_sidecar_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not an engine")
    code, _, err = run(["inspect", str(engine)], capsys)
    assert code == 2 and "no sidecar" in err


def test_inspect_shows_sidecar_without_tensorrt(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trtbuild.engine_meta import EngineMeta, TensorInfo, write_meta
    from trtbuild.hardware import tensorrt_available
    from trtbuild.plan import make_plan

    plan = make_plan(model, "a100", "fp16", out_root=tmp_path)
    meta = EngineMeta(
        "10.13.0",
        "NVIDIA A100-SXM4-80GB",
        "8.0",
        "fp16",
        (TensorInfo("images", "input", (-1, 3, 224, 224), "float"),),
        str(model),
        "ab" * 32,
        plan.to_json(),
        12.5,
        9_000_000,
        1 << 24,
        80,
    )
    engine = tmp_path / "a.engine"
    engine.write_bytes(b"engine bytes from a device")
    write_meta(meta, engine)
    if tensorrt_available():
        pytest.skip(
            "with TensorRT installed, inspect deserializes the engine; this checks the sidecar-only path"
        )
    code, out, err = run(["inspect", str(engine), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["sidecar"]["gpu_name"] == "NVIDIA A100-SXM4-80GB" and info["layers"] is None
    code, out, _ = run(["inspect", str(engine)], capsys)
    assert code == 0 and "NVIDIA A100-SXM4-80GB" in out and "TensorRT is not installed" in out


def test_plan_settings_api_derives_the_fp16_graph(tmp_path: Path) -> None:
    """`plan` and `build` share one settings object; a strongly typed FP16 plan (TensorRT 11) gets its FP16
    graph converted by the API, not by the command."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from trtbuild.plan import PlanSettings
    from trtbuild.plan_graphs import plan_model

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w],
    )
    model = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    plan = plan_model(
        model, PlanSettings(target="h100", precision="fp16", trt_version="11.4", out_root=str(tmp_path))
    )
    assert plan.strongly_typed and plan.onnx.endswith(".fp16.onnx") and Path(plan.onnx).is_file()
    fp16 = onnx.load(plan.onnx)
    assert fp16.graph.input[0].type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    assert any(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
