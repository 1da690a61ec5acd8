"""TensorRT legacy calibration cache: header per version, hex encoding, round trip, bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from calibrators import cache
from calibrators.ranges import RangeSet, TensorRange
from trtbuild.core.errors import TrtbuildError


@pytest.mark.parametrize(
    ("version", "header"),
    [
        ("8.5.2", "TRT-8502-EntropyCalibration2"),
        ("8.6", "TRT-8600-EntropyCalibration2"),
        ("8.6.1", "TRT-8601-EntropyCalibration2"),
        ("10.3", "TRT-100300-EntropyCalibration2"),
        ("10.13", "TRT-101300-EntropyCalibration2"),
        ("10.13.3.9", "TRT-101303-EntropyCalibration2"),
        ("10.16", "TRT-101600-EntropyCalibration2"),
    ],
)
def test_header_per_version(version: str, header: str) -> None:
    assert cache.header(version) == header


@pytest.mark.parametrize("version", ["11.0", "7.2", "ten", "10"])
def test_unsupported_versions(version: str) -> None:
    with pytest.raises(TrtbuildError):
        cache.header(version)


@pytest.mark.parametrize("version", ["8.10.0", "10.100", "8.7", "9.3", "10.13.7", "10.3.100"])
def test_impossible_versions_never_become_a_header(version: str) -> None:
    """8.10.0 used to write TRT-9000 (reads as 9.0) and 10.100 TRT-110000 (reads as 11.0)."""
    with pytest.raises(TrtbuildError, match="is not a release trtbuild knows") as info:
        cache.header(version)
    assert "8.5, 8.6, 10.0" in info.value.one_line()


def test_calibrated_cache_lists_the_network_input(tmp_path: Path) -> None:
    """A 3-channel first conv stays float in our Q/DQ graph (tiny conv), so its input was never measured and
    the cache had no scale for it: TensorRT then kept that conv out of implicit INT8 ("Missing scale")."""
    from onnx import TensorProto, helper

    from calibrators.calibrate import calibrate

    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [16, 3, 3, 3], rng.normal(size=432).tolist())
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [32, 16, 1, 1], rng.normal(size=512).tolist())
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
    ]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w1, w2]), opset_imports=[helper.make_opsetid("", 17)]
    )
    data = [rng.uniform(-3.0, 1.5, size=(2, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    ranges = calibrate(model, data, "minmax", show_progress=False)
    scales = cache.read_cache(cache.write_cache(ranges, tmp_path / "m.cache", "10.3"))
    assert "images" in scales and "r" in scales
    assert scales["images"] * 127 == pytest.approx(max(float(np.abs(d).max()) for d in data), rel=1e-6)


def test_design_example_decodes() -> None:
    scale = cache.hex_scale("3c008912")
    assert scale == pytest.approx(0.0078452, rel=1e-5)
    assert scale * 127 == pytest.approx(0.9963, abs=1e-4)


def test_round_trip(tmp_path: Path) -> None:
    ranges = RangeSet("entropy")
    for name, amax in [("images", 2.64), ("/conv/Conv_output_0", 0.9963), ("x:0", 1e-3), ("big", 1234.5)]:
        ranges.add(TensorRange(name, amax, -amax, amax / 2))
    path = cache.write_cache(ranges, tmp_path / "m.cache", "8.5.2")
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-8502-EntropyCalibration2"
    assert len(lines) == 5
    header, scales = cache.read_cache_with_header(path)
    assert header == lines[0]
    assert list(scales) == list(ranges)
    for name, r in ranges.items():
        assert scales[name] == float(np.float32(r.amax / 127))
        hex_text = dict(line.rsplit(": ", 1) for line in lines[1:])[name]
        assert struct.unpack(">f", bytes.fromhex(hex_text))[0] == pytest.approx(r.amax / 127, rel=1e-7)
    assert [p.name for p in tmp_path.iterdir()] == ["m.cache"]  # no temp files left


def test_bad_cache_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cache"
    bad.write_text("not a cache\n")
    with pytest.raises(TrtbuildError, match="not a TensorRT calibration cache"):
        cache.read_cache(bad)
    bad.write_text("TRT-8502-EntropyCalibration2\nx: zz\n")
    with pytest.raises(TrtbuildError, match="8 hex digits"):
        cache.read_cache(bad)
    with pytest.raises(TrtbuildError, match="cannot read"):
        cache.read_cache(tmp_path / "missing.cache")


def test_unwritable_name_leaves_no_file(tmp_path: Path) -> None:
    ranges = RangeSet("entropy", {"a\nb": TensorRange("a\nb", 1.0, -1.0, 1.0)})
    with pytest.raises(TrtbuildError):
        cache.write_cache(ranges, tmp_path / "m.cache")
    assert list(tmp_path.iterdir()) == []
