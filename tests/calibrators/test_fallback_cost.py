"""Cost-aware auto-fallback: layers ranked by sensitivity gain per MAC keep less compute in float than
ranking by gain alone, for the same gate, ranges and held-out photos of the real EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibrators import fallback, fallback_ranking, fidelity, layer_cost
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect, load_model, tensors_to_collect
from calibrators.fallback import LayerSensitivity
from calibrators.qdq import QdqOptions


def test_cost_order_is_gain_per_mac_with_unhelpful_layers_last() -> None:
    sens = [
        LayerSensitivity("big", "Conv", None, 0.10),  # 0.10 / 100
        LayerSensitivity("small", "Conv", None, 0.02),  # 0.02 / 1
        LayerSensitivity("mid", "Conv", None, 0.05),  # 0.05 / 10
        LayerSensitivity("hurts", "Conv", None, -0.01),
        LayerSensitivity("zero", "Conv", None, 0.0),
    ]
    costs = {"big": 100.0, "small": 1.0, "mid": 10.0, "hurts": 0.5, "zero": 0.1}
    assert fallback_ranking.order(sens, costs, "cost") == ["small", "mid", "big", "zero", "hurts"]
    assert fallback_ranking.order(sens, costs, "sensitivity") == ["big", "mid", "small", "zero", "hurts"]
    assert fallback_ranking.prune_order(["small", "big", "mid"], costs, 2) == ["big", "mid"]


@pytest.mark.slow  # two fallback searches, 15 verified candidates: ~2 min on 2 quiet cores
def test_cost_ranking_keeps_fewer_macs_float_for_the_same_gate(
    effnet_onnx: Path, photo_batch: np.ndarray
) -> None:
    model = load_model(effnet_onnx)
    calib = [{"images": photo_batch[i : i + 1]} for i in range(16)]
    held = [{"images": photo_batch[16:24]}]
    collection = collect(model, calib, tensors=tensors_to_collect(model), show_progress=False)
    ranges = compute_ranges(collection, "entropy")
    reference = fidelity.run_batches(fidelity.session(model), held)
    gate = fidelity.parse_min_fidelity(["logits:cosine=0.997"])
    results = {
        ranking: fallback.auto_fallback(
            model, ranges, QdqOptions(), held, gate, reference=reference, strategy="local", ranking=ranking
        )
        for ranking in ("sensitivity", "cost")
    }
    by_gain, by_cost = results["sensitivity"], results["cost"]
    assert by_gain.passed and by_cost.passed
    assert by_gain.baseline.outputs[0].cosine < 0.997  # the gate needs fallback at all
    assert by_cost.float_compute < by_gain.float_compute, (
        by_cost.to_json()["trials"],
        by_gain.to_json()["trials"],
    )
    # The reported share is the MACs of the layers left float (the stem and the fallback's).
    costs = layer_cost.layer_macs(model, held[0])
    assert by_cost.float_compute == pytest.approx(layer_cost.float_share(costs, by_cost.plan.quantized_nodes))
    assert by_cost.to_json()["ranking"] == "cost" and by_cost.final.outputs[0].cosine >= 0.997
