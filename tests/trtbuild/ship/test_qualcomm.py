"""Qualcomm SNPE/QNN handoff built from EfficientNet-Lite0 calibrated on real photos."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from calibrators import encodings as enc
from calibrators.calibrate import calibrate
from calibrators.encodings import qualcomm_activation_tensors
from calibrators.ranges import RangeSet, TensorRange
from trtbuild.cli import cli
from trtbuild.core.errors import TrtbuildError
from trtbuild.ship.qualcomm import QualcommHandoff, export_qualcomm, qualcomm_ready_onnx


@pytest.fixture(scope="module")
def ranges(effnet_onnx: Path, photo_batch: np.ndarray) -> RangeSet:
    return calibrate(
        effnet_onnx,
        photo_batch[:8],
        "percentile",
        tensors=qualcomm_activation_tensors(effnet_onnx),
        show_progress=False,
    )


@pytest.fixture(scope="module")
def snpe(
    tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path, ranges: RangeSet, photo_batch: np.ndarray
) -> QualcommHandoff:
    return export_qualcomm(
        effnet_onnx, ranges, photo_batch[:3], tmp_path_factory.mktemp("snpe") / "h", converter="snpe"
    )


def test_handoff_onnx_is_static_batch_one_opset_17_and_runs(
    snpe: QualcommHandoff, effnet_onnx: Path, photo_batch: np.ndarray
) -> None:
    model = onnx.load(str(snpe.onnx))
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 224, 224]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 1000]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    x = photo_batch[:1]
    ours = ort.InferenceSession(str(snpe.onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[
        0
    ]
    ref = ort.InferenceSession(str(effnet_onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[
        0
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_raw_inputs_are_nhwc_float32_for_snpe_and_listed_with_absolute_paths(
    snpe: QualcommHandoff, photo_batch: np.ndarray
) -> None:
    lines = snpe.input_list.read_text().splitlines()
    assert len(lines) == snpe.samples == 3
    for i, line in enumerate(lines):
        path = Path(line)
        assert path.is_absolute() and path.is_file() and path.parent == snpe.folder / "raw"
        raw = np.fromfile(path, dtype="<f4")
        assert raw.size == 3 * 224 * 224
        np.testing.assert_array_equal(raw.reshape(224, 224, 3), photo_batch[i].transpose(1, 2, 0))


def test_qairt_keeps_onnx_layout(
    tmp_path: Path, effnet_onnx: Path, ranges: RangeSet, photo_batch: np.ndarray
) -> None:
    h = export_qualcomm(effnet_onnx, ranges, photo_batch[:1], tmp_path / "q", converter="qairt")
    raw = np.fromfile(Path(h.input_list.read_text().split()[0]), dtype="<f4")
    np.testing.assert_array_equal(raw.reshape(3, 224, 224), photo_batch[0])
    script = h.script.read_text()
    assert "qairt-converter --input_network" in script and "--quantization_overrides" in script
    assert "qairt-quantizer --input_dlc" in script
    assert json.loads((h.folder / "handoff.json").read_text())["raw_layout"] == {"images": "ONNX"}


def test_encodings_in_both_formats_validate_against_the_model(snpe: QualcommHandoff) -> None:
    model = onnx.load(str(snpe.onnx))
    new = enc.load_encodings(snpe.encodings, model)
    old = enc.load_encodings(snpe.encodings_061, model)
    assert new["version"] == "1.0.0" and old["version"] == "0.6.1"
    assert {e["name"] for e in new["activation_encodings"]} == set(old["activation_encodings"])
    assert len(new["param_encodings"]) == len(old["param_encodings"]) > 40


def test_convert_script_runs_the_snpe_chain_and_stops_cleanly_without_the_sdk(snpe: QualcommHandoff) -> None:
    script = snpe.script.read_text()
    for needle in (
        "snpe-onnx-to-dlc --input_network",
        "-d images 1,3,224,224",
        f"--quantization_overrides {snpe.encodings.name}",
        "snpe-dlc-quant --input_dlc",
        "--override_params",
        "snpe-dlc-graph-prepare --input_dlc",
        "--htp_socs",
    ):
        assert needle in script
    assert subprocess.run(["bash", "-n", str(snpe.script)]).returncode == 0
    moved = snpe.folder.parent / "moved"
    shutil.copytree(snpe.folder, moved)
    run = subprocess.run(
        ["bash", str(moved / "convert.sh")], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert run.returncode == 2 and "snpe-onnx-to-dlc not found" in run.stderr
    # the list is rewritten for wherever the folder now lives
    local = (moved / "input_list.local.txt").read_text().split()
    assert local and all(Path(p).is_file() and str(p).startswith(str(moved)) for p in local)


def test_aimet_folder_for_ai_hub(snpe: QualcommHandoff) -> None:
    files = sorted(p.suffix for p in snpe.aimet_folder.iterdir())
    assert files == [".encodings", ".onnx"]
    assert (snpe.aimet_folder / snpe.encodings.name).read_bytes() == snpe.encodings.read_bytes()


def _two_input_model(tmp_path: Path, int64_ids: bool = False, opset: int = 17) -> Path:
    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("Add", ["e", "x"], ["y"])]
    inputs = [
        helper.make_tensor_value_info(
            "ids", TensorProto.INT64 if int64_ids else TensorProto.INT32, ["batch", 3]
        ),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4]),
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [emb]
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_int64_inputs_are_cast_and_multi_input_lists_use_name_paths(tmp_path: Path) -> None:
    path = _two_input_model(tmp_path, int64_ids=True)
    rs = RangeSet("minmax", {n: TensorRange(n, 3.0, -3.0, 3.0) for n in ("x", "e", "y")})
    samples = {"ids": np.array([[1, 2, 3], [4, 5, 6]]), "x": np.ones((2, 3, 4), np.float32)}
    h = export_qualcomm(path, rs, samples, tmp_path / "h", converter="snpe")
    model = onnx.load(str(h.onnx))
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {
        "ids": TensorProto.INT32,
        "x": TensorProto.FLOAT,
    }
    out = ort.InferenceSession(str(h.onnx), providers=["CPUExecutionProvider"]).run(
        None, {"ids": np.array([[1, 2, 3]], np.int32), "x": np.zeros((1, 3, 4), np.float32)}
    )[0]
    assert out.shape == (1, 3, 4)
    line = h.input_list.read_text().splitlines()[0].split()
    assert [p.split(":=")[0] for p in line] == ["ids", "x"] and all(
        Path(p.split(":=")[1]).is_file() for p in line
    )
    with pytest.raises(TrtbuildError, match="int64"):
        qualcomm_ready_onnx(onnx.load(str(path)), cast_int64=False)


def test_refuses_new_opsets_and_quantized_graphs(tmp_path: Path) -> None:
    with pytest.raises(TrtbuildError, match="opset 22"):
        qualcomm_ready_onnx(onnx.load(str(_two_input_model(tmp_path, opset=22))))
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4])],
    )
    with pytest.raises(TrtbuildError, match="DynamicQuantizeLinear"):
        qualcomm_ready_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_cli_export_snpe_and_bad_inputs(
    tmp_path: Path, effnet_onnx: Path, ranges: RangeSet, photo_batch: np.ndarray
) -> None:
    ranges_path = ranges.save(tmp_path / "ranges.json")
    data = tmp_path / "calib.npy"
    np.save(data, photo_batch[:2])
    runner = CliRunner()
    ok = runner.invoke(
        cli,
        [
            "export-snpe",
            str(effnet_onnx),
            "--ranges",
            str(ranges_path),
            "--calib-data",
            str(data),
            "--out",
            str(tmp_path / "ok"),
            "--samples",
            "2",
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["samples"] == 2 and (tmp_path / "ok" / "convert.sh").is_file()
    foreign = RangeSet("minmax", {"nope": TensorRange("nope", 1.0, -1.0, 1.0)}).save(
        tmp_path / "foreign.json"
    )
    for args, message in (
        (["--ranges", str(foreign)], "none of the calibrated tensor names"),
        (["--ranges", str(tmp_path / "missing.json")], "cannot read ranges file"),
        (["--ranges", str(ranges_path), "--samples", "0"], "--samples must be >= 1"),
    ):
        out = tmp_path / "bad"
        result = subprocess.run(
            [
                "python3",
                "-m",
                "trtbuild.cli",
                "export-snpe",
                str(effnet_onnx),
                "--calib-data",
                str(data),
                "--out",
                str(out),
                *args,
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
        assert message in result.stderr
        assert not out.exists()


def test_simulated_fidelity_on_held_out_photos(snpe: QualcommHandoff, photo_batch: np.ndarray) -> None:
    from trtbuild.ship.qualcomm import simulated_fidelity

    report = simulated_fidelity(snpe, photo_batch[20:28])
    assert report["samples"] == 8
    assert (
        report["top1_agreement"] >= 0.6 and 0.97 < report["mean_cosine"] < 1.0 and report["max_abs_diff"] > 0
    )


def test_third_party_reader_takes_its_size_from_the_data_and_its_constant_weights_get_encodings(
    tmp_path: Path,
) -> None:
    """PP-OCR's angle classifier as rapidocr ships it (Paddle2ONNX, opset 11, dynamic height and width,
    every weight a Constant node): the handoff fixes height/width to the calibration samples' (was a
    refusal naming a re-export the user cannot do) and encodes its weights (were 0 param encodings)."""
    from test_quantize_models import fetch_rapidocr_onnx, make_text_lines

    model_path = fetch_rapidocr_onnx("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    lines = make_text_lines(8, width=192)
    ranges = calibrate(model_path, lines, "percentile", show_progress=False)
    handoff = export_qualcomm(model_path, ranges, lines, tmp_path / "h", converter="qairt")
    assert handoff.inputs == {"x": (1, 3, 48, 192)}
    info = json.loads((handoff.folder / "handoff.json").read_text())
    assert info["params_encoded"] >= 50 and any("Constant nodes -> initializers" in n for n in info["notes"])
    assert any("dimension 3 fixed to 192" in n for n in info["notes"])
    model = onnx.load(str(handoff.onnx))
    assert len(enc.weight_encodings(model)) == info["params_encoded"]
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    x = {"x": lines[:1]}
    ours = ort.InferenceSession(str(handoff.onnx), providers=["CPUExecutionProvider"]).run(None, x)
    ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-5)
