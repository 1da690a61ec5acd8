"""Fidelity metrics on known inputs: cosine, SQNR, top-1 agreement, KL, gate parsing, classifier detection."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from calibrators.fidelity import (
    FidelityThreshold,
    classifier_outputs,
    compare,
    compare_output,
    parse_min_fidelity,
)
from trtbuild.errors import TrtbuildError


def test_sqnr_and_cosine_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    noise = (rng.standard_normal(ref.shape) * 0.1).astype(np.float32)
    out = compare_output("y", ref, ref + noise)
    expected_sqnr = 10 * math.log10(
        float((ref.astype(np.float64) ** 2).sum() / (noise.astype(np.float64) ** 2).sum())
    )
    assert out.sqnr_db == pytest.approx(expected_sqnr, rel=1e-6)
    assert 19 < out.sqnr_db < 21  # noise at 10% of the signal's std: ~20 dB
    r, t = ref.reshape(8, -1), (ref + noise).reshape(8, -1)
    cos = (r * t).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(t, axis=1)
    assert out.cosine == pytest.approx(float(cos.mean()), rel=1e-6)
    assert out.min_cosine == pytest.approx(float(cos.min()), rel=1e-6)
    assert out.top1_agreement is None  # 4-D output: not a classifier
    identical = compare_output("y", ref, ref)
    assert identical.cosine == pytest.approx(1.0) and identical.sqnr_db == math.inf


def test_top1_agreement_and_kl_for_classifier_logits() -> None:
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [0.0, 0.1, 0.0]], np.float32)
    test = ref.copy()
    test[3] = [0.2, 0.1, 0.0]  # one low-margin sample flips its top-1
    out = compare_output("logits", ref, test)
    assert out.top1_agreement == pytest.approx(0.75)
    assert out.kl is not None and out.kl > 0
    assert compare_output("logits", ref, ref).kl == pytest.approx(0.0, abs=1e-9)
    gate = FidelityThreshold(top1=0.99, cosine=0.5)
    report = compare({"logits": ref}, {"logits": test}, gate)
    assert not report.passed  # judged on top-1, not on the (high) cosine
    assert compare({"logits": ref}, {"logits": test}, gate, classifiers=set()).passed  # as a plain tensor
    assert report.to_json()["outputs"][0]["top1_agreement"] == pytest.approx(0.75)
    console = Console(record=True, width=120)
    console.print(report.table())
    assert "FAIL" in console.export_text()


def test_parse_min_fidelity_forms_and_errors() -> None:
    assert parse_min_fidelity(None) == FidelityThreshold(0.99, 0.99)
    assert parse_min_fidelity("98%") == FidelityThreshold(0.98, 0.98)
    assert parse_min_fidelity("0.95") == FidelityThreshold(0.95, 0.95)
    assert parse_min_fidelity("97") == FidelityThreshold(0.97, 0.97)
    assert parse_min_fidelity("top1=0.9,cosine=0.995") == FidelityThreshold(0.9, 0.995)
    assert parse_min_fidelity("cosine=0.9") == FidelityThreshold(0.99, 0.9)
    for bad in ("lots", "150%", "sqnr=20"):
        with pytest.raises(TrtbuildError):
            parse_min_fidelity(bad)


def test_classifier_outputs_are_found_by_their_head_op() -> None:
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["logits"]),
        helper.make_node("ReduceL2", ["x"], ["norm"], keepdims=1),
        helper.make_node("Div", ["x", "norm"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f, [2, 4])],
        [
            helper.make_tensor_value_info("logits", f, [2, 3]),
            helper.make_tensor_value_info("embedding", f, [2, 4]),
        ],
        [onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    model = helper.make_model(graph)
    assert classifier_outputs(model) == {"logits"}
