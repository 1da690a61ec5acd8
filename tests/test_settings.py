"""One settings object per stage: the CLI's defaults are the settings' defaults, flags and fields share
names, bad choices are refused before any work, and a run records its settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import pytest
from cli_helpers import run_cli

from calibrators.calibrate import CalibrationSettings
from calibrators.quantize import quantize
from calibrators.quantize_settings import QuantizeSettings
from export.settings import ExportSettings
from trtbuild.cli.calibrate_cmd import calibrate_command
from trtbuild.cli.export_cmd import export_command
from trtbuild.cli.profile_cmd import profile
from trtbuild.cli.quantize_cmd import quantize_command
from trtbuild.core.defaults import EXPORT_ATOL, EXPORT_RTOL, PREPARE_ATOL, PREPARE_RTOL
from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.settings import ProfileSettings

# flag -> field where the CLI word differs on purpose (a singular repeatable flag, a unit suffix)
RENAMED = {"exclude_op_type": "exclude_op_types", "rounding_budget": "rounding_budget_s", "batch": "batches"}
# CLI options that are not settings (paths, output format, what to read)
NOT_SETTINGS = {
    "as_json",
    "out_dir",
    "data_path",
    "out_path",
    "report_path",
    "plot_path",
    "inputs",
    "weights",
}


def _defaults(settings: type[Any]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize(
    ("command", "settings", "cli_only"),
    [
        # quantize: --precision/--block-size/--weight-budget/--int4-algorithm choose the INT4 pipeline, the
        # rest are settings
        (quantize_command, QuantizeSettings, {"precision", "block_size", "weight_budget", "int4_algorithm"}),
        (calibrate_command, CalibrationSettings, set()),
        # export: the tolerances depend on what is compared (PyTorch or the ONNX original), checked below
        (
            export_command,
            ExportSettings,
            {"atol", "rtol", "min_shape", "max_shape", "verify_data", "no_simplify"},
        ),
        (profile, ProfileSettings, {"batches", "no_accuracy"}),
    ],
)
def test_cli_defaults_are_the_settings_defaults(
    command: click.Command, settings: type[Any], cli_only: set[str]
) -> None:
    defaults = _defaults(settings)
    # The values click hands the command when only the required arguments and options are given.
    required: list[str] = []
    for p in command.params:
        if p.required:
            required += ["x"] if isinstance(p, click.Argument) else [p.opts[0], "x"]
    given = command.make_context(command.name, required).params
    checked = 0
    for param in command.params:
        name = param.name or ""
        if not isinstance(param, click.Option) or name in NOT_SETTINGS or name in cli_only:
            continue
        if name in {"trt_version", "no_cache", "preprocess"} and settings is CalibrationSettings:
            continue  # calibrate's cache version and preprocessing are read by calibrate_to_files / data
        if name in {"mean", "std", "resize", "layout", "scale", "crop", "image_dtype"}:
            continue  # preprocessing flags build one Preprocess value
        field = RENAMED.get(name, name)
        assert field in defaults, f"--{name.replace('_', '-')} has no {settings.__name__} field '{field}'"
        default = given[name]
        if param.multiple:  # a repeatable flag given no times is the field's empty default
            assert not default and not defaults[field], f"--{name}: {defaults[field]!r}"
        else:
            assert default == defaults[field], f"--{name}: {default!r} != {defaults[field]!r}"
        checked += 1
    assert checked >= 5


def test_export_tolerances_depend_on_the_reference() -> None:
    assert ExportSettings().tolerances(against_torch=True) == (EXPORT_ATOL, EXPORT_RTOL)
    assert ExportSettings().tolerances(against_torch=False) == (PREPARE_ATOL, PREPARE_RTOL)
    assert ExportSettings(atol=0.5).tolerances(against_torch=False) == (0.5, PREPARE_RTOL)
    ctx = click.Context(export_command)
    options = {p.name: p.get_default(ctx) for p in export_command.params}
    assert (options["atol"], options["rtol"]) == (EXPORT_ATOL, EXPORT_RTOL)


@pytest.mark.parametrize(
    ("settings", "values", "message"),
    [
        (QuantizeSettings, {"rounding": "stochastic"}, "unknown rounding 'stochastic'"),
        (QuantizeSettings, {"max_float_compute": 1.5}, "outside 0..1"),
        (QuantizeSettings, {"fallback_rank": "random"}, "unknown fallback ranking"),
        (QuantizeSettings, {"method": "kl"}, "unknown calibration method 'kl'"),
        (ExportSettings, {"atol": -1.0}, "--atol -1.0 is negative"),
        (ProfileSettings, {"batches": (1, 0)}, "batch sizes must be positive"),
        (ProfileSettings, {"device": "tpu"}, "unknown device 'tpu'"),
        (ProfileSettings, {"threads": 0}, "--threads 0 is not positive"),
    ],
)
def test_bad_choices_are_refused_when_the_settings_are_made(
    settings: type[Any], values: dict[str, Any], message: str
) -> None:
    with pytest.raises(TrtbuildError, match=message.replace("(", r"\(").replace(".", r"\.")):
        settings(**values)


def test_overrides_apply_to_a_base_and_unknown_names_fail() -> None:
    base = QuantizeSettings(method="entropy", samples=8)
    merged = QuantizeSettings.from_overrides(base, {"samples": 4, "exclude": ["conv.*"]})
    assert (merged.method, merged.samples, merged.exclude) == ("entropy", 4, ("conv.*",))
    with pytest.raises(TypeError, match="holdot"):
        QuantizeSettings.from_overrides(None, {"holdot": 4})
    with pytest.raises(TypeError, match="batch"):
        ProfileSettings.from_overrides(None, {"batch": 4})  # the field is `batches`


def test_a_bad_choice_fails_before_the_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], effnet_onnx: Path
) -> None:
    """--max-float-compute 2 is refused with exit 2 even though --data does not exist: nothing is read."""
    code, _, err = run_cli(
        ["quantize", str(effnet_onnx), "--data", str(tmp_path / "missing"), "--max-float-compute", "2"],
        capsys,
    )
    assert code == 2 and "outside 0..1" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _conv_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4, 16, 16])],
        [weight],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), path)
    return path


def test_quantize_records_its_settings(tmp_path: Path) -> None:
    model = _conv_model(tmp_path / "conv.onnx")
    data = np.random.default_rng(0).standard_normal((24, 8, 16, 16)).astype(np.float32)
    settings = QuantizeSettings(samples=8, holdout=8, min_fidelity=0.9, exclude=("nothing_matches",))
    result = quantize(model, data, tmp_path / "out", settings, show_progress=False, seed=3)
    recorded = json.loads(result.report_path.read_text())["settings"]
    assert recorded["samples"] == 8 and recorded["holdout"] == 8 and recorded["seed"] == 3
    assert recorded["exclude"] == ["nothing_matches"] and recorded["method"] == settings.method
