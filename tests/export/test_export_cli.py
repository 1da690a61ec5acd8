"""`trtbuild export` / `trtbuild prepare` through the console entry point: results, and each bad input giving
one `error:` line, exit code 2 and no output file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import run_cli
from onnx import TensorProto, helper

MODELS = Path(__file__).resolve().parents[2] / "tests" / "models"
IMAGE_TEXT = f"{MODELS / 'image_text.py'}:build"
INPUTS = ["--input", "image:1x3x32x32", "--input", "token_ids:1x8:int64"]


def assert_clean_failure(code: int, err: str, folder: Path, *fragments: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not any(folder.iterdir()) if folder.exists() else True, list(folder.iterdir())


def test_export_json_and_default_output_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        [
            "export",
            IMAGE_TEXT,
            *INPUTS,
            "--dynamic-batch",
            "--max-batch",
            "8",
            "--output-name",
            "logits",
            "--output-name",
            "text",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    onnx_path = tmp_path / "engines" / "build" / "build.onnx"
    assert Path(result["onnx"]) == Path("engines/build/build.onnx") and onnx_path.is_file()
    assert (tmp_path / "engines" / "build" / "build.export.json").is_file()
    assert [o["name"] for o in result["outputs"]] == ["logits", "text"]
    assert result["inputs"][1] == {
        "name": "token_ids",
        "dtype": "int64",
        "min": [1, 8],
        "opt": [1, 8],
        "max": [8, 8],
    }
    assert result["verification"]["passed"] and result["verification"]["outputs"][0]["max_abs"] < 1e-5
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["build.export.json", "build.onnx"]


def test_export_table_output_with_real_verify_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trtbuild import examples

    data = tmp_path / "samples.npz"
    ids = np.random.default_rng(0).integers(0, 100, (5, 8)).astype(np.int64)
    np.savez(data, image=examples.normalize_imagenet(examples.photo_crops(5, size=32)), token_ids=ids)
    code, out, err = run_cli(
        [
            "export",
            IMAGE_TEXT,
            *INPUTS,
            "--dynamic-batch",
            "--max-batch",
            "4",
            "--verify-data",
            str(data),
            "--out",
            str(tmp_path / "m.onnx"),
        ],
        capsys,
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert "Verification vs PyTorch (4 cases: random 1x3x32x32, random 2x3x32x32, data 0:4, data 4:5)" in text
    assert "output_1" in out and "pass" in out and "fail" not in out


def test_missing_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", "no_such_package.models:net", *INPUTS, "--out", str(out / "m.onnx")], capsys
    )
    assert_clean_failure(code, err, out, "cannot import module 'no_such_package.models'")


def test_missing_attribute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "export",
            "trtbuild.examples:no_such_model",
            "--input",
            "images:1x3x224x224",
            "--out",
            str(out / "m.onnx"),
        ],
        capsys,
    )
    assert_clean_failure(code, err, out, "has no attribute 'no_such_model'", "efficientnet_lite0")


def test_weights_that_do_not_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(MODELS))
    try:
        import image_text
    finally:
        sys.path.remove(str(MODELS))
    weights = tmp_path / "other.pth"
    state = image_text.build_small_vocab().state_dict()
    state["extra.bias"] = torch.zeros(3)
    del state["head.bias"]
    torch.save(state, weights)
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", IMAGE_TEXT, *INPUTS, "--weights", str(weights), "--out", str(out / "m.onnx")], capsys
    )
    assert_clean_failure(code, err, out, "do not match", "head.bias", "extra.bias", "embed.weight (50, 16)")


def test_unparseable_input_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", IMAGE_TEXT, "--input", "image:1x3xfoo", "--out", str(out / "m.onnx")], capsys
    )
    assert_clean_failure(code, err, out, "cannot parse input spec 'image:1x3xfoo'")


def test_unparseable_max_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", IMAGE_TEXT, *INPUTS, "--max-shape", "image-4x3", "--out", str(out / "m.onnx")], capsys
    )
    assert_clean_failure(code, err, out, "--max-shape")


def test_inputs_that_do_not_fit_forward(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", IMAGE_TEXT, "--input", "image:1x3x32x32", "--out", str(out / "m.onnx")], capsys
    )
    assert_clean_failure(code, err, out, "fails on the declared inputs")


def test_model_that_fails_to_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", f"{MODELS / 'image_text.py'}:Eigen", "--input", "x:1x4x4", "--out", str(out / "m.onnx")],
        capsys,
    )
    assert_clean_failure(code, err, out, "could not be exported to ONNX", "linalg_eigh")
    assert "falling back to the TorchScript exporter" in " ".join(err.split())


def test_verification_over_tolerance_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", IMAGE_TEXT, *INPUTS, "--atol", "1e-12", "--rtol", "0", "--out", str(out / "m.onnx")],
        capsys,
    )
    assert_clean_failure(code, err, out, "differs from PyTorch beyond atol=1e-12", "max abs")


def test_bad_verify_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, image=np.zeros((4, 3, 16, 16), np.float32), token_ids=np.zeros((4, 8), np.int64))
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", IMAGE_TEXT, *INPUTS, "--verify-data", str(data), "--out", str(out / "m.onnx")], capsys
    )
    assert_clean_failure(code, err, out, "verification data for 'image' has shape 4x3x16x16")


def test_onnx_source_is_prepared_with_declared_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first.onnx"
    code, _, err = run_cli(["export", IMAGE_TEXT, *INPUTS, "--dynamic-batch", "--out", str(first)], capsys)
    assert code == 0, err
    out = tmp_path / "again" / "m.onnx"
    args = ["export", str(first), "--input", "image:2x3x32x32", "--input", "token_ids:2x8:int64"]
    code, stdout, err = run_cli(
        [
            *args,
            "--max-shape",
            "image:8x3x32x32",
            "--max-shape",
            "token_ids:8x8",
            "--out",
            str(out),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["exporter"] == "prepare" and result["verification"]["reference"] == "the original ONNX"
    assert [c["label"] for c in result["verification"]["cases"]] == ["random 2x3x32x32", "random 4x3x32x32"]
    assert result["inputs"][0] == {
        "name": "image",
        "dtype": "float32",
        "min": [2, 3, 32, 32],
        "opt": [2, 3, 32, 32],
        "max": [8, 3, 32, 32],
    }
    # a shape the graph cannot take is refused, and nothing is written
    bad = tmp_path / "bad"
    wrong = ["export", str(first), "--input", "image:2x3x64x64", "--input", "token_ids:2x8:int64"]
    code, _, err = run_cli([*wrong, "--out", str(bad / "m.onnx")], capsys)
    assert_clean_failure(code, err, bad, "does not fit the model's batchx3x32x32")


def test_prepare_unreadable_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out"
    code, _, err = run_cli(["prepare", str(bad), "--out", str(out / "p.onnx")], capsys)
    assert_clean_failure(code, err, out, "is not a readable ONNX model")


def test_prepare_invalid_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "missing"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    bad = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    out = tmp_path / "out"
    code, _, err = run_cli(["prepare", str(bad), "--out", str(out / "p.onnx")], capsys)
    assert_clean_failure(code, err, out, "is not a valid ONNX graph", "missing")


def test_prepare_missing_file_in_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trtbuild.cli",
            "prepare",
            str(tmp_path / "nope.onnx"),
            "--out",
            str(out / "p.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: ONNX file '{tmp_path / 'nope.onnx'}' does not exist. check the path."
    ]
    assert not out.exists()
