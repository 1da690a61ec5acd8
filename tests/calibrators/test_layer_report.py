"""`trtbuild quantize --report` on the real EfficientNet-Lite0 (dynamic batch, and a static batch of 1):
per-layer SQNR alone and cumulative, the worst layers' histograms, one self-contained HTML page."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import onnx
import pytest
import torch
from cli_helpers import run_cli

from trtbuild import examples
from trtbuild.core import output_set


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_photo_folder(tmp_path_factory.mktemp("photos"), 40, seed=5)


def _check_page(html_path: Path, png_dir: Path, layers: list[dict], model: onnx.ModelProto) -> None:
    page = html_path.read_text()
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)  # nothing fetched
    assert "<script" not in page and "<link" not in page and "url(" not in page
    nodes = {n.name for n in model.graph.node}
    assert {la["node"] for la in layers} <= nodes  # real layers of the model
    worst = sorted(layers, key=lambda la: la["sqnr_alone_db"])[:5]
    assert all(la["node"] in page for la in worst)
    pngs = sorted(p.name for p in png_dir.iterdir())
    assert "sqnr.png" in pngs and len([p for p in pngs if p.startswith("hist_")]) == 5
    assert len(links) == len(pngs)  # every PNG written is also inside the page


def _check_numbers(layers: list[dict]) -> None:
    alone = [la["sqnr_alone_db"] for la in layers]
    cumulative = [la["sqnr_cumulative_db"] for la in layers]
    assert all(v is not None and math.isfinite(v) for v in alone + cumulative)
    # Quantizing the layers upstream only adds noise: cumulative is never above alone (0.5 dB slack for
    # errors that happen to cancel), and the noise builds up along the network.
    assert all(c <= a + 0.5 for a, c in zip(alone, cumulative, strict=True)), [
        *zip(alone, cumulative, strict=True)
    ]
    assert sum(cumulative[-5:]) < sum(cumulative[:5])
    assert 10 < min(alone) < max(alone) < 80


def test_report_on_effnet_is_written_with_the_set(
    effnet_onnx: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["quantize", str(effnet_onnx), "--data", str(photos), "--samples", "24", "--holdout", "16"]
    code, stdout, err = run_cli(
        [*args, "--min-fidelity", "90%", "--report", "--out-dir", str(out), "--json"], capsys
    )
    assert code == 0, err
    assert "only 16 held-out samples" in err  # the gate is decided on fewer than 32
    summary = json.loads(stdout)
    fid = summary["fidelity"]
    assert fid["samples"] == 16 and "only 16" in fid["sample_warning"]
    logits = fid["outputs"][0]
    lo, hi = logits["top1_interval"]
    assert lo <= logits["top1_agreement"] <= hi and hi - lo > 0.1  # 16 samples: a wide interval
    assert 0 < summary["float_compute"] < 0.05  # the stem stays float: ~1% of the MACs
    report = summary["layer_report"]
    assert report["samples"] == 8 and report["seconds"] < 60
    assert len(report["layers"]) == summary["quantized_layers"] and len(report["worst"]) == 5
    _check_numbers(report["layers"])
    html_path, png_dir = Path(report["html"]), Path(report["png_dir"])
    assert html_path == out / "efficientnet_lite0.int8.report.html" and png_dir.is_dir()
    _check_page(html_path, png_dir, report["layers"], onnx.load(str(effnet_onnx), load_external_data=False))
    manifest = out / "efficientnet_lite0.fidelity.json"
    assert "report_html" in json.loads(manifest.read_text())[output_set.MANIFEST_KEY]
    assert output_set.verify(manifest) == []


def test_report_on_a_static_batch_model_names_the_worst_five(
    effnet_model: torch.nn.Module, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "static.onnx"
    torch.onnx.export(
        effnet_model,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    out = tmp_path / "out"
    args = ["quantize", str(path), "--data", str(photos), "--holdout", "32"]
    code, stdout, err = run_cli([*args, "--min-fidelity", "90%", "--report", "--out-dir", str(out)], capsys)
    assert code == 0, err
    assert "held-out samples (< 32)" not in err  # 32 samples: no warning
    assert "Worst 5 layers by SQNR alone" in stdout
    line = next(ln for ln in stdout.splitlines() if ln.startswith("worst layers: "))
    named = line.removeprefix("worst layers: ").split(", ")
    report = json.loads((out / "static.fidelity.json").read_text())["layer_report"]
    assert named == report["worst"] and len(named) == 5
    _check_numbers(report["layers"])
    _check_page(
        out / "static.int8.report.html", out / "static.int8.report", report["layers"], onnx.load(str(path))
    )
