"""Every command that takes a model reads it through one checked loader (trtbuild/core/onnx_file.py): an
empty, truncated, folder or checker-invalid model is one `error:` line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from cli_helpers import run_cli
from onnx import TensorProto, helper

from trtbuild.bundle import generate_keypair


def _bad_models(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    empty = folder / "empty.onnx"
    empty.write_bytes(b"")
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:5000])
    a_folder = folder / "model.onnx"
    a_folder.mkdir()
    invalid = folder / "invalid.onnx"  # a Conv fed by a tensor nothing produces
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(invalid))
    return {
        "empty": (empty, "holds no graph"),
        "truncated": (truncated, "not a readable onnx"),
        "folder": (a_folder, "is a folder"),
        "invalid": (invalid, "not a valid onnx graph"),
    }


@pytest.mark.parametrize("command", ["plan", "bundle", "quantize"])
def test_bad_models_are_one_line_and_write_nothing(
    command: str, effnet_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, _ = generate_keypair(tmp_path / "k.pem")
    for case, (model, expected) in _bad_models(tmp_path, effnet_onnx).items():
        out = tmp_path / f"out-{case}"
        args = {
            "plan": ["plan", str(model), "--target", "h100", "--precision", "fp16", "--out", str(out)],
            "bundle": [
                "bundle",
                "create",
                "--model",
                str(model),
                "--target",
                "orin-jp6.2",
                "--precision",
                "fp16",
                "--key",
                str(private),
                "--out",
                str(out),
            ],
            "quantize": ["quantize", str(model), "--data", str(tmp_path), "--out-dir", str(out)],
        }[command]
        code, _, err = run_cli(args, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        if case == "folder" and command != "quantize":  # click refuses a folder for a file argument itself
            assert code == 2 and "is a directory" in lines[-1], err
        else:
            assert code == 2 and len(lines) == 1 and expected in lines[0].lower(), (case, err)
        assert not out.exists() or not any(out.rglob("*")), case


@pytest.mark.parametrize("command", ["calibrate", "quantize", "plan", "export", "prepare"])
def test_an_output_path_under_a_file_is_one_line_before_any_work(
    command: str, effnet_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model, data = str(effnet_onnx), str(tmp_path)
    args = {
        "calibrate": ["calibrate", model, "--data", data, "--out-dir", str(blocker / "out")],
        "quantize": ["quantize", model, "--data", data, "--out-dir", str(blocker / "out")],
        "plan": ["plan", model, "--target", "h100", "--precision", "fp32", "--out", str(blocker / "out")],
        "export": [
            "export",
            "trtbuild.examples:efficientnet_lite0",
            "--input",
            "images:1x3x224x224",
            "--out",
            str(blocker / "m.onnx"),
        ],
        "prepare": ["prepare", model, "--out", str(blocker / "m.onnx")],
    }[command]
    code, stdout, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0] and "--out" in lines[0], (
        err
    )
    assert blocker.read_text() == "not a folder"
