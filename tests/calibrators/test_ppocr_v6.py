"""PP-OCRv6 (rapidocr 3.10.0's bundled small detector and reader: opset 11, GELU as Erf, dynamic H/W and
width), the user path as run on 2026-12-02: the detector passes the default gate as a probability map and
its ORT-CPU graph carries the speed record; the reader is refused cleanly by the default gate (96.2 %
per position on 24 lines: a known accuracy gap, docs/int8-accuracy.md), naming the next flags to try."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from test_quantize_models import fetch_wheel_onnx, make_page_crops, make_text_lines

from calibrators.quantize import quantize

RAPIDOCR_V3 = "rapidocr==3.10.0"


def test_v6_detector_passes_the_default_gate_as_a_map_and_times_its_ort_cpu_graph(tmp_path: Path) -> None:
    det = fetch_wheel_onnx(RAPIDOCR_V3, "rapidocr/models/PP-OCRv6_det_small.onnx")
    crops = list(make_page_crops()[:12, None])
    res = quantize(det, crops, tmp_path / "int8", holdout=6, show_progress=False)
    (out,) = res.fidelity.outputs
    assert res.passed and out.kind == "prob_map" and out.iou is not None
    cpu = quantize(det, crops, tmp_path / "cpu", holdout=6, activation_type="uint8", show_progress=False)
    assert cpu.ort_cpu_speed is not None
    record = cpu.ort_cpu_speed.to_json()  # measured here, or skipped with the reason
    if record["measured"]:
        assert record["ratio"] == pytest.approx(record["fp32_ms"] / record["int8_ms"])
    else:
        assert record["reason"]


def test_v6_reader_is_refused_by_the_default_gate_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = fetch_wheel_onnx(RAPIDOCR_V3, "rapidocr/models/PP-OCRv6_rec_small.onnx")
    np.save(tmp_path / "lines.npy", make_text_lines(48, 48, 320))
    out = tmp_path / "q"
    code, _, err = run_cli(
        ["quantize", str(rec), "--data", str(tmp_path / "lines.npy"), "--out-dir", str(out)], capsys
    )
    assert code == 2 and "error: INT8 fidelity below the gate" in err and "(probability): top-1" in err, err
    assert "--equalize-depthwise" in err and not out.exists()
