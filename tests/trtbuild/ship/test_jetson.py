"""Jetson bundle folders for EfficientNet-Lite0 with ranges calibrated on real photos.

No Jetson here: build.sh / profile.sh are run against a stand-in `trtexec` (a shell script that records its
arguments) to check the scripts' own logic (version check, paths, flags), never a TensorRT result.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from calibrators.cache import read_cache_with_header
from calibrators.calibrate import calibrate
from calibrators.ranges import RangeSet
from trtbuild.cli import cli
from trtbuild.core.errors import TrtbuildError
from trtbuild.ship.jetson import JetsonBundle, export_jetson


@pytest.fixture(scope="module")
def ranges(effnet_onnx: Path, photo_batch: np.ndarray) -> RangeSet:
    return calibrate(effnet_onnx, photo_batch[:8], "percentile", show_progress=False)


@pytest.fixture(scope="module")
def orin_int8(tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path, ranges: RangeSet) -> JetsonBundle:
    return export_jetson(
        effnet_onnx, "orin-jp6.1", "int8", tmp_path_factory.mktemp("jet") / "orin", ranges=ranges
    )


def _fake_trtexec(folder: Path) -> Path:
    path = folder / "fake-trtexec"
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/trtexec.args"\n')
    path.chmod(0o755)
    return path


def _run(script: Path, trtexec: Path, trt_version: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(trtexec), "TRT_VERSION": trt_version}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd="/")


@pytest.mark.parametrize(
    ("target", "header"),
    [
        ("xavier-jp5", "TRT-8502-EntropyCalibration2"),
        ("orin-jp6.1", "TRT-100300-EntropyCalibration2"),
        ("thor", "TRT-101300-EntropyCalibration2"),
    ],
)
def test_cache_header_matches_the_jetpack_tensorrt(
    tmp_path: Path, effnet_onnx: Path, ranges: RangeSet, target: str, header: str
) -> None:
    b = export_jetson(effnet_onnx, target, "int8", tmp_path / target, ranges=ranges)
    assert b.calib_cache is not None
    got_header, scales = read_cache_with_header(b.calib_cache)
    assert got_header == header
    assert set(scales) == set(ranges)
    for name, scale in scales.items():
        assert scale == pytest.approx(ranges[name].amax / 127, rel=1e-6)


def test_cache_lists_the_network_input(orin_int8: JetsonBundle, photo_batch: np.ndarray) -> None:
    """TensorRT's own caches list the network inputs; without one the first conv stays out of INT8 with a
    "Missing scale" warning. The input's scale is the percentile of the pixels actually fed."""
    assert orin_int8.calib_cache is not None
    scales = read_cache_with_header(orin_int8.calib_cache)[1]
    assert "images" in scales
    pixels = np.abs(photo_batch[:8])
    assert 0 < scales["images"] * 127 <= float(pixels.max()) * (1 + 1e-6)
    assert scales["images"] * 127 >= float(np.percentile(pixels, 99)) * (
        1 - 1e-5
    )  # calibrated, not a placeholder
    assert not any("Missing scale" in n for n in orin_int8.plan.notes)


def test_bundle_folder_contents_and_relative_plan(orin_int8: JetsonBundle, effnet_onnx: Path) -> None:
    names = {p.name for p in orin_int8.folder.iterdir()}
    assert {effnet_onnx.name, "calib.cache", "build.sh", "profile.sh", "plan.json", "jetson.json"} <= names
    plan = json.loads((orin_int8.folder / "plan.json").read_text())
    assert plan["onnx"] == effnet_onnx.name and plan["calib_cache"] == "calib.cache"
    assert plan["trt_version"].startswith("10.3") and plan["target"] == "orin-jp6.1"
    assert orin_int8.requires() == {
        "kind": "jetson",
        "jetpack": "6.1",
        "tensorrt": plan["trt_version"],
        "sm": "sm87",
        "device": orin_int8.target.name,
    }
    assert (orin_int8.folder / effnet_onnx.name).read_bytes() == effnet_onnx.read_bytes()


def test_build_script_runs_the_plan_only_on_the_matching_tensorrt(
    tmp_path: Path, orin_int8: JetsonBundle
) -> None:
    fake = _fake_trtexec(tmp_path)
    ok = _run(orin_int8.build_script, fake, "10.3.0")
    assert ok.returncode == 0, ok.stderr
    args = (tmp_path / "trtexec.args").read_text().split()
    assert args[:2] == [f"--onnx={orin_int8.plan.onnx}", "--saveEngine=model.engine"]
    assert "--int8" in args and "--calib=calib.cache" in args and "--maxShapes=images:32x3x224x224" in args
    (tmp_path / "trtexec.args").unlink()
    bad = _run(orin_int8.build_script, fake, "8.6.2")
    assert bad.returncode == 2
    assert "planned for TensorRT 10.3" in bad.stderr and "the device has 8.6" in bad.stderr
    assert not (tmp_path / "trtexec.args").exists()  # trtexec never ran


def test_build_script_reads_the_version_from_the_trtexec_banner(
    tmp_path: Path, orin_int8: JetsonBundle
) -> None:
    fake = tmp_path / "trtexec"
    fake.write_text(
        '#!/usr/bin/env bash\nif [ "$1" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec '
        '[TensorRT v100300] # trtexec --help"; exit 0; fi\necho built > "$(dirname "$0")/built"\n'
    )
    fake.chmod(0o755)
    tools = tmp_path / "bin"  # a PATH with the basics but no dpkg-query and no python3: banner only
    tools.mkdir()
    for tool in ("bash", "grep", "dirname"):
        (tools / tool).symlink_to(
            subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        )
    env = {"PATH": str(tools), "TRTEXEC": str(fake)}
    run = subprocess.run(["/bin/bash", str(orin_int8.build_script)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "built").read_text().strip() == "built"


def test_profile_script_uses_trtexec_timers(tmp_path: Path, orin_int8: JetsonBundle) -> None:
    fake = _fake_trtexec(tmp_path)
    missing = _run(orin_int8.profile_script, fake, "10.3")
    assert missing.returncode == 2 and "run ./build.sh first" in missing.stderr
    (orin_int8.folder / "model.engine").write_bytes(b"stand-in")
    try:
        ran = _run(orin_int8.profile_script, fake, "10.3")
    finally:
        (orin_int8.folder / "model.engine").unlink()
    assert ran.returncode == 0, ran.stderr
    args = (tmp_path / "trtexec.args").read_text().split()
    for flag in (
        "--loadEngine=model.engine",
        "--useCudaGraph",
        "--noDataTransfers",
        "--separateProfileRun",
        "--percentile=90,95,99",
        "--exportTimes=times.json",
        "--shapes=images:1x3x224x224",
    ):
        assert flag in args


def test_fp16_bundle_has_no_cache(tmp_path: Path, effnet_onnx: Path) -> None:
    b = export_jetson(effnet_onnx, "orin-jp6.2", "fp16", tmp_path / "fp16")
    assert b.calib_cache is None and not (b.folder / "calib.cache").exists()
    assert "--fp16" in b.build_script.read_text() and "--int8" not in b.build_script.read_text()


def test_refusals(tmp_path: Path, effnet_onnx: Path, ranges: RangeSet) -> None:
    with pytest.raises(TrtbuildError, match="not a Jetson"):
        export_jetson(effnet_onnx, "h100", "fp16", tmp_path / "x")
    with pytest.raises(TrtbuildError, match="only apply to int8"):
        export_jetson(effnet_onnx, "orin-jp6.1", "fp16", tmp_path / "x", ranges=ranges)
    with pytest.raises(TrtbuildError, match="INT8 needs"):
        export_jetson(effnet_onnx, "orin-jp6.1", "int8", tmp_path / "x")
    # JetPack 7.2's TensorRT 10.16 has no DLA (10.7 was the last 10.x with it), and no Orin runs 10.13.
    with pytest.raises(TrtbuildError, match="TensorRT 10.16 has no DLA support"):
        export_jetson(effnet_onnx, "orin-jp7", "int8", tmp_path / "x", ranges=ranges, dla_core=0)
    with pytest.raises(TrtbuildError, match="ships TensorRT 10.16, not 10.13"):
        export_jetson(effnet_onnx, "orin-jp7", "fp16", tmp_path / "x", trt_version="10.13")
    with pytest.raises(TrtbuildError, match="not a release trtbuild knows"):
        export_jetson(effnet_onnx, "thor", "fp16", tmp_path / "x", trt_version="10.100")
    assert not (tmp_path / "x").exists()


def test_orin_jetpack7_bundle_is_for_tensorrt_10_16(
    tmp_path: Path, effnet_onnx: Path, ranges: RangeSet
) -> None:
    b = export_jetson(effnet_onnx, "orin-jp7", "int8", tmp_path / "jp7", ranges=ranges)
    assert b.requires()["jetpack"] == "7.2" and b.trt_version == "10.16"
    assert b.calib_cache is not None
    assert read_cache_with_header(b.calib_cache)[0] == "TRT-101600-EntropyCalibration2"
    assert "--memPoolSize=workspace:2048M" in b.build_script.read_text()  # 10.16 parses the suffix


def test_cli_export_jetson_and_bad_inputs(tmp_path: Path, effnet_onnx: Path, ranges: RangeSet) -> None:
    ranges_path = ranges.save(tmp_path / "r.json")
    ok = CliRunner().invoke(
        cli,
        [
            "export-jetson",
            str(effnet_onnx),
            "--target",
            "xavier-jp5",
            "--precision",
            "int8",
            "--ranges",
            str(ranges_path),
            "--out",
            str(tmp_path / "ok"),
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["tensorrt"] == "8.5.2"
    for args, message in (
        (["--target", "a100", "--precision", "fp16"], "not a Jetson"),
        (["--target", "orin-jp6.1", "--precision", "int8"], "pass --qdq-onnx or --ranges"),
        (["--target", "nano", "--precision", "fp16"], "unknown target"),
    ):
        out = tmp_path / "bad"
        r = subprocess.run(
            ["python3", "-m", "trtbuild.cli", "export-jetson", str(effnet_onnx), "--out", str(out), *args],
            capture_output=True,
            text=True,
            env={**os.environ},
        )
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_cli_shapes_and_fp32_float_parts(tmp_path: Path, effnet_onnx: Path, ranges: RangeSet) -> None:
    """--shape sets the profile (as `plan --shape`: a third-party file's unnamed dynamic axes have no other
    range), and --high-precision fp32 builds a strongly typed Q/DQ bundle from the Q/DQ graph as given."""
    import onnx

    from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq

    model = onnx.load(str(effnet_onnx))
    qdq = tmp_path / "effnet.int8.onnx"
    onnx.save(apply_qdq(model, plan_qdq(model, ranges, QdqOptions())), str(qdq))
    args = ["export-jetson", str(effnet_onnx), "--target", "thor", "--precision", "int8"]
    args += ["--qdq-onnx", str(qdq), "--shape", "images:1x3x224x224,2x3x224x224,4x3x224x224", "--json"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "fp32"), "--high-precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["graph"] == qdq.name  # the Q/DQ graph itself, FP32 float parts
    build = (tmp_path / "fp32" / "build.sh").read_text()
    assert "--maxShapes=images:4x3x224x224" in build and "--stronglyTyped" in build
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "fp16")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["graph"] == "effnet.int8.fp16.onnx"  # default: FP16 float parts derived
