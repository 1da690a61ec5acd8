"""Graph preparation of ONNX files nobody here exported: opset upgrade, Constant weights -> initializers,
onnxslim, external data, and identical outputs in ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.meta import load_export_meta, model_input_specs
from export.pipeline import prepare_onnx
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.onnx_file import constants_to_initializers

REPO = Path(__file__).resolve().parents[2]
DDDDOCR_WHEEL = "ddddocr-1.6.1-py3-none-any.whl"  # ships common.onnx: a CNN+LSTM OCR model, opset 12


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32)))


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((16, 3, 3, 3)),
        "B": rng.standard_normal(16),
        "M": rng.standard_normal((16, 5)),
        "b2": rng.standard_normal(5),
    }


@pytest.fixture(scope="module")
def opset12_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv -> Relu -> ReduceMean -> MatMul -> Add -> Softmax -> Unsqueeze, every weight in a Constant node,
    in opset 12 (Unsqueeze's axes are still an attribute there)."""
    nodes = [constant(k, v) for k, v in weights.items()] + [
        helper.make_node("Constant", [], ["scale"], value_float=0.5),
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["p"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["p", "M"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["a"]),
        helper.make_node("Mul", ["a", "scale"], ["s"]),
        helper.make_node("Softmax", ["s"], ["probs"], axis=1),
        helper.make_node("Unsqueeze", ["probs"], ["y"], axes=[1]),
    ]
    graph = helper.make_graph(
        nodes,
        "third_party",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_opset12_constant_weights_become_initializers_with_identical_outputs(
    tmp_path: Path, opset12_model: onnx.ModelProto, weights: dict[str, np.ndarray]
) -> None:
    src, out = tmp_path / "third_party.onnx", tmp_path / "prepared" / "third_party.onnx"
    onnx.save(opset12_model, str(src))
    result = prepare_onnx(src, out)
    prepared = onnx.load(str(out))
    onnx.checker.check_model(prepared, full_check=True)
    assert opset_of(prepared) == 17 and result.preparation.opset_before == 12
    assert not any(n.op_type == "Constant" for n in prepared.graph.node)
    inits = [numpy_helper.to_array(t) for t in prepared.graph.initializer]
    assert any(a.shape == (16, 3, 3, 3) and np.allclose(a, weights["W"]) for a in inits)
    assert sum(a.size for a in inits) >= sum(v.size for v in weights.values())
    (unsqueeze,) = [n for n in prepared.graph.node if n.op_type == "Unsqueeze"]
    assert len(unsqueeze.input) == 2  # opset-13 form: axes as an input
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    for batch in (1, 3):
        (want,), (got,) = run(src, {"x": x[:batch]}), run(out, {"x": x[:batch]})
        assert got.shape == (batch, 1, 5)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    meta = load_export_meta(out)
    assert meta.exporter == "prepare" and meta.verification and meta.verification["passed"]
    (spec,) = model_input_specs(out)
    assert (spec.min, spec.opt_shape, spec.max) == ((1, 3, 8, 8), (1, 3, 8, 8), (32, 3, 8, 8))


def test_prepare_cli_json(
    tmp_path: Path, opset12_model: onnx.ModelProto, capsys: pytest.CaptureFixture[str]
) -> None:
    from trtbuild.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(opset12_model, str(src))
    main(["prepare", str(src), "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["opset"] == 17 and result["exporter"] == "prepare"
    assert result["preparation"]["steps"][0] == "opset 12 -> 17"
    assert result["preparation"]["constants_to_initializers"] >= 5
    assert result["verification"]["passed"] and result["verification"]["outputs"][0]["max_abs"] < 1e-6
    assert result["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_constants_to_initializers_handles_scalar_attributes(opset12_model: onnx.ModelProto) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(opset12_model)
    assert constants_to_initializers(model.graph) == 5
    scale = next(t for t in model.graph.initializer if t.name == "scale")
    assert numpy_helper.to_array(scale) == np.float32(0.5)


def test_external_data_in_and_out(tmp_path: Path, opset12_model: onnx.ModelProto) -> None:
    src = tmp_path / "src" / "big.onnx"
    src.parent.mkdir()
    model = onnx.ModelProto()
    model.CopyFrom(opset12_model)  # saving with external data empties the tensors in memory
    onnx.save(
        model,
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="big.weights",
        size_threshold=0,
        convert_attribute=True,
    )  # Constant-node weights go external too
    assert (src.parent / "big.weights").stat().st_size > 1700
    out = tmp_path / "out" / "big.onnx"
    result = prepare_onnx(src, out, external_threshold=1000)
    assert result.preparation.external_data
    data = out.with_name("big.onnx.data")
    assert data.stat().st_size > 1700 and out.stat().st_size < 1500  # the conv weights left the graph
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.external_data for t in header.graph.initializer)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(src, {"x": x})[0], atol=1e-6)
    # a second, small prepare into the same path removes the stale .data file
    prepare_onnx(src, out)
    assert not data.exists()
    np.testing.assert_allclose(run(out, {"x": x})[0], run(src, {"x": x})[0], atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.export.json", "big.onnx"]


@pytest.fixture(scope="module")
def ddddocr_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ddddocr's real OCR model, taken out of its PyPI wheel (downloaded once into .whl/, no install)."""
    cache = REPO / ".whl"
    wheel = cache / DDDDOCR_WHEEL
    if not wheel.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "ddddocr==1.6.1", "-d", str(cache)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    path = tmp_path_factory.mktemp("ddddocr") / "common.onnx"
    with zipfile.ZipFile(wheel) as zf:
        path.write_bytes(zf.read("ddddocr/common.onnx"))
    return path


def text_line_image(width: int) -> np.ndarray:
    """A real scanned text line (skimage's `text` photo), as ddddocr feeds it: grey, height 64, in [-1, 1]."""
    import skimage.data
    from PIL import Image

    page = Image.fromarray(skimage.data.text())
    line = page.crop((0, 0, page.width, 100)).resize((width, 64), Image.Resampling.BILINEAR)
    x = np.asarray(line, np.float32) / 255.0
    return ((x - 0.5) / 0.5)[None, None]


def test_ddddocr_opset12_prepares_to_valid_opset17_with_identical_outputs(
    tmp_path: Path, ddddocr_onnx: Path
) -> None:
    original = onnx.load(str(ddddocr_onnx))
    assert opset_of(original) == 12 and any(n.op_type == "Constant" for n in original.graph.node)
    with pytest.raises(TrtbuildError, match="image_width"):
        model_input_specs(ddddocr_onnx)
    out = tmp_path / "ddddocr.onnx"
    result = prepare_onnx(ddddocr_onnx, out, dim_values={"image_width": 160})
    prepared = onnx.load(str(out))
    onnx.checker.check_model(prepared)
    assert opset_of(prepared) == 17
    assert not any(n.op_type == "Constant" for n in prepared.graph.node)
    assert "LSTM" in {n.op_type for n in prepared.graph.node}
    assert result.verification is not None and result.verification.passed
    for width in (160, 256):
        x = text_line_image(width)
        (want,), (got,) = run(ddddocr_onnx, {"input1": x}), run(out, {"input1": x})
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        assert (got.argmax(-1) == want.argmax(-1)).all()  # same characters read
    (spec,) = model_input_specs(out)
    assert spec.opt_shape == (1, 1, 64, 160)
