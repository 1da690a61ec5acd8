"""The target registry: architectures, TensorRT versions, precisions and DLA, and `trtbuild targets`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trtbuild.cli import cli
from trtbuild.errors import TrtbuildError
from trtbuild.targets import TARGETS, get_target


def test_architectures_and_jetpack_versions() -> None:
    assert get_target("a100").sm == (8, 0) and get_target("h100").sm == (9, 0)
    assert get_target("l4").sm == get_target("l40s").sm == (8, 9)
    assert get_target("xavier-jp5").trt_versions == ("8.5.2",)
    assert get_target("orin-jp6.0").trt_versions == ("8.6.2",)
    assert get_target("orin-jp6.1").trt_versions == get_target("orin-jp6.2").trt_versions == ("10.3",)
    assert get_target("thor").sm == (11, 0) and get_target("thor").trt_versions == ("10.13", "10.16")


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
    from trtbuild.trt_versions import TrtVersion, has, strongly_typed_only

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
