"""Polygraphy-based accuracy: FP32 against itself is exact; FP16 and INT8 graphs are close but not exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from trtbuild.harness.accuracy import compare_onnx
from trtbuild.harness.inputs import accuracy_feeds
from trtbuild.harness.runner import Feed, RunnerTensor

IMAGES = [RunnerTensor("images", np.dtype(np.float32), ("batch", 3, 224, 224))]


@pytest.fixture(scope="module")
def feeds() -> list[Feed]:
    return accuracy_feeds(IMAGES, samples=8, seed=7)


def test_fp32_against_itself_is_exact(effnet_onnx: Path, feeds: list[Feed]) -> None:
    r = compare_onnx(effnet_onnx, effnet_onnx, feeds)
    assert r.passed and r.samples == 8
    assert r.max_abs == 0.0 and r.max_rel == 0.0 and r.err_over_range == 0.0
    assert r.cosine == pytest.approx(1.0) and r.top1_agreement == 1.0


def test_fp16_graph_is_close_not_exact(effnet_onnx: Path, feeds: list[Feed], tmp_path: Path) -> None:
    from onnxconverter_common import float16

    fp16 = tmp_path / "effnet_fp16.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(effnet_onnx)), keep_io_types=True), str(fp16))
    r = compare_onnx(effnet_onnx, fp16, feeds)
    assert not r.passed  # default tolerances are 1e-5: FP16 cannot meet them
    assert 0 < r.max_abs < 0.5
    assert r.cosine > 0.999


def test_int8_graph_differs_more(effnet_onnx: Path, effnet_int8_onnx: Path, feeds: list[Feed]) -> None:
    int8 = effnet_int8_onnx
    r = compare_onnx(effnet_onnx, int8, feeds)
    assert not r.passed and r.max_abs > 0.05
    assert 0.8 < r.cosine < 0.9999
    # top-1 agreement is what ONNX Runtime itself says when run directly
    import onnxruntime as ort

    ref, cand = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (effnet_onnx, int8)
    )
    same = [ref.run(None, f)[0].argmax(1) == cand.run(None, f)[0].argmax(1) for f in feeds]
    assert r.top1_agreement == pytest.approx(float(np.concatenate(same).mean()))
    loose = compare_onnx(effnet_onnx, int8, feeds, atol=100.0, rtol=100.0)
    assert loose.passed  # the verdict follows the tolerances given


def test_torch_candidate_through_polygraphy_adapter(
    effnet_onnx: Path, effnet_model: object, feeds: list[Feed]
) -> None:
    """Our PyTorch runner wrapped for Polygraphy: the same network as the ONNX export, so near-exact."""
    from trtbuild.harness.torch_runner import TorchRunner

    r = compare_onnx(effnet_onnx, TorchRunner(effnet_model, IMAGES, threads=2), feeds, atol=1e-3, rtol=1e-3)
    assert r.passed and r.samples == 8
    assert 0 < r.max_abs < 1e-3 and r.cosine > 0.999999 and r.top1_agreement == 1.0
