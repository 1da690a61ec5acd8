"""Calibration on the real EfficientNet-Lite0 with real photos: data sources, collection, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli as _cli
from onnx import TensorProto, helper

from calibrators import cache, methods
from calibrators.calibrate import calibrate, collect, compute_ranges
from calibrators.collect import Collection, tensors_to_collect
from calibrators.data import model_inputs, open_data
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet
from trtbuild import examples
from trtbuild.core.errors import TrtbuildError


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_photo_folder(tmp_path_factory.mktemp("photos"), 24, seed=2)


@pytest.fixture(scope="module")
def collection(effnet_onnx: Path, photo_dir: Path) -> Collection:
    return collect(effnet_onnx, photo_dir, batch_size=8, threads=2, show_progress=False)


def _tiny_model(path: Path, op: str = "Log") -> Path:
    """x[1,8,4,4] -> op -> Conv(1x1, 8->8): its conv input is Inf when x has a zero (op=Log).

    Eight channels, so Q/DQ placement does not keep it in float as a tiny conv."""
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [8, 8, 1, 1], np.eye(8, dtype=np.float32).ravel().tolist()
    )
    nodes = [helper.make_node(op, ["x"], ["act"], name="act_node")]
    nodes.append(helper.make_node("Conv", ["act", "w"], ["y"], name="conv"))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _relu_only(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# ------------------------------------------------------------------------------------------ collection


def test_real_collection_covers_the_quantized_tensors(effnet_onnx: Path, collection: Collection) -> None:
    expected = tensors_to_collect(onnx.load(str(effnet_onnx)))
    assert list(collection.stats) == expected
    assert len(expected) > 50
    assert collection.samples == 24 and collection.batches == 3
    per_method = {m: compute_ranges(collection, m) for m in methods.METHODS}
    clipped = 0
    for name, stats in collection.stats.items():
        assert stats.count > 0 and stats.absmax > 0
        for method, ranges in per_method.items():
            amax = ranges[name].amax
            assert 0 < amax <= stats.absmax * (1 + 1e-6), (method, name)
        clipped += per_method["entropy"][name].amax < 0.95 * stats.absmax
    assert clipped >= len(expected) // 4  # entropy really clips outliers on real activations


def test_input_statistics_match_the_preprocessed_photos(effnet_onnx: Path, photo_dir: Path) -> None:
    spec = Preprocess().for_input_shape((None, 3, 224, 224))
    pixels = np.concatenate([spec.apply(p) for p in sorted(photo_dir.glob("*.png"))])
    stats = collect(effnet_onnx, photo_dir, tensors=["images"], show_progress=False).stats["images"]
    assert (stats.min, stats.max, stats.count) == (float(pixels.min()), float(pixels.max()), pixels.size)
    assert pixels.min() < -1.5 and pixels.max() > 2.0  # ImageNet-normalised, not raw 0..255


def test_real_collection_does_not_depend_on_batch_size(
    effnet_onnx: Path, photo_dir: Path, collection: Collection
) -> None:
    other = collect(effnet_onnx, photo_dir, batch_size=5, threads=2, show_progress=False)  # 5+5+5+5+4
    assert other.batches == 5
    for name, stats in collection.stats.items():
        again = other.stats[name]
        assert again.absmax == pytest.approx(stats.absmax, rel=1e-5)
        resolution = 2 * stats.absmax / 2048
        assert methods.entropy_amax(again) == pytest.approx(methods.entropy_amax(stats), abs=resolution)


def test_ranges_json_round_trip(collection: Collection, tmp_path: Path) -> None:
    ranges = compute_ranges(collection, "percentile", percentile=99.9)
    loaded = RangeSet.load(ranges.save(tmp_path / "r.json"))
    assert loaded.method == "percentile" and loaded.meta["percentile"] == 99.9
    assert {n: r.amax for n, r in loaded.items()} == {n: r.amax for n, r in ranges.items()}


# ---------------------------------------------------------------------------------------- data sources


def test_every_data_source_gives_the_same_statistics(
    effnet_onnx: Path, photo_batch: np.ndarray, tmp_path: Path
) -> None:
    batch = photo_batch[:6]
    np.save(tmp_path / "batch.npy", batch)
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    for i, sample in enumerate(batch):
        np.savez(npz_dir / f"s{i:02d}.npz", images=sample)  # no batch dim
    npy_dir = tmp_path / "npy"
    npy_dir.mkdir()
    np.save(npy_dir / "a.npy", batch[:4])
    np.save(npy_dir / "b.npy", batch[4:])
    sources = [
        tmp_path / "batch.npy",
        npz_dir,
        npy_dir,
        list(batch),
        [{"images": batch}],
        lambda: iter([batch[:2], batch[2:]]),
        iter(list(batch)),
    ]
    tensors = tensors_to_collect(onnx.load(str(effnet_onnx)))[:4]
    results = [collect(effnet_onnx, s, tensors=tensors, batch_size=4, show_progress=False) for s in sources]
    for result in results:
        assert result.samples == 6
        for name in tensors:
            np.testing.assert_array_equal(result.stats[name].fine, results[0].stats[name].fine)
            assert result.stats[name].max == results[0].stats[name].max


def test_sample_and_split_are_deterministic_and_disjoint(effnet_onnx: Path, photo_dir: Path) -> None:
    inputs = model_inputs(effnet_onnx)
    data = open_data(photo_dir, inputs)
    assert len(data) == 24
    picked = data.sample(10, seed=1)
    assert picked.indices == data.sample(10, seed=1).indices == sorted(picked.indices or [])
    assert picked.indices != data.sample(10, seed=2).indices
    calib, held = data.split(holdout=8, seed=3)
    assert calib.indices is not None and held.indices is not None
    assert len(held) == 8 and len(calib) == 16
    assert not set(calib.indices) & set(held.indices)
    assert sorted(calib.indices + held.indices) == list(range(24))
    again_calib, _ = data.split(holdout=8, seed=3)
    assert again_calib.indices == calib.indices
    stream_calib, stream_held = open_data(lambda: iter(range(5)), inputs).split(holdout=2)
    assert (stream_held.skip, stream_held.limit, stream_calib.skip) == (0, 2, 2)
    with pytest.raises(TrtbuildError, match="one-shot"):
        open_data(iter([]), inputs).split(holdout=2)


def test_nan_in_activations_names_the_tensor(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "log.onnx")
    x = np.ones((1, 8, 4, 4), np.float32)
    x[0, 3, 0, 0] = 0.0  # log(0) = -inf
    with pytest.raises(TrtbuildError, match="activation 'act' has non-finite"):
        calibrate(model, [x], show_progress=False)
    ranges = calibrate(model, [np.full((1, 8, 4, 4), 2.0, np.float32)], show_progress=False)
    assert list(ranges) == ["x", "act"] and ranges["act"].amax == pytest.approx(np.log(2.0), rel=1e-3)
    assert ranges["x"].amax == pytest.approx(2.0, rel=1e-3)  # network input: TensorRT's caches list it


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_ranges_and_cache(
    effnet_onnx: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = _cli(
        [
            "calibrate",
            str(effnet_onnx),
            "--data",
            str(photo_dir),
            "--samples",
            "8",
            "--trt-version",
            "8.6.1",
            "--out-dir",
            str(out),
            "--threads",
            "2",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["samples"] == 8 and summary["cache_header"] == "TRT-8601-EntropyCalibration2"
    ranges = RangeSet.load(summary["ranges"])
    scales = cache.read_cache(summary["cache"])
    assert set(scales) == set(ranges) and len(ranges) == summary["tensors"]
    for name, r in ranges.items():
        assert scales[name] == pytest.approx(r.amax / 127, rel=1e-6)
    assert sorted(p.name for p in out.iterdir()) == [
        "efficientnet_lite0.calib.cache",
        "efficientnet_lite0.ranges.json",
    ]


def test_cli_warns_when_fewer_samples_than_asked(
    effnet_onnx: Path, tmp_path: Path, photo_batch: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "three.npy", photo_batch[:3])
    code, _, err = _cli(
        [
            "calibrate",
            str(effnet_onnx),
            "--data",
            str(tmp_path / "three.npy"),
            "--samples",
            "50",
            "--out-dir",
            str(tmp_path / "out"),
            "--method",
            "minmax",
            "--no-cache",
        ],
        capsys,
    )
    assert code == 0
    assert "only 3" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["efficientnet_lite0.ranges.json"]


def _bad_data(kind: str, root: Path) -> tuple[Path, list[str]]:
    """(data path, extra args) for one kind of bad input."""
    data = root / "data"
    data.mkdir()
    if kind == "empty-folder":
        (data / "notes.txt").write_text("no images here")
    elif kind == "corrupt-image":
        (data / "a.png").write_bytes(b"\x89PNG not really")
    elif kind == "wrong-shape":
        np.save(data / "a.npy", np.zeros((2, 3, 100, 100), np.float32))
    elif kind == "wrong-dtype":
        np.save(data / "a.npy", np.zeros((2, 3, 224, 224), np.float64))
    elif kind == "nan-data":
        bad = np.zeros((2, 3, 224, 224), np.float32)
        bad[1, 0, 5, 5] = np.nan
        np.save(data / "a.npy", bad)
    elif kind == "wrong-npz-key":
        np.savez(data / "a.npz", pixels=np.zeros((3, 224, 224), np.float32))
    elif kind == "missing-data":
        data = root / "nowhere"
    elif kind == "bad-trt-version":
        np.save(data / "a.npy", np.zeros((1, 3, 224, 224), np.float32))
        return data, ["--trt-version", "11.0"]
    elif kind == "bad-mean":
        examples.write_photo_folder(data, 1)
        return data, ["--mean", "a,b,c"]
    elif kind == "zero-samples":
        np.save(data / "a.npy", np.zeros((1, 3, 224, 224), np.float32))
        return data, ["--samples", "0"]
    return data, []


BAD = [
    "empty-folder",
    "corrupt-image",
    "wrong-shape",
    "wrong-dtype",
    "nan-data",
    "wrong-npz-key",
    "missing-data",
    "bad-trt-version",
    "bad-mean",
    "zero-samples",
]


@pytest.mark.parametrize("kind", BAD)
def test_cli_bad_data(
    kind: str, effnet_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, extra = _bad_data(kind, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _cli(
        ["calibrate", str(effnet_onnx), "--data", str(data), "--out-dir", str(out), *extra], capsys
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["missing-model", "no-quantizable-ops", "inf-activation"])
def test_cli_bad_model(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.ones((1, 8, 4, 4), np.float32)
    if kind == "missing-model":
        model = tmp_path / "missing.onnx"
    elif kind == "no-quantizable-ops":
        model = _relu_only(tmp_path / "relu.onnx")
        x = np.ones((1, 3, 8, 8), np.float32)
    else:
        model = _tiny_model(tmp_path / "log.onnx")
        x[0, 0, 1, 1] = 0.0
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    code, _, err = _cli(
        ["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--out-dir", str(out)], capsys
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if kind == "inf-activation":
        assert "'act'" in lines[0]
    assert not out.exists()


def test_preprocess_layouts_and_dtypes(photo_dir: Path) -> None:
    photo = sorted(photo_dir.glob("*.png"))[0]
    nchw = Preprocess().for_input_shape((1, 3, 160, 160)).apply(photo)
    nhwc = Preprocess(layout="NHWC").for_input_shape((1, 160, 160, 3)).apply(photo)
    raw = Preprocess(layout="NHWC", dtype="uint8").for_input_shape((None, 160, 160, 3)).apply(photo)
    assert nchw.shape == (1, 3, 160, 160) and nchw.dtype == np.float32
    np.testing.assert_allclose(nhwc, nchw.transpose(0, 2, 3, 1), rtol=1e-6)
    assert raw.dtype == np.uint8 and raw.shape == (1, 160, 160, 3)
    expected = (raw.astype(np.float32) / 255 - np.array(examples.IMAGENET_MEAN, np.float32)) / np.array(
        examples.IMAGENET_STD, np.float32
    )
    np.testing.assert_allclose(nhwc, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TrtbuildError, match="NHWC"):
        Preprocess().for_input_shape((1, 224, 224, 3))
    with pytest.raises(TrtbuildError, match="not square"):
        Preprocess().for_input_shape((1, 3, 224, 160))


def test_calibrate_to_files_is_the_api_behind_the_command(
    effnet_onnx: Path, tmp_path: Path, photo_batch: np.ndarray
) -> None:
    """The CLI is a thin layer: the API writes the same artifacts and refuses bad settings before any work."""
    from calibrators.calibrate import CalibrationSettings, calibrate_to_files
    from trtbuild.core.errors import TrtbuildError

    with pytest.raises(TrtbuildError, match="unknown calibration method"):
        CalibrationSettings(method="nope")
    out = tmp_path / "out"
    with pytest.raises(TrtbuildError, match="8.10"):
        calibrate_to_files(effnet_onnx, photo_batch[:4], out_dir=out, trt_version="8.10")
    assert not out.exists()
    settings = CalibrationSettings(method="minmax", exclude_op_types=("Gemm",))
    files = calibrate_to_files(effnet_onnx, photo_batch[:4], settings, out_dir=out, trt_version="8.6.2")
    assert files.ranges_path.is_file() and files.cache_path is not None and files.cache_path.is_file()
    assert files.cache_header == "TRT-8602-EntropyCalibration2" and files.samples == 4
    assert files.cache_path.read_text().splitlines()[0] == files.cache_header
    gemm_inputs = {n.input[0] for n in onnx.load(str(effnet_onnx)).graph.node if n.op_type == "Gemm"}
    assert gemm_inputs and not gemm_inputs & set(files.ranges)


def test_ranges_record_how_images_became_tensors(effnet_onnx: Path, tmp_path: Path) -> None:
    """A deployment must feed the model the way calibration did: the ranges JSON says how (and says
    nothing for arrays, which the model takes as they are)."""
    from calibrators.calibrate import CalibrationSettings, calibrate_to_files

    photos = examples.write_photo_folder(tmp_path / "photos", 4, size=256, seed=2)
    settings = CalibrationSettings(samples=4, preprocess=Preprocess(resize=240, crop=224, scale=1 / 127.5))
    files = calibrate_to_files(effnet_onnx, photos, settings, out_dir=tmp_path, show_progress=False)
    recorded = json.loads(files.ranges_path.read_text())["meta"]["preprocess"]
    assert (recorded["resize"], recorded["crop"], recorded["layout"]) == (240, 224, "NCHW")
    assert recorded["scale"] == pytest.approx(1 / 127.5)
    arrays = examples.normalize_imagenet(examples.photo_crops(4, seed=2))
    files = calibrate_to_files(effnet_onnx, arrays, out_dir=tmp_path / "a", show_progress=False)
    assert "preprocess" not in json.loads(files.ranges_path.read_text())["meta"]
