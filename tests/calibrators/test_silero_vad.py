"""Silero VAD (silero-vad wheel): LSTM and convs inside an `If` on a scalar int64 `sr`, and a recurrent
`state` [2, batch, 128]. Nothing of it is quantizable as trtbuild works (samples along axis 0, Q/DQ in the
main graph); every command must say so in one `error:` line, exit 2 and write nothing.

The audio is synthetic (no real 16 kHz recording is available offline): voiced bursts (a 100-220 Hz pulse
train through two formant resonators) between quiet pauses, enough to exercise the code paths; the
model's own speech probability rises on the bursts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from cls_wheels import fetch_silero_onnx

from calibrators.data import model_inputs, open_data
from trtbuild.core.errors import TrtbuildError

SR = 16000


def speech_like(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """Synthetic voiced bursts and pauses at 16 kHz (see the module docstring), float32 in [-1, 1]."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    while sum(len(p) for p in parts) < seconds * SR:
        n = int(SR * rng.uniform(0.15, 0.4))
        t = np.arange(n) / SR
        voiced = (np.sin(2 * np.pi * rng.uniform(100, 220) * t) > 0.95).astype(np.float64)
        for centre, width in ((rng.uniform(500, 900), 80), (rng.uniform(1100, 2200), 120)):
            r, theta = np.exp(-np.pi * width / SR), 2 * np.pi * centre / SR
            voiced = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], voiced)
        parts.append(voiced * np.hanning(n) * 0.5 / (np.abs(voiced).max() + 1e-9))
        parts.append(0.003 * rng.standard_normal(int(SR * rng.uniform(0.1, 0.3))))
    return np.concatenate(parts)[: int(seconds * SR)].astype(np.float32)


def write_chunks(folder: Path, with_sr: bool) -> Path:
    """One .npz per 576-sample window (64 context + 512 new, as silero-vad's wrapper feeds), zero state."""
    folder.mkdir()
    audio = speech_like()
    for k in range(8):
        arrays = {"input": audio[k * 512 : k * 512 + 576][None], "state": np.zeros((2, 1, 128), np.float32)}
        if with_sr:
            arrays["sr"] = np.array(SR, np.int64)
        np.savez(folder / f"{k:02d}.npz", **arrays)
    return folder


@pytest.mark.parametrize("variant", ["silero_vad.onnx", "silero_vad_op18_ifless.onnx"])
def test_scalar_sr_input_is_refused_before_reading_data(tmp_path: Path, variant: str) -> None:
    """The scalar `sr` ended calibration in an IndexError (tuple index out of range)."""
    model = fetch_silero_onnx(variant)
    with pytest.raises(TrtbuildError, match="'sr' is a scalar"):
        open_data(write_chunks(tmp_path / "chunks", with_sr=True), model_inputs(model))


def test_state_with_batch_on_axis_1_is_refused(tmp_path: Path) -> None:
    """`state` [2, batch, 128] read as 2 samples against 1 of `input`: "different numbers of samples" for
    data that had batch 1 everywhere."""
    model = fetch_silero_onnx("silero_vad_half.onnx")
    with pytest.raises(TrtbuildError, match="batch as their leading axis"):
        open_data(write_chunks(tmp_path / "chunks", with_sr=False), model_inputs(model))


def test_quantize_names_control_flow_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = fetch_silero_onnx("silero_vad.onnx")
    data = write_chunks(tmp_path / "chunks", with_sr=True)
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(model), "--data", str(data), "--out-dir", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "inside If/Loop/Scan subgraphs (control flow)" in lines[0] and "--precision fp16" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_prepare_comparison_run_failing_in_ort_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prepare's seeded comparison run (unnamed dims at 1, a random `sr`) fails inside the If in ORT: that
    was ORT's InvalidArgument traceback; --no-verify then prepares it."""
    model = fetch_silero_onnx("silero_vad.onnx")
    out = tmp_path / "prepared.onnx"
    code, _, err = run_cli(["prepare", str(model), "--out", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "ONNX Runtime cannot run" in lines[0] and "--no-verify" in lines[0]
    assert not out.exists()
    code, _, err = run_cli(["prepare", str(model), "--out", str(out), "--no-verify"], capsys)
    assert code == 0 and out.is_file()


def test_plan_fills_the_scalar_input_and_refuses_a_broken_fp16_graph(tmp_path: Path) -> None:
    """`sr` could not be planned at all (every input needed a --shape, and a scalar cannot be written as
    one); on TensorRT 11 the FP16 converter's broken If branches ended in onnx's ValidationError."""
    from trtbuild.core.inputs import InputSpec
    from trtbuild.plan import PlanSettings
    from trtbuild.plan_graphs import plan_model
    from trtbuild.trtexec import render

    model = fetch_silero_onnx("silero_vad.onnx")
    shapes = (InputSpec("input", (1, 576)), InputSpec("state", (2, 1, 128)))
    settings = PlanSettings(target="h100", precision="fp16", shapes=shapes, out_root=str(tmp_path / "e"))
    plan = plan_model(model, settings)
    assert {s.name: s.opt_shape for s in plan.inputs}["sr"] == ()
    argv = render(plan)
    assert "--minShapes=input:1x576,state:2x1x128" in argv
    with pytest.raises(TrtbuildError, match="FP16 converter wrote an invalid graph .*If/Loop/Scan"):
        plan_model(model, PlanSettings(**{**settings.__dict__, "trt_version": "11.4"}))
    assert not list((tmp_path / "e").rglob("*.fp16.onnx"))


def test_bundle_smoke_record_of_a_recurrent_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bundle's seeded smoke input stacked runs on axis 0 of every input, so `state` [2, 1, 128] was fed
    as 1x1x128 and ORT's InvalidArgument ended `bundle create` in a traceback. The half variant now
    bundles; silero_vad.onnx, whose If needs sr 8000 or 16000, is refused in one line."""
    key = tmp_path / "k.pem"
    assert run_cli(["bundle", "keygen", str(key)], capsys)[0] == 0
    shapes = ["--shape", "input:1x576", "--shape", "state:2x1x128"]
    common = ["--target", "orin-jp6.2", "--precision", "fp16", *shapes, "--key", str(key)]
    half = fetch_silero_onnx("silero_vad_half.onnx")
    code, _, err = run_cli(
        ["bundle", "create", "--model", str(half), *common, "--out", str(tmp_path / "b")], capsys
    )
    assert code == 0, err
    (bundle,) = (tmp_path / "b").glob("*.tar.gz")
    verify = [
        "bundle",
        "verify",
        str(bundle),
        "--pub",
        str(key.with_suffix(".pub")),
        "--device",
        "orin-jp6.2",
    ]
    assert run_cli(verify, capsys)[0] == 0
    full = fetch_silero_onnx("silero_vad.onnx")
    code, _, err = run_cli(
        ["bundle", "create", "--model", str(full), *common, "--out", str(tmp_path / "c")], capsys
    )
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and "smoke test" in lines[0]
    assert not list((tmp_path / "c").glob("*.tar.gz"))


def test_triton_ort_cpu_serves_the_scalar_sr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export-triton asked for a --shape of every input, which `sr` (a scalar) cannot have; the config now
    declares it the way Triton takes scalars (dims [1] reshaped to [])."""
    model = fetch_silero_onnx("silero_vad.onnx")
    shapes = ["--shape", "input:1x576", "--shape", "state:2x1x128"]
    args = ["export-triton", str(model), "--target", "ort-cpu", "--precision", "fp32", *shapes]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "repo")], capsys)
    assert code == 0, err
    config = (tmp_path / "repo" / "silero_vad" / "config.pbtxt").read_text()
    sr = config[config.index('name: "sr"') :].split("\n  }", 1)[0]
    assert "dims: [ 1 ]" in sr and "reshape: { shape: [  ] }" in sr
    assert "max_batch_size: 0" in config


def test_profile_feeds_the_scalar_and_the_state_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """profile cycled every array along axis 0 to fill the batch: `sr` (0-d) was "empty", and `state`
    [2, 1, 128] became 1x1x128 (ORT's InvalidArgument traceback). Real chunk, real state, real sr."""
    model = fetch_silero_onnx("silero_vad.onnx")
    data = write_chunks(tmp_path / "chunks", with_sr=True) / "03.npz"
    report = tmp_path / "profile.json"
    args = ["profile", str(model), "--data", str(data), "--iterations", "20", "--report", str(report)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert report.is_file()


def test_sequence_variant_names_the_rows_of_each_input(tmp_path: Path) -> None:
    """silero_vad_16k_sequence: 16 windows of `input` share one h/c state [1, 1, 128]; the error said only
    "give every input the same batch size", which this model cannot take."""
    model = fetch_silero_onnx("silero_vad_16k_sequence.onnx")
    audio = speech_like()
    windows = np.stack([audio[k * 512 : k * 512 + 576] for k in range(16)])
    state = np.zeros((1, 1, 128), np.float32)
    np.savez(tmp_path / "seq.npz", input=windows, h=state, c=state)
    with pytest.raises(TrtbuildError, match=r"along axis 0 \(input: 16, h: 1, c: 1\).*cannot be split"):
        open_data(tmp_path / "seq.npz", model_inputs(model))
