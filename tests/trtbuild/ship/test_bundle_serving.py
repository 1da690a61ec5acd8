"""Serving handoffs as signed bundles: `bundle create --target triton-<gpu>` packs a Triton model repository,
and `--deepstream` makes a Jetson bundle carry its nvinfer and deepstream-app configs; both verify like every
other bundle and extract to exactly the files the configs name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from google.protobuf import text_format
from test_triton import _model_config_pb2

from trtbuild.bundle import load_public_key, verify_bundle


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from trtbuild.bundle import generate_keypair

    folder = tmp_path_factory.mktemp("keys")
    return generate_keypair(folder / "fleet.pem")


def _create(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[Path]:
    code, stdout, err = run_cli(["bundle", "create", *args, "--json"], capsys)
    assert code == 0, err
    return [Path(p) for p in json.loads(stdout)["bundles"]]


def test_triton_bundle_carries_a_model_repository(
    effnet_onnx: Path, keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keypair
    [path] = _create(
        [
            "--model",
            str(effnet_onnx),
            "--target",
            "triton-h100",
            "--precision",
            "fp16",
            "--key",
            str(private),
            "--out",
            str(tmp_path / "bundles"),
        ],
        capsys,
    )
    report = verify_bundle(path, load_public_key(str(public)), extract_to=tmp_path / "x", device="skip")
    assert report.manifest.target == "triton-h100"
    assert (
        report.manifest.requires["serving"] == "triton"
        and report.manifest.requires["device"] == "NVIDIA H100"
    )
    configs = list((tmp_path / "x").rglob("config.pbtxt"))
    assert len(configs) == 1
    config = text_format.Parse(configs[0].read_text(), _model_config_pb2().ModelConfig())
    assert config.platform == "tensorrt_plan" and config.input[0].name == "images"
    _assert_smoke_passes(tmp_path / "x", report.manifest, "efficientnet_lite0/")


def _assert_smoke_passes(extracted: Path, manifest: object, model_prefix: str) -> None:
    """The bundle carries its smoke record (signed with it), on the graph it serves, and the device agent's
    check passes on it; a changed output fails it."""
    import numpy as np

    from trtbuild.core.errors import TrtbuildError
    from trtbuild.fleet.smoke import SMOKE_DIR, SMOKE_INDEX, run_smoke

    index = json.loads((extracted / SMOKE_DIR / SMOKE_INDEX).read_text())
    assert index["model"].startswith(model_prefix) and (extracted / index["model"]).is_file(), index
    checked = run_smoke(extracted, manifest)  # type: ignore[arg-type]
    assert "not run" not in checked and "match the recorded run" in checked, checked
    first = extracted / SMOKE_DIR / next(iter(index["outputs"].values()))
    np.save(first, np.load(first) + 1.0)
    with pytest.raises(TrtbuildError, match="failed its smoke test"):
        run_smoke(extracted, manifest)  # type: ignore[arg-type]


def test_triton_ort_cpu_bundle_smoke_runs_the_served_graph(
    effnet_onnx: Path, keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keypair
    [path] = _create(
        ["--model", str(effnet_onnx), "--target", "triton-ort-cpu", "--precision", "fp32"]
        + ["--key", str(private), "--out", str(tmp_path / "bundles")],
        capsys,
    )
    report = verify_bundle(path, load_public_key(str(public)), extract_to=tmp_path / "x", device="skip")
    assert report.manifest.requires["runtime"] == "onnxruntime"
    _assert_smoke_passes(tmp_path / "x", report.manifest, "efficientnet_lite0/1/model.onnx")


def test_jetson_bundle_with_deepstream_configs(
    effnet_onnx: Path, keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keypair
    [path] = _create(
        [
            "--model",
            str(effnet_onnx),
            "--target",
            "orin-jp6.2",
            "--precision",
            "fp16",
            "--deepstream",
            "--key",
            str(private),
            "--out",
            str(tmp_path / "bundles"),
        ],
        capsys,
    )
    report = verify_bundle(path, load_public_key(str(public)), extract_to=tmp_path / "x", device="orin-jp6.2")
    assert report.manifest.requires["kind"] == "jetson"
    extracted = {p.name for p in (tmp_path / "x").rglob("*") if p.is_file()}
    assert {"config_infer_primary.txt", "deepstream_app_config.txt", "build.sh"} <= extracted
    infer = next((tmp_path / "x").rglob("config_infer_primary.txt")).read_text()
    onnx_file = next(
        line.split("=", 1)[1].strip() for line in infer.splitlines() if line.startswith("onnx-file")
    )
    assert onnx_file in extracted  # the config names a file the bundle carries
    # The bundle carries its smoke record (signed with it); the device agent's check passes on it.
    from trtbuild.fleet.smoke import run_smoke

    payload = next((tmp_path / "x").rglob("smoke")).parent
    checked = run_smoke(payload, report.manifest)
    assert "not run" not in checked, checked


def test_bad_triton_targets_are_one_line(
    effnet_onnx: Path, keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target, expected in (("triton-orin-jp6.2", "data-center"), ("triton-nope", "unknown target")):
        code, _, err = run_cli(
            [
                "bundle",
                "create",
                "--model",
                str(effnet_onnx),
                "--target",
                target,
                "--precision",
                "fp16",
                "--key",
                str(keypair[0]),
                "--out",
                str(tmp_path / "b"),
            ],
            capsys,
        )
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0].lower(), err
        assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.tar.gz"))
