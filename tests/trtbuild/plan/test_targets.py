"""The target registry: architectures, TensorRT versions, precisions and DLA, and `trtbuild targets`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from trtbuild.cli import cli, main
from trtbuild.core.errors import TrtbuildError
from trtbuild.targets import TARGETS, get_target


def test_architectures_and_jetpack_versions() -> None:
    assert get_target("a100").sm == (8, 0) and get_target("h100").sm == (9, 0)
    assert get_target("l4").sm == get_target("l40s").sm == (8, 9)
    assert get_target("xavier-jp5").trt_versions == ("8.5.2",)
    assert get_target("orin-jp6.0").trt_versions == ("8.6.2",)
    assert get_target("orin-jp6.1").trt_versions == get_target("orin-jp6.2").trt_versions == ("10.3",)
    assert get_target("thor").sm == (11, 0) and get_target("thor").trt_versions == ("10.13", "10.16")
    # JetPack 7.0/7.1 (L4T R38) are Thor-only: Orin's first JetPack 7 is 7.2 with TensorRT 10.16, no 10.13.
    orin7 = get_target("orin-jp7")
    assert orin7.trt_versions == ("10.16",) and orin7.jetpack == "7.2"
    with pytest.raises(TrtbuildError, match="ships TensorRT 10.16, not 10.13"):
        orin7.resolve_trt("10.13")


@pytest.mark.parametrize("target_id", sorted(TARGETS))
def test_precisions_follow_architecture(target_id: str) -> None:
    t = TARGETS[target_id]
    assert {"fp32", "fp16", "int8"} <= set(t.precisions)
    assert ("bf16" in t.precisions) == (t.sm >= (8, 0))
    assert ("fp8" in t.precisions) == (t.sm >= (8, 9))


def test_fp8_dla_and_bf16_facts() -> None:
    assert "fp8" not in get_target("a100").precisions and "fp8" in get_target("h100").precisions
    assert "bf16" not in get_target("xavier-jp5").precisions
    assert get_target("thor").dla_cores == 0 and get_target("a100").dla_cores == 0
    assert get_target("xavier-jp5").dla_cores > 0 and get_target("orin-jp6.2").dla_cores > 0


@pytest.mark.parametrize(
    ("version", "dla"),
    [("8.5.2", True), ("10.3", True), ("10.7", True), ("10.8", False), ("10.16", False), ("11.4", False)]
    + [("11.4.1", True)],
)
def test_dla_exists_up_to_10_7_and_again_from_11_4_1(version: str, dla: bool) -> None:
    # The Orin's two DLA cores are usable only where that TensorRT supports DLA (docs/tensorrt-versions.md).
    assert (get_target("orin-jp6.2").dla_cores_for(version) == 2) == dla
    assert get_target("thor").dla_cores_for(version) == 0  # no DLA hardware at all


def test_orin_jetpack7_offers_no_dla() -> None:
    rows = {r["id"]: r for r in json.loads(CliRunner().invoke(cli, ["targets", "--json"]).output)}
    assert rows["orin-jp7"]["dla_cores"] == 0 and rows["orin-jp6.2"]["dla_cores"] == 2


def test_trt_version_resolution() -> None:
    assert str(get_target("h100").resolve_trt(None)) == "10.13"
    for v in ("8.6", "10.3", "10.16", "11.0", "11.4"):
        assert get_target("a100").resolve_trt(v).short == v
    assert str(get_target("orin-jp6.0").resolve_trt("8.6")) == "8.6.2"
    with pytest.raises(TrtbuildError, match="ships TensorRT 8.5.2"):
        get_target("xavier-jp5").resolve_trt("10.3")
    with pytest.raises(TrtbuildError, match="not supported"):
        get_target("h100").resolve_trt("8.5")
    with pytest.raises(TrtbuildError, match="unknown target"):
        get_target("b200x")


def test_targets_cli_json_and_table() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json.loads(result.output)}
    assert set(rows) == set(TARGETS)
    assert rows["h100"]["sm"] == "sm90" and "fp8" in rows["h100"]["precisions"]
    assert rows["xavier-jp5"]["opt_level"] is None  # TRT 8.5 has no builder optimization level
    table = runner.invoke(cli, ["targets"])
    assert table.exit_code == 0 and "thor" in table.output


def test_trt_version_parsing_and_rules() -> None:
    from trtbuild.core.trt_versions import TrtVersion, has, strongly_typed_only

    assert (
        TrtVersion.parse("10.13.0.35") == TrtVersion(10, 13, 0) and str(TrtVersion.parse("8.5.2")) == "8.5.2"
    )
    assert (
        TrtVersion.parse("10.3") < TrtVersion.parse("10.13") < TrtVersion.parse("11.0")
    )  # numeric, not text
    with pytest.raises(TrtbuildError, match="cannot parse TensorRT version"):
        TrtVersion.parse("ten")
    assert strongly_typed_only("11.0") and not strongly_typed_only("10.16")
    assert has("hardware_compat_same_compute_capability", "10.9") and not has(
        "hardware_compat_same_compute_capability", "10.8"
    )
    assert has("device_memory_size_v2", "11.4") and not has("device_memory_size", "11.0")
    assert not has("builder_optimization_level", "8.5.2") and has("builder_optimization_level", "8.6.2")


@pytest.mark.parametrize("version", ["8.10.0", "10.100", "9.2", "8.4", "10.13.1", "12.0", "10.14.0"])
def test_impossible_versions_are_refused_with_the_known_list(version: str) -> None:
    # 8.10.0 used to encode as a TRT-9000 header (9.0), 10.100 as TRT-110000 (11.0).
    with pytest.raises(TrtbuildError) as info:
        get_target("h100").resolve_trt(version)
    line = info.value.one_line()
    assert "\n" not in line and f"TensorRT {version} is not a release" in line
    assert "8.5, 8.6, 10.0" in line and "10.16" in line and "11.4" in line


@pytest.mark.parametrize("version", ["10.13", "10.13.3", "10.13.3.9", "10.14", "10.14.1", "11.2.1", "10.0.1"])
def test_real_releases_are_accepted(version: str) -> None:
    assert str(get_target("h100").resolve_trt(version)).startswith(version.rsplit(".", 1)[0])


def test_jetson_pins_its_patch_release() -> None:
    assert str(get_target("orin-jp6.0").resolve_trt("8.6.2")) == "8.6.2"
    with pytest.raises(TrtbuildError, match="ships TensorRT 8.6.2, not 8.6.1"):
        get_target("orin-jp6.0").resolve_trt("8.6.1")


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "M", "--data", "D", "--trt-version", "8.10.0"],
        ["quantize", "M", "--data", "D", "--trt-version", "10.100"],
        ["plan", "M", "-t", "h100", "-p", "fp16", "--trt-version", "10.100"],
    ],
)
def test_cli_refuses_impossible_versions(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = tmp_path / "m.onnx", tmp_path / "photos"
    _tiny_onnx(model)
    data.mkdir()
    args = [str(model) if a == "M" else str(data) if a == "D" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main([*args, "--out" if argv[0] == "plan" else "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("error: TensorRT ") and err.count("\n") == 1  # one line, no traceback
    assert "is not a release trtbuild knows" in err and "8.5, 8.6, 10.0" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_targets_table_never_cuts_ids() -> None:
    """Piped or in CI (80 columns) rich used to print `xavie…`/`orin-…`."""
    for width in (80, 60):
        result = subprocess.run(
            [sys.executable, "-m", "trtbuild.cli", "targets"],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": str(width), "TERM": "dumb"},
            check=True,
        )
        cells = {line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")}
        assert set(TARGETS) <= cells, (width, result.stdout)
        assert max(len(line) for line in result.stdout.splitlines()) <= width


def _tiny_onnx(path: Path) -> None:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.1] * 108)
    graph = helper.make_graph([helper.make_node("Conv", ["images", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_targets_model_warns_when_activation_shapes_are_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shape inference cannot follow every graph (ORT's symbolic inference fails on the opset-21 INT4
    # graphs, here: an op it does not know): the activation column silently left those tensors out.
    # ORT's inference then also saved the model into the current directory (sym_shape_infer_temp.onnx).
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Mystery", ["x"], ["m"], domain="vendor"),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vendor", 1)],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(cli, ["targets", "--model", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert "activation tensors" in result.stderr and "lower bound" in result.stderr
    rows = json.loads(result.stdout)
    assert rows and all(r["unknown_shapes"] >= 1 for r in rows)
    assert list(here.iterdir()) == []  # nothing left in the user's folder
