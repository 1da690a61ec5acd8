"""ddddocr 1.6.1's captcha/text readers, as a user has them from the wheel: `common.onnx` (fixed batch 1,
grayscale [1, 1, 64, W], a time-major CTC head [T, 1, 8210] of raw logits from a Gemm, output named
'387') and `common_old.onnx` (the same family, shipped already quantized by ORT's dynamic quantizer).
Inputs as ddddocr builds them: grayscale, height 64, pixels / 255 (real text lines of the scanned page)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli
from cls_wheels import fetch_wheel_member
from test_quantize_models import make_text_lines

from calibrators import fidelity
from calibrators.quantize import quantize
from trtbuild.core import ort as ort_core

DDDDOCR = "ddddocr==1.6.1"


def text_lines(count: int) -> np.ndarray:
    """[count, 1, 64, 256] grayscale text lines, / 255 as ddddocr feeds its reader."""
    normalised = make_text_lines(count, 64, 256)  # (x / 255 - 0.5) / 0.5, RGB
    return np.ascontiguousarray((normalised * 0.5 + 0.5).mean(1, keepdims=True), np.float32)


def test_a_widening_ctc_head_is_judged_per_character_not_by_cosine(tmp_path: Path) -> None:
    """The head maps 1024 features to 8210 characters per time step. It was judged as regression (cosine
    only): the default gate passed at cosine 0.9967 while 1.7 % of the characters differed, more than the
    99 % top-1 the gate promises. A projection widening its features to a vocabulary is classes."""
    path = fetch_wheel_member(DDDDOCR, "ddddocr/common.onnx", "ddddocr_common.onnx")
    model = onnx.load(str(path))
    lines = text_lines(24)
    reference = fidelity.run_batches(fidelity.session(model), [{"input1": x[None]} for x in lines[:4]])
    kind = fidelity.decide_kinds(model, reference)["387"]
    assert kind.kind == "classification" and "widening 1024 features to 8210" in kind.reason
    res = quantize(path, lines, tmp_path, samples=12, holdout=12, min_fidelity="0", show_progress=False)
    (out,) = res.fidelity.outputs
    assert out.kind == "classification" and out.top1_agreement is not None
    # top-1 is the per-character agreement: judged again on all 24 lines, it is the share of equal argmaxes
    feeds = [{"input1": x[None]} for x in lines]
    want = fidelity.run_batches(ort_core.cpu_session(path), feeds)["387"]
    got = fidelity.run_batches(ort_core.cpu_session(res.onnx_path), feeds)["387"]
    judged = fidelity.compare({"387": want}, {"387": got}, kinds={"387": kind}).outputs[0]
    assert judged.top1_agreement == pytest.approx(float((want.argmax(-1) == got.argmax(-1)).mean()), abs=1e-9)


def test_an_already_quantized_model_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = fetch_wheel_member(DDDDOCR, "ddddocr/common_old.onnx", "ddddocr_common_old.onnx")
    np.save(tmp_path / "lines.npy", text_lines(4))
    out = tmp_path / "q"
    code, _, err = run_cli(
        ["quantize", str(path), "--data", str(tmp_path / "lines.npy"), "--out-dir", str(out)], capsys
    )
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "is already quantized (22 DynamicQuantizeLinear, 21 ConvInteger, 1 MatMulInteger)" in err
    assert not out.exists()


def test_yolox_boxes_and_scores_are_judged_apart_through_reshape_concat_transpose(tmp_path: Path) -> None:
    """ddddocr's detector (`common_det.onnx`, YOLOX, fixed [1, 3, 416, 416], raw 0-255 pixels) writes
    [1, 3549, 4 + 1 + 1]: Concat(boxes, objectness Sigmoid, class Sigmoid) per scale on the channel axis,
    Reshape, Concat of the three scales, Transpose. Only a Concat making the output itself was split, so
    the whole output was one regression: cosine 0.9987 passed while the objectness alone read 0.972. The
    Concat is now found through Transpose, Reshape and the scales' Concat."""
    from test_detector_outputs import letterboxed_photos

    path = fetch_wheel_member(DDDDOCR, "ddddocr/common_det.onnx", "ddddocr_common_det.onnx")
    model = onnx.load(str(path))
    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "page", "immunohistochemistry")
    photos = letterboxed_photos(names, 416)[:, ::-1] * 255.0  # BGR pixels, as ddddocr feeds cv2 images
    photos = np.ascontiguousarray(photos, np.float32)
    reference = fidelity.run_batches(fidelity.session(model), [{"images": p[None]} for p in photos[:2]])
    parts = fidelity.decide_kinds(model, reference)["output"].parts
    assert [(p.name, p.axis, p.kind.kind) for p in parts] == [
        ("output[0:4]", 2, "regression"),
        ("output[4:5]", 2, "prob_map"),
        ("output[5:6]", 2, "prob_map"),
    ]
    res = quantize(path, photos, tmp_path, samples=4, holdout=4, min_fidelity="0", show_progress=False)
    judged = {o.name: o for o in res.fidelity.outputs}
    assert judged["output[4:5]"].iou is not None and judged["output[5:6]"].iou is not None
    assert judged["output[4:5]"].cosine < judged["output"].cosine  # what the whole output's cosine hid
