"""The calibration's pixel math travels to the deployment configs (trtbuild/ship/calibration_preprocess.py).

A YOLO-style model is calibrated on photos scaled to 0..1 without ImageNet mean/std. Before this, the
DeepStream handoff of its INT8 graph defaulted to ImageNet's mean/std unless the user repeated every
image option: nvinfer would then feed the engine other pixels than its ranges were measured on, silently.
Real EfficientNet-Lite0, real photos, the real CLI; the configs parsed as DeepStream parses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli
from test_deepstream import parse_keyfile

from calibrators.preprocess import META_KEY, Preprocess
from calibrators.quantize import quantize
from calibrators.quantize_settings import QuantizeSettings
from calibrators.ranges import RangeSet
from trtbuild import examples
from trtbuild.core import ort as ort_core
from trtbuild.ship.triton import export_triton

YOLO_STYLE = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels / 255 only


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path) -> dict[str, Path]:
    """Quantized on 12 real photos with YOLO-style image options (8 calibrate, 4 held out)."""
    folder = tmp_path_factory.mktemp("calibrated")
    photos = examples.write_photo_folder(folder / "photos", 12, size=256, seed=5)
    settings = QuantizeSettings(holdout=4, min_fidelity="0%", preprocess=YOLO_STYLE)
    res = quantize(effnet_onnx, photos, folder / "q", settings, show_progress=False)
    return {"photos": photos, "qdq": res.onnx_path, "ranges": res.ranges_path}


def test_quantize_records_the_image_options_in_the_graph_and_the_ranges(calibrated: dict[str, Path]) -> None:
    in_graph = json.loads(
        ort_core.metadata(onnx.load(str(calibrated["qdq"]), load_external_data=False))[META_KEY]
    )
    in_ranges = RangeSet.load(calibrated["ranges"]).meta["preprocess"]
    assert in_graph == in_ranges
    recorded = Preprocess.from_record(in_graph)
    assert recorded.mean == (0.0, 0.0, 0.0) and recorded.std == (1.0, 1.0, 1.0)
    assert recorded.pixel_differences(Preprocess(mean=(0.0,), std=(1.0,))) == []  # one value = per channel
    assert recorded.pixel_differences(Preprocess()) == ["mean", "std"]


@pytest.mark.parametrize("source", ["qdq", "ranges"])
def test_deepstream_takes_the_recorded_pixel_math(
    tmp_path: Path,
    effnet_onnx: Path,
    calibrated: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    source: str,
) -> None:
    given = (
        ["--qdq-onnx", str(calibrated["qdq"])] if source == "qdq" else ["--ranges", str(calibrated["ranges"])]
    )
    target = "thor" if source == "qdq" else "xavier-jp5"  # explicit (strongly typed) / implicit with a cache
    out = tmp_path / "ds"
    args = [
        "export-deepstream",
        str(effnet_onnx),
        "--target",
        target,
        "--precision",
        "int8",
        "--out",
        str(out),
    ]
    code, stdout, err = run_cli([*args, *given, "--json"], capsys)
    assert code == 0, err
    prop = parse_keyfile(out / "config_infer_primary.txt")["property"]
    # nvinfer: y = net-scale-factor * (x - offsets): the calibration's x / 255, not ImageNet's normalisation
    assert prop["net-scale-factor"] == pytest.approx(1 / 255, rel=1e-12)
    assert prop["offsets"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert any("image preprocessing from" in n for n in json.loads(stdout)["notes"])


def test_contradicting_image_options_are_refused_and_matching_ones_accepted(
    tmp_path: Path, effnet_onnx: Path, calibrated: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    args = [
        "export-deepstream",
        str(effnet_onnx),
        "--target",
        "thor",
        "--precision",
        "int8",
        "--out",
        str(out),
    ]
    args += ["--qdq-onnx", str(calibrated["qdq"])]
    code, _, err = run_cli([*args, "--mean", "0.485,0.456,0.406"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "--mean 0.485,0.456,0.406 (calibrated with 0,0,0)" in err and "--std" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    code, _, err = run_cli([*args, "--mean", "0", "--std", "1"], capsys)  # the same pixel math, spelled short
    assert code == 0, err


def test_triton_warmup_image_is_fed_as_calibrated(
    tmp_path: Path, effnet_onnx: Path, calibrated: dict[str, Path]
) -> None:
    photo = sorted(calibrated["photos"].iterdir())[0]
    single = tmp_path / "one"
    single.mkdir()
    (single / photo.name).write_bytes(photo.read_bytes())
    repo = export_triton(
        effnet_onnx, "h100", "int8", tmp_path / "repo", qdq_onnx=calibrated["qdq"], warmup_data=single
    )
    (raw,) = (repo.model_dir / "warmup").iterdir()
    fed = np.fromfile(raw, np.float32).reshape(1, 3, 224, 224)
    want = Preprocess(crop=224, mean=(0.0,), std=(1.0,)).apply(photo)
    np.testing.assert_array_equal(fed, want)
    assert any("image preprocessing from" in n for n in repo.notes)
