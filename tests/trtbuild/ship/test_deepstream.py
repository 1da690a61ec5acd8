"""DeepStream handoff for Jetson, parsed as DeepStream parses it: GLib's own key-file parser (python3-gi from
Debian, run with the system Python) with the typed getters nvinfer uses, every key checked against the
documented nvinfer / deepstream-app key lists, every path checked inside the folder, and the preprocessing
checked by running the bundle's graph in ONNX Runtime on what nvinfer would feed it. No DeepStream or
Jetson here: nothing is claimed about running on one.
"""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from cli_helpers import run_cli

from calibrators.cache import read_cache_with_header
from calibrators.calibrate import calibrate
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet
from export.meta import graph_outputs
from trtbuild import examples
from trtbuild.bundle import generate_keypair, load_public_key, verify_bundle
from trtbuild.core import ort as ort_core
from trtbuild.core.inputs import parse_profile_spec
from trtbuild.ship.deepstream import BboxParser, DeepStreamBundle, export_deepstream
from trtbuild.ship.deepstream_keys import APP_KEYS, CLASS_ATTRS_KEYS, property_keys

SYSTEM_PYTHON = "/usr/bin/python3"
# nvinfer reads these with typed GLib getters; a value they cannot parse fails the pipeline at start.
_GLIB_SCRIPT = r"""
import json, sys
import gi
gi.require_version("GLib", "2.0")
from gi.repository import GLib
kf = GLib.KeyFile()
kf.load_from_file(sys.argv[1], GLib.KeyFileFlags.NONE)
typed = {"net-scale-factor": "double", "offsets": "double_list", "infer-dims": "integer_list",
         "output-blob-names": "string_list", "batch-size": "integer", "network-mode": "integer",
         "network-type": "integer", "model-color-format": "integer", "network-input-order": "integer",
         "num-detected-classes": "integer", "pre-cluster-threshold": "double"}
out = {}
for group in kf.get_groups()[0]:
    out[group] = {}
    for key in kf.get_keys(group)[0]:
        kind = typed.get(key, "string")
        value = getattr(kf, "get_" + kind)(group, key)
        out[group][key] = list(value) if isinstance(value, (list, tuple)) else value
print(json.dumps(out))
"""


def _glib_available() -> bool:
    if not Path(SYSTEM_PYTHON).is_file():
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi"], capture_output=True)
    return probe.returncode == 0


GLIB = _glib_available()


def parse_keyfile(path: Path) -> dict[str, dict[str, Any]]:
    """The file as GLib (DeepStream's parser) reads it; configparser where python3-gi is not installed."""
    if GLIB:
        run = subprocess.run([SYSTEM_PYTHON, "-c", _GLIB_SCRIPT, str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        parsed: dict[str, dict[str, Any]] = json.loads(run.stdout)
        return parsed
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    lists = {"offsets": float, "infer-dims": int, "output-blob-names": str}
    scalars = {"net-scale-factor": float, "pre-cluster-threshold": float}
    out: dict[str, dict[str, Any]] = {}
    for group in parser.sections():
        out[group] = {}
        for key, value in parser[group].items():
            if key in lists:
                out[group][key] = [lists[key](v) for v in value.rstrip(";").split(";")]
            elif key in scalars:
                out[group][key] = scalars[key](value)
            else:
                out[group][key] = int(value) if value.lstrip("-").isdigit() else value
    return out


@pytest.fixture(scope="module")
def ranges(effnet_onnx: Path, photo_batch: np.ndarray) -> RangeSet:
    return calibrate(effnet_onnx, photo_batch[:8], "minmax", show_progress=False)


@pytest.fixture(scope="module")
def orin_int8(
    tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path, ranges: RangeSet
) -> DeepStreamBundle:
    return export_deepstream(
        effnet_onnx,
        "orin-jp6.2",
        "int8",
        tmp_path_factory.mktemp("ds") / "orin",
        ranges=ranges,
        labels=[f"class {i}" for i in range(1000)],
        batch_size=4,
    )


def test_glib_reads_both_files_with_nvinfers_getters(orin_int8: DeepStreamBundle) -> None:
    if not GLIB:
        pytest.skip("python3-gi (GLib's key-file parser) is not installed: apt-get install python3-gi")
    infer = parse_keyfile(orin_int8.infer_config)
    app = parse_keyfile(orin_int8.app_config)
    assert infer["property"]["offsets"] == pytest.approx([123.675, 116.28, 103.53])
    assert app["primary-gie"]["config-file"] == "config_infer_primary.txt"


def test_every_key_is_a_documented_one(orin_int8: DeepStreamBundle) -> None:
    assert orin_int8.deepstream == "7.1"
    infer = parse_keyfile(orin_int8.infer_config)
    assert list(infer) == ["property"]
    assert set(infer["property"]) <= property_keys("7.1")
    app = parse_keyfile(orin_int8.app_config)
    assert set(app) == set(APP_KEYS)
    for group, keys in app.items():
        assert set(keys) <= APP_KEYS[group], group


def test_config_matches_the_graph_the_plan_and_the_cache(
    orin_int8: DeepStreamBundle, effnet_onnx: Path
) -> None:
    prop = parse_keyfile(orin_int8.infer_config)["property"]
    plan = json.loads((orin_int8.folder / "plan.json").read_text())
    (spec,) = plan["inputs"]
    assert prop["infer-dims"] == spec["opt"][1:] == [3, 224, 224]
    assert spec["min"][0] <= prop["batch-size"] == 4 <= spec["max"][0]
    assert prop["network-mode"] == 1 and prop["network-type"] == 1  # INT8, classifier
    import onnx

    outputs = graph_outputs(onnx.load(str(effnet_onnx), load_external_data=False))
    assert prop["output-blob-names"] == [o.name for o in outputs] == ["logits"]
    header, scales = read_cache_with_header(orin_int8.folder / prop["int8-calib-file"])
    assert header == "TRT-100300-EntropyCalibration2"  # JetPack 6.2's TensorRT 10.3
    assert "images" in scales and "images__nvinfer" in scales
    labels = (orin_int8.folder / prop["labelfile-path"]).read_text().strip().split(";")
    assert len(labels) == 1000 and labels[7] == "class 7"


def test_every_path_named_is_in_the_folder(orin_int8: DeepStreamBundle, tmp_path: Path) -> None:
    prop = parse_keyfile(orin_int8.infer_config)["property"]
    app = parse_keyfile(orin_int8.app_config)
    for key in ("onnx-file", "int8-calib-file", "labelfile-path"):
        assert (orin_int8.folder / prop[key]).is_file(), key
    assert (orin_int8.folder / app["primary-gie"]["config-file"]).resolve() == orin_int8.infer_config
    assert app["source0"]["uri"] == "file:///opt/nvidia/deepstream/deepstream/samples/streams/sample_720p.mp4"
    # model-engine-file is what build.sh writes (stand-in trtexec records the arguments)
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(fake), "TRT_VERSION": "10.3"}
    run = subprocess.run(
        ["bash", str(orin_int8.jetson.build_script)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split()
    assert f"--saveEngine={prop['model-engine-file']}" in args and f"--onnx={prop['onnx-file']}" in args
    assert f"--calib={prop['int8-calib-file']}" in args


def _pixels_and_calibrated(photo: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = Preprocess(crop=224, mean=(0.0,), std=(1.0,), scale=1.0).apply(photo)  # 0..255 pixels, NCHW
    return raw, Preprocess(crop=224).apply(photo)  # what calibration fed


def test_nvinfer_preprocessing_reproduces_calibration_exactly(
    orin_int8: DeepStreamBundle, effnet_onnx: Path, tmp_path: Path
) -> None:
    photos = examples.write_photo_folder(tmp_path / "p", 2, size=256, seed=9)
    prop = parse_keyfile(orin_int8.infer_config)["property"]
    scale = np.float32(prop["net-scale-factor"])
    offsets = np.asarray(prop["offsets"], np.float32).reshape(1, 3, 1, 1)
    ours = ort.InferenceSession(str(orin_int8.folder / prop["onnx-file"]), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(effnet_onnx), providers=["CPUExecutionProvider"])
    for photo in sorted(photos.iterdir()):
        pixels, calibrated = _pixels_and_calibrated(photo)
        fed = scale * (pixels - offsets)  # nvinfer: y = net-scale-factor * (x - offset[c])
        (got,) = ours.run(None, {ours.get_inputs()[0].name: fed})
        (want,) = ref.run(None, {"images": calibrated})
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
        assert got.argmax() == want.argmax()


def test_explicit_int8_graph_is_folded_too_and_needs_no_cache(
    tmp_path: Path, effnet_onnx: Path, effnet_int8_onnx: Path
) -> None:
    b = export_deepstream(effnet_onnx, "thor", "int8", tmp_path / "thor", qdq_onnx=effnet_int8_onnx)
    prop = parse_keyfile(b.infer_config)["property"]
    # Thor's TensorRT builds strongly typed: the Q/DQ graph with FP16 float parts (docs/tensorrt-versions.md)
    fp16_float = effnet_int8_onnx.name.removesuffix(".onnx") + ".fp16.onnx"
    assert "int8-calib-file" not in prop and prop["onnx-file"] == fp16_float
    assert b.deepstream == "8.0" and set(prop) <= property_keys("8.0")
    photo = sorted(examples.write_photo_folder(tmp_path / "p", 1, size=256, seed=2).iterdir())[0]
    pixels, calibrated = _pixels_and_calibrated(photo)
    fed = np.float32(prop["net-scale-factor"]) * (
        pixels - np.asarray(prop["offsets"], np.float32).reshape(1, 3, 1, 1)
    )
    # What TensorRT builds from these Q/DQ graphs: their reference semantics, not this CPU's int8 kernels.
    ours = ort_core.cpu_session(b.folder / prop["onnx-file"])
    ref = ort_core.cpu_session(effnet_int8_onnx)
    (got,) = ours.run(None, {"images__nvinfer": fed})
    (want,) = ref.run(None, {"images": calibrated})
    assert got.argmax() == want.argmax()
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))  # a Q/DQ rounding step apart


def test_uniform_std_needs_no_graph_change(tmp_path: Path, effnet_onnx: Path) -> None:
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25,), scale=1 / 255)
    b = export_deepstream(effnet_onnx, "orin-jp6.0", "fp16", tmp_path / "o", preprocess=pre)
    prop = parse_keyfile(b.infer_config)["property"]
    assert b.deepstream == "7.0" and b.preprocess.channel_scale is None
    assert (b.folder / prop["onnx-file"]).read_bytes() == effnet_onnx.read_bytes()
    assert prop["net-scale-factor"] == pytest.approx(1 / 255 / 0.25, rel=1e-15)
    assert prop["offsets"] == pytest.approx([127.5] * 3, rel=1e-15)
    assert prop["network-mode"] == 2


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A detector-shaped model ([batch, 10, 6] boxes), a two-input model, and a fixed-batch classifier."""
    import torch

    folder = tmp_path_factory.mktemp("small")

    class Det(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 60, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3)).reshape(-1, 10, 6)

    class Two(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a * b).mean((2, 3))

    paths = {"det": folder / "det.onnx", "two": folder / "two.onnx", "fixed": folder / "fixed.onnx"}
    x = torch.zeros(1, 3, 32, 32)
    batch = {0: "batch"}
    torch.onnx.export(
        Det(),
        (x,),
        str(paths["det"]),
        input_names=["x"],
        output_names=["boxes"],
        dynamic_axes={"x": batch},
        dynamo=False,
    )
    torch.onnx.export(
        Two(),
        (x, x),
        str(paths["two"]),
        input_names=["a", "b"],
        dynamic_axes={"a": batch, "b": batch},
        dynamo=False,
    )
    torch.onnx.export(torch.nn.Conv2d(3, 2, 32), (x,), str(paths["fixed"]), input_names=["x"], dynamo=False)
    return paths


def test_detector_config_and_labels(tmp_path: Path, small_models: dict[str, Path]) -> None:
    b = export_deepstream(
        small_models["det"],
        "xavier-jp5",
        "fp16",
        tmp_path / "d",
        network_type="detector",
        labels=["a", "b", "c"],
        bbox_parser=BboxParser("NvDsInferParseBoxes", "/opt/parsers/libboxes.so"),
    )
    parsed = parse_keyfile(b.infer_config)
    assert b.deepstream == "6.2" and set(parsed["property"]) <= property_keys("6.2")
    assert parsed["property"]["num-detected-classes"] == 3 and parsed["property"]["network-type"] == 0
    assert set(parsed["class-attrs-all"]) <= CLASS_ATTRS_KEYS
    assert (b.folder / "labels.txt").read_text().splitlines() == ["a", "b", "c"]  # detectors: one per line
    assert parsed["property"]["infer-dims"] == [3, 32, 32]
    assert parsed["property"]["parse-bbox-func-name"] == "NvDsInferParseBoxes"
    assert parsed["property"]["custom-lib-path"] == "/opt/parsers/libboxes.so"


YOLO_320 = [parse_profile_spec("images:1x3x320x320")]


def test_a_yolo_detector_needs_its_parser_not_the_built_in_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NudeNet's YOLOv8n (output0 [N, 22, anchors]): nvinfer's built-in parser finds its layers by the
    names "cov" and "bbox", so a detector config without a custom parser failed at start-up on the
    device ("Could not find output coverage layer"); now it is refused here, naming both ways out."""
    from test_quantize_models import fetch_wheel_onnx

    yolo = fetch_wheel_onnx("nudenet==3.4.2", "nudenet/320n.onnx")
    args = ["export-deepstream", str(yolo), "--target", "orin-jp6.2", "--precision", "fp16"]
    args += ["--network-type", "detector", "--num-classes", "18", "--shape", "images:1x3x320x320"]
    code, out, err = run_cli([*args, "--out", str(tmp_path / "refused")], capsys)
    assert code == 2 and "Traceback" not in err and "output0 [?, 22, ?]" in err
    assert "--parse-bbox-func" in err and "--network-type other" in err
    assert not (tmp_path / "refused").exists()
    code, _, err = run_cli([*args, "--out", str(tmp_path / "half"), "--custom-lib", "/opt/lib.so"], capsys)
    assert code == 2 and "go together" in err and not (tmp_path / "half").exists()
    b = export_deepstream(
        yolo,
        "orin-jp6.2",
        "fp16",
        tmp_path / "ds",
        network_type="detector",
        num_classes=18,
        shapes=YOLO_320,
        preprocess=Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1 / 255),
        bbox_parser=BboxParser("NvDsInferParseYolo", "/opt/DeepStream-Yolo/libnvdsinfer_custom_impl_Yolo.so"),
    )
    prop = parse_keyfile(b.infer_config)["property"]
    assert prop["parse-bbox-func-name"] == "NvDsInferParseYolo" and prop["network-type"] == 0
    assert prop["custom-lib-path"].endswith("libnvdsinfer_custom_impl_Yolo.so")
    assert prop["net-scale-factor"] == pytest.approx(1 / 255) and prop["offsets"] == [0.0, 0.0, 0.0]


def test_video_is_carried_in_the_folder(tmp_path: Path, small_models: dict[str, Path]) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(
        b"\x00\x00\x00\x18ftypmp42"
    )  # the pipeline's file: carried as given, never decoded here
    b = export_deepstream(
        small_models["det"], "orin-jp6.1", "fp32", tmp_path / "v", network_type="other", video=video
    )
    app = parse_keyfile(b.app_config)
    uri = app["source0"]["uri"]
    assert (
        uri == "file://video.mp4"
        and (b.folder / uri.removeprefix("file://")).read_bytes() == video.read_bytes()
    )
    prop = parse_keyfile(b.infer_config)["property"]
    assert prop["network-type"] == 100 and prop["output-tensor-meta"] == "1"


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("det", ["--target", "h100", "--precision", "fp16"], "is not a Jetson"),
        ("det", ["--target", "xavier-jp5", "--precision", "bf16"], "cannot run BF16"),
        ("det", ["--target", "thor", "--precision", "fp8"], "network-mode has FP32, FP16 and INT8"),
        (
            "fixed",
            ["--target", "thor", "--precision", "fp16", "--batch-size", "4"],
            "outside the model's batch range",
        ),
        ("two", ["--target", "thor", "--precision", "fp16"], "nvinfer feeds one image input"),
        (
            "det",
            ["--target", "thor", "--precision", "fp16", "--network-type", "classifier"],
            "a classifier needs",
        ),
        (
            "det",
            ["--target", "thor", "--precision", "fp16", "--network-type", "detector"],
            "needs its class count",
        ),
        (
            "det",
            ["--target", "thor", "--precision", "fp16", "--dtype", "uint8"],
            "nvinfer feeds float tensors",
        ),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path,
    small_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    model: str,
    args: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["export-deepstream", str(small_models[model]), "--out", str(out), *args], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_signed_jetson_deepstream_bundle_verifies_on_the_stated_device(
    tmp_path: Path, small_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = generate_keypair(tmp_path / "k.pem")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    code, out, err = run_cli(
        [
            "export-deepstream",
            str(small_models["fixed"]),
            "--target",
            "orin-jp6.2",
            "--precision",
            "fp16",
            "--out",
            str(tmp_path / "ds"),
            "--network-type",
            "segmentation",
            "--labels",
            str(labels),
            "--sign",
            str(private),
            "--bundle-out",
            str(tmp_path / "b"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    info = json.loads(out)
    report = verify_bundle(
        info["bundle"], load_public_key(public), device="orin-jp6.2", extract_to=tmp_path / "x"
    )
    assert report.manifest.requires["deepstream"] == "7.1" and report.manifest.requires["jetpack"] == "6.2"
    for name in ("config_infer_primary.txt", "deepstream_app_config.txt", "labels.txt", "build.sh"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "ds" / name).read_bytes()
    shutil.rmtree(tmp_path / "x")
