"""quantize's four outputs are one set: one writer per folder, a report that names every member by hash,
removed first and written last, and an unusable output folder refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

from calibrators import quantize as quantize_module
from calibrators.quantize import quantize
from trtbuild import examples
from trtbuild.core import output_set


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_photo_folder(tmp_path_factory.mktemp("photos"), 16, seed=2)


def _run(effnet_onnx: Path, photos: Path, out: Path) -> quantize_module.QuantizeResult:
    return quantize(effnet_onnx, photos, out, samples=8, holdout=8, min_fidelity=0, show_progress=False)


def test_report_ties_the_set_together_and_a_failed_rewrite_leaves_no_stale_report(
    effnet_onnx: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(effnet_onnx, photos, tmp_path)
    report = json.loads(result.report_path.read_text())
    assert set(report[output_set.MANIFEST_KEY]) == {"onnx", "cache", "ranges"}
    assert output_set.verify(result.report_path) == []
    # Another run's cache beside this report is caught.
    original = result.cache_path.read_bytes()
    result.cache_path.write_bytes(original.replace(b"TRT-", b"TRT-9", 1))
    problems = output_set.verify(result.report_path)
    assert len(problems) == 1 and problems[0].startswith("cache:")
    result.cache_path.write_bytes(original)

    # A second run dies after its new ONNX landed (as kill -9 would): no report is left claiming to
    # describe the new ONNX beside the old cache and ranges.
    def die(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_module, "write_cache", die)
    with pytest.raises(KeyboardInterrupt):
        _run(effnet_onnx, photos, tmp_path)
    assert result.onnx_path.exists() and not result.report_path.exists()


def test_a_second_writer_into_the_same_folder_is_refused(
    effnet_onnx: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom trtbuild.core import output_set\n"
            f"with output_set.writer_lock({str(out)!r}):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        code, _, err = run_cli(
            ["quantize", str(effnet_onnx), "--data", str(photos), "--holdout", "8", "--out-dir", str(out)],
            capsys,
        )
        lines = [line for line in err.splitlines() if line.strip()]
        assert (
            code == 2
            and len(lines) == 1
            and "another trtbuild run" in lines[0]
            and str(holder.pid) in lines[0]
        )
        assert time.perf_counter() - start < 10  # refused before calibrating anything
        assert not list(out.glob("*.onnx"))
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up (as kill -9 does): its lock died with it.
    assert _run(effnet_onnx, photos, out).report_path.exists()


def test_an_unusable_output_folder_is_one_line_before_any_work(
    effnet_onnx: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, stdout, err = run_cli(
        ["quantize", str(effnet_onnx), "--data", str(photos), "--out-dir", str(blocker / "out")], capsys
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "cannot write to" in lines[0] and "--out-dir" in lines[0]
    assert stdout == ""
    # A failed run into a new folder leaves no folder (and no lock file) behind.
    out = tmp_path / "new" / "deeper"
    code, _, err = run_cli(
        [
            "quantize",
            str(effnet_onnx),
            "--data",
            str(photos),
            "--min-fidelity",
            "box:cosine=0.9",
            "--out-dir",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and not (tmp_path / "new").exists()
