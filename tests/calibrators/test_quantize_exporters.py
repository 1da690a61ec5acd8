"""Quantize with auto-fallback on the graphs users really bring: both torch exporters (dynamo, the
product's default, and TorchScript, what most third-party files come from), each with a dynamic batch and
with a fixed batch of 1 (every path that runs the model must respect it)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from calibrators.quantize import quantize
from export.pipeline import export_model
from trtbuild import examples


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_photo_folder(tmp_path_factory.mktemp("photos"), 24, seed=3)


def _export(exporter: str, dynamic: bool, model: torch.nn.Module, out: Path) -> Path:
    if exporter == "dynamo":  # the product's export: dynamo, prepared and verified
        return export_model(
            model, ["images:1x3x224x224"], out / "effnet.onnx", dynamic_batch=dynamic, output_names=["logits"]
        ).onnx_path
    path = out / "effnet.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}} if dynamic else None,
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "batch-1"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_auto_fallback_on_both_exporters_and_fixed_batch(
    exporter: str, dynamic: bool, effnet_model: torch.nn.Module, photos: Path, tmp_path: Path
) -> None:
    onnx_path = _export(exporter, dynamic, effnet_model, tmp_path)
    batch_dim = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch_dim.dim_value == 1) != dynamic  # the export really has the batch we asked for
    common = {"samples": 8, "holdout": 16, "show_progress": False}
    plain = quantize(onnx_path, photos, tmp_path / "plain", min_fidelity=0, **common)
    assert plain.holdout_samples == 16 and plain.fidelity.semantics == "reference"
    # A gate a quarter of the way from this INT8 model to perfect: the fallback search must run and win.
    base_cos = plain.fidelity.outputs[0].cosine
    wanted = base_cos + (1.0 - base_cos) * 0.25
    result = quantize(
        onnx_path,
        photos,
        tmp_path / "out",
        min_fidelity=[f"logits:cosine={wanted:.6f}"],
        auto_fallback=True,
        **common,
    )
    assert result.fallback is not None and not result.fallback.baseline.passed
    assert result.passed and result.fidelity.semantics == "reference"
    assert result.holdout_samples == 16
    kept = len(result.fallback.kept_float)
    assert 1 <= kept < len(result.plan.quantized_nodes) // 2, result.fallback.trials
    assert result.fallback.float_compute < 0.5 and result.fidelity.outputs[0].cosine >= wanted
    assert result.onnx_path.exists() and result.report_path.exists()
