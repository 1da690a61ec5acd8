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
    compare,
    compare_output,
    decide_kinds,
    parse_min_fidelity,
    run_batches,
    session,
)
from calibrators.output_kinds import OutputKind
from trtbuild.core.errors import TrtbuildError

LOGITS = OutputKind("classification", "test")


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
    out = compare_output("logits", ref, test, LOGITS)
    assert out.top1_agreement == pytest.approx(0.75)
    assert out.kl is not None and out.kl > 0
    assert compare_output("logits", ref, ref, LOGITS).kl == pytest.approx(0.0, abs=1e-9)
    gate = FidelityThreshold(top1=0.99, cosine=0.5)
    report = compare({"logits": ref}, {"logits": test}, gate, {"logits": LOGITS})
    assert not report.passed  # judged on top-1, not on the (high) cosine
    as_tensor = {"logits": OutputKind("regression", "test")}
    assert compare({"logits": ref}, {"logits": test}, gate, as_tensor).passed  # as a plain tensor
    # Without a graph, 3 columns are too few for top-1: judged by cosine.
    assert compare_output("logits", ref, test).top1_agreement is None
    assert report.to_json()["outputs"][0]["top1_agreement"] == pytest.approx(0.75)
    console = Console(record=True, width=120)
    console.print(report.table())
    assert "FAIL" in console.export_text()


def test_parse_min_fidelity_forms_and_errors() -> None:
    assert parse_min_fidelity(None) == FidelityThreshold(0.99, 0.99)
    assert parse_min_fidelity("98%") == FidelityThreshold(0.98, 0.98)
    assert parse_min_fidelity("0.95") == FidelityThreshold(0.95, 0.95)
    assert parse_min_fidelity("97%") == FidelityThreshold(0.97, 0.97)
    assert parse_min_fidelity("top1=0.9,cosine=0.995") == FidelityThreshold(0.9, 0.995)
    assert parse_min_fidelity("cosine=0.9") == FidelityThreshold(0.99, 0.9)
    spec = parse_min_fidelity(["box:cosine=0.995,sqnr=20", "prob:top1=99%", "out:0:err=0.01", "top1=0.98"])
    assert spec.top1 == 0.98 and spec.cosine == 0.99
    assert dict(spec.per_output) == {
        "box": (("cosine", 0.995), ("sqnr", 20.0)),
        "prob": (("top1", 0.99),),
        "out:0": (("err", 0.01),),  # an output name with a colon (TF-style exports)
    }
    assert spec.bounds_for("box", "regression") == {"cosine": 0.995, "sqnr": 20.0}
    assert spec.bounds_for("landmarks", "regression") == {"cosine": 0.99}
    assert spec.bounds_for("logits", "classification") == {"top1": 0.98}
    bad_cases = {
        "lots": "not a number",
        "150%": "outside",
        "1.5": "above 1",  # a bare number is a fraction: 1.5 used to become 1.5%
        "97": "above 1",
        "sqnr=20": "needs an output name",
        "top1=0.5,cosine": "incomplete",
        "box:foo=1": "unknown metric",
        ":cosine=0.9": "names no output",
        "box:kl=-1": "negative",
        "box:sqnr=20%": "plain number",
    }
    for bad, message in bad_cases.items():
        with pytest.raises(TrtbuildError, match=message):
            parse_min_fidelity(bad)
    with pytest.raises(TrtbuildError, match="twice"):
        parse_min_fidelity(["box:cosine=0.9", "box:sqnr=10"])


def test_output_kinds_follow_the_graph_and_the_values() -> None:
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["logits"]),
        helper.make_node("Gemm", ["x", "wb"], ["box"]),
        helper.make_node("Gemm", ["x", "wb"], ["y4"]),
        helper.make_node("Softmax", ["two"], ["prob"], axis=1),
        helper.make_node("Gemm", ["x", "wp"], ["two"]),
        helper.make_node("ReduceL2", ["x"], ["norm"], keepdims=1),
        helper.make_node("Div", ["x", "norm"], ["embedding"]),
        helper.make_node("Conv", ["img", "k"], ["heatmap"]),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", f, [4, 16]),
            helper.make_tensor_value_info("img", f, [4, 1, 8, 8]),
        ],
        [
            helper.make_tensor_value_info(name, f, None)
            for name in ("logits", "box", "y4", "prob", "embedding", "heatmap")
        ],
        [
            onnx.numpy_helper.from_array(rng.normal(size=(16, 12)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "wb"),
            onnx.numpy_helper.from_array(rng.normal(size=(16, 2)).astype(np.float32), "wp"),
            onnx.numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "k"),
        ],
    )
    model = helper.make_model(graph)
    import onnxruntime as ort

    feeds = {
        "x": rng.normal(size=(4, 16)).astype(np.float32),
        "img": rng.normal(size=(4, 1, 8, 8)).astype(np.float32),
    }
    names = ["logits", "box", "y4", "prob", "embedding", "heatmap"]
    outputs = ort.InferenceSession(model.SerializeToString()).run(names, feeds)
    kinds = decide_kinds(model, dict(zip(names, outputs, strict=True)))
    assert {n: k.kind for n, k in kinds.items()} == {
        "logits": "classification",  # a Gemm head with 12 classes
        "box": "regression",  # named like a box head
        "y4": "regression",  # 4 columns: never top-1
        "prob": "probability",  # Softmax, even with 2 columns
        "embedding": "embedding",  # divided by its L2 norm
        "heatmap": "regression",  # a raw Conv map
    }
    assert "too few" in kinds["y4"].reason and "regression head" in kinds["box"].reason
    report = compare(
        dict(zip(names, outputs, strict=True)), dict(zip(names, outputs, strict=True)), kinds=kinds
    )
    by_name = {o.name: o for o in report.outputs}
    assert by_name["prob"].top1_agreement == 1.0 and by_name["box"].top1_agreement is None
    overridden = decide_kinds(model, dict(zip(names, outputs, strict=True)), {"logits": "embedding"})
    assert overridden["logits"].kind == "embedding" and overridden["logits"].reason == "set by --output-kind"
    with pytest.raises(TrtbuildError, match="does not have"):
        decide_kinds(model, dict(zip(names, outputs, strict=True)), {"nope": "regression"})


def test_one_metric_definition_zero_outputs_never_pass() -> None:
    """FP32 [1, 2, 3] against an all-zero output: cosine 0 in the gate, the FP16 check and the profiler
    alike (the FP16 check used to score it 1.0)."""
    from export.fp16 import verify_fp16
    from trtbuild.core import metrics
    from trtbuild.harness.accuracy import _cosines

    ref, zero = np.array([[1.0, 2.0, 3.0]]), np.zeros((1, 3))
    assert metrics.cosine_per_sample(ref, zero).tolist() == [0.0]
    assert metrics.cosine_per_sample(zero, zero).tolist() == [1.0]
    assert compare_output("y", ref, zero).cosine == 0.0
    assert _cosines(ref, zero).tolist() == [0.0]
    # an FP16 "conversion" that outputs zeros fails its check
    f = TensorProto.FLOAT
    good = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", f, [None, 3])],
            [helper.make_tensor_value_info("y", f, [None, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    zeros = helper.make_model(
        helper.make_graph(
            [helper.make_node("Sub", ["x", "x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", f, [None, 3])],
            [helper.make_tensor_value_info("y", f, [None, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(good, str(Path(tmp) / "a.onnx"))
        onnx.save(zeros, str(Path(tmp) / "b.onnx"))
        check = verify_fp16(
            Path(tmp) / "a.onnx", Path(tmp) / "b.onnx", {"x": np.array([[1, 2, 3]], np.float32)}
        )
    assert check.cosine_min == 0.0 and not check.passed


def test_gate_table_shows_the_probability_map_iou() -> None:
    """A detector's probability map is judged by IoU of the thresholded maps; the table shows it."""
    rng = np.random.default_rng(0)
    ref = 1 / (1 + np.exp(-4 * rng.standard_normal((2, 1, 32, 32)).astype(np.float32)))
    test = np.clip(ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32), 0, 1)
    kinds = {"maps": OutputKind("prob_map", "test"), "logits": OutputKind("regression", "test")}
    report = compare(
        {"maps": ref, "logits": ref[:, 0, 0]}, {"maps": test, "logits": test[:, 0, 0]}, kinds=kinds
    )
    console = Console(width=250, record=True)
    console.print(report.table())
    text = console.export_text()
    maps = report.outputs[[o.name for o in report.outputs].index("maps")]
    assert maps.iou is not None and 0.5 < maps.iou < 1.0
    assert "IoU@0.3" in text and f"{maps.iou:.4f}" in text


@pytest.mark.parametrize("batch", [1, 3])
def test_samples_are_inputs_whatever_the_output_layout(batch: int) -> None:
    """Time-major outputs ([T, N, C], as CRNN/CTC readers export them) and outputs without a batch axis
    (a batch-1 model that squeezes it) are paired and counted per input sample, not per time step: the
    gate's sample count and intervals must describe the held-out inputs."""
    n = batch
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["time_major"], perm=[1, 0, 2]),
            helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[0], keepdims=0),
        ],
        "layouts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 7, 5])],
        [
            helper.make_tensor_value_info("time_major", TensorProto.FLOAT, [7, n, 5]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [7, 5]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(n, 7, 5)).astype(np.float32)} for _ in range(4)]
    out = run_batches(session(model), feeds)
    assert out["time_major"].shape == (4 * n, 7, 5)
    np.testing.assert_array_equal(out["time_major"][:n], feeds[0]["x"])  # sample i is input i
    # Reduced over the batch: a batch of one gives one sample; larger batches have no batch axis left.
    assert out["pooled"].shape == ((4, 7, 5) if n == 1 else (4 * 7, 5))
    noisy = {k: v + 1e-3 * rng.normal(size=v.shape).astype(np.float32) for k, v in out.items()}
    assert compare({"time_major": out["time_major"]}, {"time_major": noisy["time_major"]}).samples == 4 * n


def test_sequence_classes_are_judged_per_position_with_a_per_sample_interval() -> None:
    """[N, T, C] character probabilities (a CTC reader): top-1 agreement is the share of positions whose
    class agrees, and its interval counts inputs, not positions; one flipped position of 4 x 10 is 97.5%."""
    rng = np.random.default_rng(1)
    ref = rng.dirichlet(np.ones(12), size=(4, 10)).astype(np.float32)  # [N=4, T=10, C=12]
    test = ref.copy()
    test[2, 7] = np.roll(test[2, 7], 1)  # one position reads another character
    flipped = int((ref.argmax(-1) != test.argmax(-1)).sum())
    out = compare_output("probs", ref, test, OutputKind("probability", "test"))
    assert out.top1_agreement == pytest.approx(1 - flipped / 40)
    assert out.top1_interval is not None and out.top1_interval[0] < 0.6  # 4 inputs prove little
    same = compare_output("probs", ref, ref, OutputKind("probability", "test"))
    assert same.top1_agreement == 1.0 and same.top1_interval is not None and same.top1_interval[1] == 1.0
    assert same.top1_interval[0] < 0.6  # not collapsed to a point by identical positions
