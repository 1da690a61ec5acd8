"""Output-aware activation ranges (calibrators/output_aware.py), depthwise input equalization
(calibrators/dw_equalize.py) and the prob_map output kind, on the real PP-OCRv4 detector (a third-party
Paddle export at opset 12 with Constant-node weights and p2o.* names) and EfficientNet-Lite0 exported with
a fixed batch of 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_quantize_models import fetch_det_onnx, make_page_crops

from calibrators import dw_equalize, fidelity, output_aware
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from calibrators.quantize import quantize, upgrade_opset
from trtbuild import examples
from trtbuild.core import metrics
from trtbuild.core.errors import TrtbuildError

SAMPLES, ROWS = 4, 256  # small: the tests check behaviour, the bench measures the full setting


@pytest.fixture(scope="module")
def det() -> dict:
    model = upgrade_opset(onnx.load(str(fetch_det_onnx())))
    crops = make_page_crops()
    name = model.graph.input[0].name
    calib = [{name: crops[i : i + 2]} for i in range(0, 8, 2)]
    held = [{name: crops[16:24]}]
    collection = collect(model, calib, tensors=quantizable_activations(model), show_progress=False)
    base = compute_ranges(collection, "mse")
    plan = plan_qdq(model, base, QdqOptions())
    result = output_aware.refine(model, base, plan, collection.stats, calib, samples=SAMPLES, rows=ROWS)
    return {
        "model": model,
        "calib": calib,
        "held": held,
        "stats": collection.stats,
        "base": base,
        "plan": plan,
        "result": result,
    }


def test_refined_ranges_lower_the_consumer_output_error_on_held_out_images(det: dict) -> None:
    result = det["result"]
    assert result.ranges.method == output_aware.METHOD and result.ranges.meta["base_method"] == "mse"
    assert len(result.scored) > 40 and result.changed  # every activation read by a quantized conv
    # Unscored tensors (no quantized Conv/Gemm/MatMul reader) keep the base range exactly.
    for name in set(det["base"]) - set(result.scored):
        assert result.ranges[name].amax == det["base"][name].amax
    # The objective on other images and rows than it was chosen on: lower in total, never much worse.
    kw = {"samples": 8, "rows": ROWS, "seed": 7}
    before = output_aware.consumer_errors(det["model"], det["base"], det["plan"], det["held"], **kw)
    refined_plan = plan_qdq(det["model"], result.ranges, QdqOptions())
    after = output_aware.consumer_errors(det["model"], result.ranges, refined_plan, det["held"], **kw)
    assert sum(after.values()) < 0.95 * sum(before.values())
    # The depthwise conv behind the worst SQNR (its input range was set by a few large channels).
    assert after["p2o.Add.15"] < 0.5 * before["p2o.Add.15"]


def test_refined_ranges_improve_the_detector_output(det: dict) -> None:
    model, held = det["model"], det["held"]
    reference = fidelity.run_batches(fidelity.session(model), held)
    out = model.graph.output[0].name
    cos = {}
    for label, ranges in (("mse", det["base"]), ("output-aware", det["result"].ranges)):
        qmodel = apply_qdq(model, plan_qdq(model, ranges, QdqOptions()))
        test = fidelity.run_batches(fidelity.session(qmodel), held)
        cos[label] = float(metrics.cosine_per_sample(reference[out], test[out]).mean())
    assert cos["output-aware"] > cos["mse"] + 0.005, cos


def test_refinement_is_deterministic_for_a_seed(det: dict) -> None:
    args = (det["model"], det["base"], det["plan"], det["stats"], det["calib"])
    again = output_aware.refine(*args, samples=SAMPLES, rows=ROWS)
    assert again.scored == det["result"].scored
    assert again.ranges.to_json()["tensors"] == det["result"].ranges.to_json()["tensors"]


def test_equalized_depthwise_inputs_keep_the_float_function(det: dict) -> None:
    model, calib = det["model"], det["calib"]
    eq, changed = dw_equalize.equalize_depthwise(model, calib)
    depthwise = {n.name for n in dw_equalize.depthwise_convs(model, _index(model))}
    assert "p2o.Conv.3" in changed and set(changed) <= depthwise
    held = det["held"]
    ref = fidelity.run_batches(fidelity.session(model), held)
    got = fidelity.run_batches(fidelity.session(eq), held)
    out = model.graph.output[0].name
    assert np.abs(ref[out] - got[out]).max() < 1e-4
    # On the data it was measured on, every channel of an equalized input now reaches the same max.
    conv3 = next(n for n in eq.graph.node if n.name == "p2o.Conv.3")
    maxima = dw_equalize.channel_absmax(eq, [conv3.input[0]], calib, None)[conv3.input[0]]
    assert np.allclose(maxima[maxima > 0], maxima.max(), rtol=1e-4)


def test_quantize_output_aware_with_equalization_meets_a_detector_gate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through quantize(): the opset-12 Paddle graph, the prob_map kind and its IoU bound in the gate.
    Equalization and output-aware ranges measure on up to 32 / their own count of the 16 calibration
    samples: no "asked for 32 calibration samples" warning (the user asked for 16)."""
    crops = make_page_crops()
    result = quantize(
        fetch_det_onnx(),
        list(crops[:, None]),
        tmp_path,
        method=output_aware.METHOD,
        equalize_depthwise=True,
        samples=16,
        holdout=8,
        min_fidelity="sigmoid_0.tmp_0:cosine=0.96,iou=0.9",
        batch_size=4,
        show_progress=False,
    )
    out = result.fidelity.outputs[0]
    assert out.kind == "prob_map" and out.iou is not None and out.iou >= 0.9 and out.cosine >= 0.96
    assert "asked for" not in caplog.text, caplog.text
    assert result.ranges.method == output_aware.METHOD
    qmodel = onnx.load(str(result.onnx_path))
    assert any(n.name.endswith(dw_equalize.SUFFIX) for n in qmodel.graph.node)


def test_output_aware_on_a_fixed_batch_one_export(effnet_model: torch.nn.Module, tmp_path: Path) -> None:
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
    x = examples.normalize_imagenet(examples.photo_crops(24, seed=4))
    result = quantize(
        path,
        list(x[:, None]),
        tmp_path / "out",
        method=output_aware.METHOD,
        samples=16,
        holdout=8,
        min_fidelity="75%",
        batch_size=1,
        show_progress=False,
    )
    assert result.passed and result.ranges.meta["output_aware"]["scored"] > 40


def test_output_aware_refuses_non_int8_activations(effnet_onnx: Path, tmp_path: Path) -> None:
    x = examples.normalize_imagenet(examples.photo_crops(4, seed=4))
    with pytest.raises(TrtbuildError, match="output-aware"):
        quantize(effnet_onnx, list(x[:, None]), tmp_path, method="output-aware", activation_type="uint8")
    assert not any(tmp_path.iterdir())


def test_map_iou() -> None:
    ref = np.zeros((3, 1, 4, 4), np.float32)
    ref[0, 0, :2] = 0.9  # 8 pixels on
    cand = ref.copy()
    cand[0, 0, 1:3] = 0.5
    cand[0, 0, 0] = 0.1  # ref is on in rows 0-1, cand in rows 1-2
    ref[1, 0, 0, 0] = 0.31
    cand[1, 0, 0, 0] = 0.29  # just below the threshold: disjoint
    # sample 0: intersection row 1 (4) / union rows 0-2 (12); sample 1: 0; sample 2: empty in both -> 1
    assert metrics.map_iou(ref, cand) == pytest.approx((4 / 12 + 0.0 + 1.0) / 3)
    assert metrics.map_iou(ref, ref) == 1.0


def _index(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    from calibrators.graph_index import GraphIndex

    return GraphIndex(model)
