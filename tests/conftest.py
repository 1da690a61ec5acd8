"""Shared fixtures: real models and real photos, built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trtbuild import examples

torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU/TensorRT tests run wherever the hardware is; here they skip with the reason."""
    from trtbuild.hardware import cuda_available, tensorrt_available

    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none on this machine")
    no_trt = pytest.mark.skip(
        reason="needs a real TensorRT install and a GPU; TensorRT is not installed here"
    )
    for item in items:
        if "tensorrt" in item.keywords and not (tensorrt_available() and cuda_available()):
            item.add_marker(no_trt)
        elif "gpu" in item.keywords and not cuda_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def effnet_model() -> torch.nn.Module:
    return examples.efficientnet_lite0()


@pytest.fixture(scope="session")
def photo_batch() -> np.ndarray:
    """32 real photo crops, normalised for EfficientNet-Lite0: (32, 3, 224, 224) float32."""
    return examples.normalize_imagenet(examples.photo_crops(32, seed=1))


@pytest.fixture(scope="session")
def effnet_onnx(tmp_path_factory: pytest.TempPathFactory, effnet_model: torch.nn.Module) -> Path:
    """EfficientNet-Lite0 as FP32 ONNX (opset 17, dynamic batch, input 'images', output 'logits').

    Exported here with the legacy TorchScript exporter so every test module gets the same graph quickly;
    export/ has its own tests of the product's export path.
    """
    path = tmp_path_factory.mktemp("effnet") / "efficientnet_lite0.onnx"
    torch.onnx.export(
        effnet_model,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="session")
def effnet_int8_onnx(tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path) -> Path:
    """An INT8 Q/DQ EfficientNet-Lite0 made by ONNX Runtime's quantize_static (min-max, uint8 activations)
    on real photos: an independent INT8 model for testing the profiler, not the product's quantizer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    photos = examples.normalize_imagenet(examples.photo_crops(8, seed=3))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": photos[i : i + 1]} for i in range(len(photos))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = tmp_path_factory.mktemp("int8") / "effnet_int8.onnx"
    quantize_static(
        str(effnet_onnx),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return out
