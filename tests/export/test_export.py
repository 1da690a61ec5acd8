"""Export real PyTorch models through trtbuild's export path and check ONNX Runtime against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.meta import load_export_meta, meta_path, model_input_specs
from export.pipeline import ExportResult, export_model
from trtbuild import examples
from trtbuild.core.errors import TrtbuildError

IMAGE_TEXT = str(Path(__file__).resolve().parents[2] / "tests" / "models" / "image_text.py")


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def effnet_export(tmp_path_factory: pytest.TempPathFactory, photo_batch: np.ndarray) -> ExportResult:
    out = tmp_path_factory.mktemp("effnet-export") / "efficientnet_lite0.onnx"
    return export_model(
        "trtbuild.examples:efficientnet_lite0",
        ["images:1x3x224x224"],
        out,
        dynamic_batch=True,
        max_batch=16,
        output_names=["logits"],
        verify_inputs=photo_batch[:8],
    )


def test_effnet_export_matches_pytorch_on_random_and_real_photos(effnet_export: ExportResult) -> None:
    result = effnet_export
    assert result.exporter == "dynamo" and result.fallback_reason is None
    labels = [c.label for c in result.verification.cases]
    assert labels == ["random 1x3x224x224", "random 2x3x224x224", "data 0:8", "data 8:16"][: len(labels)]
    assert any(label.startswith("data") for label in labels)
    (logits,) = result.verification.worst()
    assert logits.name == "logits" and logits.mismatched == 0
    assert 0 < logits.max_abs < 1e-4  # FP32 graph: tiny, but not bit-identical to PyTorch


def test_effnet_graph_has_names_dynamic_batch_and_initializers(effnet_export: ExportResult) -> None:
    model = onnx.load(str(effnet_export.onnx_path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert next(o.version for o in model.opset_import if o.domain == "") == 17
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    weights = sum(np.prod(t.dims) for t in model.graph.initializer)
    assert weights > 4_000_000  # EfficientNet-Lite0 has ~4.65M parameters, all as initializers
    assert not any(t.external_data for t in model.graph.initializer)
    assert not Path(str(effnet_export.onnx_path) + ".data").exists()
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)


def test_effnet_dynamic_batch_1_and_7_match_pytorch(
    effnet_export: ExportResult, effnet_model: torch.nn.Module, photo_batch: np.ndarray
) -> None:
    for batch in (1, 7):
        x = photo_batch[8 : 8 + batch]
        (got,) = ort_run(effnet_export.onnx_path, {"images": x})
        with torch.no_grad():
            want = effnet_model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 1000)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_effnet_sidecar_is_what_later_stages_read(effnet_export: ExportResult) -> None:
    meta = load_export_meta(effnet_export.onnx_path)
    assert meta_path(effnet_export.onnx_path) == effnet_export.onnx_path.with_name(
        "efficientnet_lite0.export.json"
    )
    assert meta.source == "trtbuild.examples:efficientnet_lite0" and meta.exporter == "dynamo"
    (spec,) = model_input_specs(effnet_export.onnx_path)
    assert (spec.name, spec.min, spec.opt_shape, spec.max) == (
        "images",
        (1, 3, 224, 224),
        (1, 3, 224, 224),
        (16, 3, 224, 224),
    )
    assert [(o.name, o.shape, o.dtype) for o in meta.outputs] == [("logits", ("batch", 1000), "float32")]
    assert meta.verification is not None and meta.verification["passed"] is True
    assert meta.sha256 and meta.opset == 17


def test_sidecar_detects_a_changed_onnx(tmp_path: Path, effnet_export: ExportResult) -> None:
    copy = tmp_path / "m.onnx"
    copy.write_bytes(effnet_export.onnx_path.read_bytes() + b"\0")
    meta_path(copy).write_bytes(effnet_export.meta_path.read_bytes())
    with pytest.raises(TrtbuildError, match="changed after"):
        load_export_meta(copy)


@pytest.fixture(scope="module")
def image_text_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("image-text") / "image_text.onnx"
    return export_model(
        f"{IMAGE_TEXT}:build",
        ["image:1x3x32x32", "token_ids:1x8:int64"],
        out,
        dynamic_batch=True,
        max_batch=16,
        output_names=["logits", "text_vector"],
    )


def test_two_input_model_with_embedding_layernorm_gridsample(image_text_export: ExportResult) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_text_models", IMAGE_TEXT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    graph = onnx.load(str(image_text_export.onnx_path))
    ops = {n.op_type for n in graph.graph.node}
    assert {"Gather", "LayerNormalization", "GridSample"} <= ops
    assert [i.name for i in graph.graph.input] == ["image", "token_ids"]
    assert graph.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    rng = np.random.default_rng(5)
    photos = examples.normalize_imagenet(examples.photo_crops(7, size=32, seed=3))
    for batch in (1, 7):
        feeds = {
            "image": photos[:batch],
            "token_ids": rng.integers(0, module.VOCAB, (batch, 8)).astype(np.int64),
        }
        got = ort_run(image_text_export.onnx_path, feeds)
        with torch.no_grad():
            want = [
                t.numpy()
                for t in model(torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["token_ids"]))
            ]
        assert [g.shape for g in got] == [(batch, 10), (batch, 16)]
        for g, w in zip(got, want, strict=False):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    meta = load_export_meta(image_text_export.onnx_path)
    assert [s.dtype for s in meta.inputs] == ["float32", "int64"]
    assert [s.max[0] for s in meta.inputs] == [16, 16]


def test_explicit_min_max_shapes_make_non_batch_axes_dynamic(tmp_path: Path) -> None:
    out = tmp_path / "it.onnx"
    result = export_model(
        f"{IMAGE_TEXT}:build",
        ["image:2x3x32x32", "token_ids:2x8:int64"],
        out,
        min_shapes={"image": "1x3x32x32", "token_ids": "1x4"},
        max_shapes={"image": "4x3x32x32", "token_ids": "4x12"},
    )
    graph = onnx.load(str(out))
    ids_dims = graph.graph.input[1].type.tensor_type.shape.dim
    assert ids_dims[0].dim_param == "batch" and ids_dims[1].dim_param
    feeds: dict[str, np.ndarray] = {
        "image": np.zeros((3, 3, 32, 32), np.float32),
        "token_ids": np.ones((3, 11), np.int64),
    }
    assert ort_run(out, feeds)[0].shape == (3, 10)
    assert [c.label for c in result.verification.cases] == ["random 2x3x32x32", "random 4x3x32x32"]
    assert [s.max for s in model_input_specs(out)] == [(4, 3, 32, 32), (4, 12)]


def test_torchscript_file_falls_back_to_the_torchscript_exporter(
    tmp_path: Path, image_text_export: ExportResult
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_text_models2", IMAGE_TEXT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    scripted = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, dtype=torch.int64)))
    pt = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(pt))
    # opset 20: the TorchScript exporter has no affine_grid before it
    result = export_model(str(pt), ["image:1x3x32x32", "token_ids:1x8:int64"], tmp_path / "s.onnx", opset=20)
    assert result.exporter == "torchscript"
    assert load_export_meta(tmp_path / "s.onnx").opset == 20
    assert result.fallback_reason and "torch.export" in result.fallback_reason
    assert result.verification.passed
    assert load_export_meta(tmp_path / "s.onnx").extra["fallback_reason"] == result.fallback_reason
