"""Data and shape bombs (issue #14, family 6): refused with one error line giving the size it would take
and the limit, before anything is decoded or allocated.

Images: a 20000x20000 PNG (a few hundred bytes on disk, 1.1 GiB decoded; PIL raised
DecompressionBombError), a 10000x10000 one (PIL only warned), a 1x20000 strip that the resize to 256 on the
short side would blow up. Arrays: an .npz with a bad CRC (BadZipFile), an .npz/.npy whose header declares
what no machine holds. Shapes: a declared or requested input shape that needs 894 GiB (export, profile),
a negative dimension, a batch size that makes a batch bomb.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import trtbuild.core.inputs
from calibrators.data import ModelInput, check_image_size, max_image_pixels, model_inputs, open_data
from calibrators.preprocess import Preprocess
from trtbuild.cli import main
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import MAX_TENSOR_BYTES, InputSpec, format_bytes, parse_input_spec

GIB_894 = "894.1 GiB"
LIMIT = format_bytes(MAX_TENSOR_BYTES)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    if code:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return code, err


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB (its pixel data is one empty row: only the header
    matters, as nothing may decode it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def onnx_model(path: Path, dims: list[int | str]) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


IMAGE_INPUT = [ModelInput("images", (1, 3, 224, 224), np.dtype(np.float32))]


def first_sample(data: object, inputs: list[ModelInput] = IMAGE_INPUT) -> None:
    next(iter(open_data(data, inputs).samples()))


# ---- images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (
            (20000, 20000),
            "has 400,000,000 pixels, 1.1 GiB as RGB; the limit is 89,478,485 pixels (256.0 MiB)",
        ),
        ((10000, 10000), "is 10000x10000: 100,000,000 pixels"),
        ((1, 20000), "is 1x20000; resized to 256x5120000 it has 1,310,720,000 pixels"),
        ((60000, 2), "resized to 7680000x256"),
    ],
)
def test_image_bombs_are_refused_from_the_header(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, size: tuple[int, int], message: str
) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header(*size))
    with pytest.raises(TrtbuildError, match="limit is 89,478,485 pixels") as info:
        first_sample(tmp_path)
    assert message in str(info.value)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_image_bomb_in_the_calibrate_command(
    tmp_path: Path, effnet_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bomb.png").write_bytes(png_header(20000, 20000))
    code, err = run_cli(
        capsys, "calibrate", effnet_onnx, "--data", tmp_path / "photos", "--out-dir", tmp_path / "o"
    )
    assert code == 2 and "400,000,000 pixels" in err and "the limit is 89,478,485 pixels" in err


def test_a_model_that_declares_huge_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png_header(32, 32))
    huge = [ModelInput("images", (1, 3, 100000, 100000), np.dtype(np.float32))]
    with pytest.raises(TrtbuildError, match=r"resized to 114286x114286 .* more than the limit of 89,478,485"):
        open_data(tmp_path, huge)


# ---- arrays ----------------------------------------------------------------------------------------------


def test_npz_with_a_bad_crc_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, images=np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32))
    data = bytearray(good.read_bytes())
    data[data.find(b"\x93NUMPY") + 4000] ^= 0xFF  # a byte of the array: the header still reads
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(TrtbuildError, match=r"cannot read array file .*bad.npz: Bad CRC-32"):
        list(open_data(bad, IMAGE_INPUT).samples())


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_declaring_894_gib_is_refused_before_loading(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("images.npy", npy_header((1, 3, 100000, 800000)) + b"\0" * 64)
    with pytest.raises(TrtbuildError) as info:
        open_data(bomb, IMAGE_INPUT)
    assert f"would take {GIB_894} of memory, more than the {LIMIT} limit" in str(info.value)


def test_npy_sample_larger_than_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trtbuild.core.inputs, "MAX_TENSOR_BYTES", 100_000)
    array = np.zeros((2, 3, 224, 224), np.float32)  # 602 KB a sample, real and memory-mappable
    np.save(tmp_path / "big.npy", array)
    with pytest.raises(TrtbuildError, match=r"one sample of array 'images' .* 588.0 KiB .* 97.7 KiB limit"):
        open_data(tmp_path / "big.npy", IMAGE_INPUT)


def test_batch_size_bomb_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 224, 224), np.float32))
    dynamic = [ModelInput("images", (None, 3, 224, 224), np.dtype(np.float32))]
    data = open_data(tmp_path / "x.npy", dynamic)
    with pytest.raises(TrtbuildError, match=r"a batch of input 'images' 100000000x3x224x224 .* 54.8 TiB"):
        next(data.batches(100_000_000))
    assert sum(len(b["images"]) for b in data.batches(3)) == 4


# ---- shapes: export, profile, plan -----------------------------------------------------------------------


def test_export_of_a_requested_894_gib_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(
        capsys, "export", "trtbuild.examples:efficientnet_lite0", "--input", "images:1x3x100000x800000",
        "--out", tmp_path / "e.onnx",
    )  # fmt: skip
    assert code == 2 and f"1x3x100000x800000 (float32) would take {GIB_894}" in err and LIMIT in err
    assert not (tmp_path / "e.onnx").exists()


@pytest.mark.parametrize(
    ("dims", "message"),
    [([1, 3, 100000, 800000], f"would take {GIB_894}"), ([-5, 3, 32, 32], "negative dimension (-5x3x32x32)")],
)
def test_export_and_plan_of_a_declared_bomb_or_negative_shape_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dims: list[int], message: str
) -> None:
    model = onnx_model(tmp_path / "m.onnx", dims)
    code, err = run_cli(capsys, "export", model, "--out", tmp_path / "out.onnx")
    assert code == 2 and message in err
    code, err = run_cli(
        capsys, "plan", model, "--target", "h100", "--precision", "fp16", "--out", tmp_path / "p"
    )
    assert code == 2 and message in err


def test_profile_of_a_requested_894_gib_input_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        capsys, "profile", "trtbuild.examples:efficientnet_lite0", "--input", "images:1x3x100000x800000"
    )
    assert code == 2 and f"would take {GIB_894}" in err


def test_absurd_dimension_text_is_refused() -> None:
    with pytest.raises(TrtbuildError, match="impossibly large dimension"):
        parse_input_spec("x:1x" + "9" * 5000)


# ---- properties ------------------------------------------------------------------------------------------

dims = st.one_of(st.integers(-3, 64), st.integers(0, 1 << 40), st.sampled_from([0, 1, 100000, 800000]))


@settings(max_examples=400, deadline=None)
@given(
    shape=st.lists(dims, min_size=0, max_size=5),
    grow=st.lists(st.integers(0, 1 << 20), min_size=5, max_size=5),
    dtype=st.sampled_from(sorted(trtbuild.core.inputs.DTYPES)),
)
def test_property_input_specs_are_valid_or_refused(shape: list[int], grow: list[int], dtype: str) -> None:
    opt = tuple(shape)
    top = tuple(d + g for d, g in zip(opt, grow, strict=False))
    try:
        spec = InputSpec("x", opt, dtype, opt, top)
    except TrtbuildError as exc:
        event("refused: negative" if "negative" in str(exc) else "refused: too large")
        assert "negative" in str(exc) or (LIMIT in str(exc) and "would take" in str(exc)), exc
        assert any(d < 0 for d in opt) or trtbuild.core.inputs.tensor_bytes(top, dtype) > MAX_TENSOR_BYTES
        return
    event("accepted")
    assert (
        all(d >= 0 for d in spec.max)
        and trtbuild.core.inputs.tensor_bytes(spec.max, dtype) <= MAX_TENSOR_BYTES
    )


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="x0123456789:abf_-", max_size=60))
def test_property_input_spec_text_parses_or_is_refused(text: str) -> None:
    try:
        spec = parse_input_spec(text)
    except TrtbuildError:
        return
    assert trtbuild.core.inputs.tensor_bytes(spec.opt_shape, spec.dtype) <= MAX_TENSOR_BYTES


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(1, 120_000),
    height=st.integers(1, 120_000),
    crop=st.sampled_from([None, 32, 224, 640]),
    resize=st.sampled_from([None, 256, 4000]),
)
def test_property_image_headers_are_checked_before_decoding(
    tmp_path_factory: pytest.TempPathFactory, width: int, height: int, crop: int | None, resize: int | None
) -> None:
    path = tmp_path_factory.mktemp("png") / "i.png"
    path.write_bytes(png_header(width, height))
    limit = max_image_pixels()
    prep = Preprocess(resize=resize, crop=crop)
    c = crop or 224
    r = resize or round(c * 256 / 224)
    ratio = r / min(width, height)
    resized = max(c, round(width * ratio)) * max(c, round(height * ratio))
    try:
        check_image_size(path, prep)
    except TrtbuildError as exc:
        event("refused")
        assert f"the limit is {limit:,} pixels" in str(exc)
        assert width * height > limit or resized > limit
        return
    event("accepted")
    assert width * height <= limit and resized <= limit


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("npz") / "s.npz"
    rng = np.random.default_rng(1)
    np.savez_compressed(path, images=rng.random((2, 3, 8, 8), dtype=np.float32))
    return path.read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=3))
def test_property_damaged_npz_loads_or_is_refused(
    tmp_path_factory: pytest.TempPathFactory, small_npz: bytes, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(small_npz)
    for position, xor in flips:
        data[position % len(data)] ^= xor
    path = tmp_path_factory.mktemp("bad-npz") / "d.npz"
    path.write_bytes(bytes(data))
    inputs = [ModelInput("images", (None, 3, 8, 8), np.dtype(np.float32))]
    try:
        samples = list(open_data(path, inputs).samples())
    except TrtbuildError as exc:
        event("refused")
        assert "\n" not in str(exc)
        return
    event("loaded")
    assert all(s["images"].shape == (1, 3, 8, 8) for _, s in samples)


def test_model_inputs_of_a_declared_negative_dim_are_dynamic(tmp_path: Path) -> None:
    """Calibration treats non-positive declared dims as dynamic (the data decides), never as a shape."""
    assert model_inputs(onnx_model(tmp_path / "n.onnx", [-5, 3, 8, 8]))[0].shape == (None, 3, 8, 8)
