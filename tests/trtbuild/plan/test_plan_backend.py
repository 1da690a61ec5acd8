"""The CPU-testable parts of the TensorRT backend: the calibration cache it serves, the engine sidecar, and
the TensorRTUnavailable error where TensorRT is missing (no fake TensorRT anywhere)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from calibrators import cache as calib_cache
from trtbuild.core.errors import TensorRTUnavailable, TrtbuildError
from trtbuild.core.trt_versions import calibration_cache_version_tag
from trtbuild.engine_meta import EngineMeta, TensorInfo, load_meta, sidecar_path, write_meta
from trtbuild.hardware import tensorrt_available
from trtbuild.plan import make_plan
from trtbuild.trt_backend import build_engine, inspect_engine, served_calibration_cache


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])
    path = tmp_path_factory.mktemp("backend") / "m.onnx"
    onnx.save(
        helper.make_model(
            helper.make_graph([helper.make_node("Relu", ["images"], ["y"])], "g", [x], [y]),
            opset_imports=[helper.make_opsetid("", 17)],
        ),
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("version", "tag"),
    [("8.5.2", "8502"), ("8.6.2", "8602"), ("10.3", "100300"), ("10.13", "101300"), ("10.16", "101600")],
)
def test_cache_served_to_tensorrt_matches_the_calibrators_format(
    tmp_path: Path, version: str, tag: str
) -> None:
    scales = {"images": 0.9963 / 127, "/features/conv/Conv_output_0": 3.25 / 127}
    written = tmp_path / "written.cache"  # a cache as `trtbuild calibrate` writes it for another version
    written.write_text(calib_cache.render(scales, calib_cache.version_int("10.13")))
    data = served_calibration_cache(written, version)
    assert data.splitlines()[0].decode() == f"TRT-{tag}-EntropyCalibration2" == calib_cache.header(version)
    assert calibration_cache_version_tag(version) == tag
    path = tmp_path / "served.cache"
    path.write_bytes(data)
    back = calib_cache.read_cache(path)  # the calibrators' own reader accepts what the adapter serves
    assert back.keys() == scales.keys()
    for name, scale in scales.items():
        assert back[name] == struct.unpack(">f", struct.pack(">f", scale))[0]


def test_design_example_hex() -> None:
    assert calib_cache.render({"t": struct.unpack(">f", bytes.fromhex("3c008912"))[0]}, 8502).endswith(
        "t: 3c008912\n"
    )


def test_engine_sidecar_round_trip(tmp_path: Path, model: Path) -> None:
    plan = make_plan(model, "h100", "fp16", out_root=tmp_path)
    meta = EngineMeta(
        trt_version="10.13.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="fp16",
        tensors=(
            TensorInfo("images", "input", (-1, 3, 8, 8), "float"),
            TensorInfo("y", "output", (-1, 3, 8, 8), "float"),
        ),
        onnx=str(model),
        onnx_sha256="0" * 64,
        plan=plan.to_json(),
        build_seconds=1.5,
        engine_bytes=1234,
        device_memory_bytes=4096,
        num_layers=1,
    )
    engine = tmp_path / "x.engine"
    path = write_meta(meta, engine)
    assert path == sidecar_path(engine) and path.name == "x.engine.json"
    assert load_meta(engine) == meta
    assert json.loads(path.read_text())["plan"]["target"] == "h100"
    if not tensorrt_available():
        info = inspect_engine(engine)
        assert info["layers"] is None and info["sidecar"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    path.write_text("{broken")
    with pytest.raises(TrtbuildError, match="unreadable"):
        load_meta(engine)


@pytest.mark.skipif(tensorrt_available(), reason="checks the message shown where TensorRT is missing")
def test_build_without_tensorrt_raises_with_where_to_go(tmp_path: Path, model: Path) -> None:
    plan = make_plan(model, "orin-jp6.0", "fp16", out_root=tmp_path)
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(plan, plan_path="p.plan.json", script_path="p.trtexec.sh")
    text = info.value.one_line()
    assert "not importable" in text and "p.plan.json" in text and "p.trtexec.sh" in text and "8.6.2" in text
    assert info.value.exit_code == 2 and not Path(plan.engine).exists()


class _ParserError86:
    """The shape of TensorRT 8.6's Python ParserError: node() and desc(), but no node_name() (added in 9.1).
    It stands in for the parser's error list only; what is checked is trtbuild's message, not TensorRT."""

    def node(self) -> int:
        return 7

    def desc(self) -> str:
        return "Unsupported ONNX data type: UINT8 (2)"


class _ParserError10(_ParserError86):
    def node_name(self) -> str:
        return "/features/Cast"


class _FailingParser:
    def __init__(self, error: _ParserError86) -> None:
        self.num_errors = 1
        self._error = error

    def parse_from_file(self, path: str) -> bool:
        return False

    def get_error(self, index: int) -> _ParserError86:
        return self._error


@pytest.mark.parametrize(
    ("target", "version", "error", "shown"),
    [
        ("orin-jp6.0", None, _ParserError86(), "node 7: Unsupported"),  # 8.6.2: no AttributeError
        ("xavier-jp5", None, _ParserError86(), "node 7: Unsupported"),
        ("h100", "10.13", _ParserError10(), "node 7 (/features/Cast): Unsupported"),
    ],
)
def test_parse_failure_keeps_the_parsers_message(
    tmp_path: Path, model: Path, target: str, version: str | None, error: _ParserError86, shown: str
) -> None:
    from trtbuild import trt_backend

    plan = make_plan(model, target, "fp16", trt_version=version, out_root=tmp_path)
    with pytest.raises(TrtbuildError) as info:
        trt_backend._parse(_FailingParser(error), plan)  # type: ignore[arg-type]
    assert shown in info.value.one_line() and "UINT8" in info.value.one_line()
