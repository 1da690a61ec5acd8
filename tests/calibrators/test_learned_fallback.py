"""Auto-fallback with learned rounding (calibrators/learned_fallback.py) on the real EfficientNet-Lite0 and
real photos: the float layers are decided with round-to-nearest, the rounding is learned for that graph,
and float layers go back to INT8 while the gate still passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators import adaround, fidelity, layer_cost, learned_fallback
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect, load_model, tensors_to_collect
from calibrators.qdq import QdqOptions
from trtbuild.core import ort as ort_core

# Smaller than the defaults, so the test stays near a minute; the mechanism is the same.
FAST = adaround.AdaRoundConfig(samples=8, rows=512, iterations=60)


@pytest.mark.slow  # one nearest fallback search, one learning pass, a few single-layer ones: ~1-2 min
def test_learned_rounding_after_the_nearest_fallback_needs_no_more_float_layers(
    effnet_onnx: Path, photo_batch: np.ndarray
) -> None:
    model = load_model(effnet_onnx)
    calib = [{"images": photo_batch[i : i + 4]} for i in range(0, 16, 4)]
    held = [{"images": photo_batch[16:32]}]
    collection = collect(model, calib, tensors=tensors_to_collect(model), show_progress=False)
    ranges = compute_ranges(collection, "entropy")
    reference = fidelity.run_batches(fidelity.session(model), held)
    gate = fidelity.parse_min_fidelity(["logits:cosine=0.997"])
    kinds = fidelity.decide_kinds(model, reference)
    result = learned_fallback.learned_fallback(
        model,
        ranges,
        QdqOptions(),
        calib,
        held,
        gate,
        FAST,
        reference=reference,
        kinds=kinds,
        semantics=ort_core.REFERENCE,
        fallback_args={"strategy": "local"},
    )
    fb = result.fallback
    assert result.nearest_float  # round-to-nearest needed float layers for this gate
    assert result.used_learned and result.rounding is not None, fb.trials
    assert fb.passed and fb.final.outputs[0].cosine >= 0.997
    # Learning for the final graph never needs more float layers than nearest did; the ones it put back
    # are exactly the ones missing.
    assert set(fb.kept_float) <= set(result.nearest_float)
    assert sorted(set(result.nearest_float) - set(fb.kept_float)) == sorted(result.restored)
    assert not set(fb.kept_float) & set(fb.plan.quantized_nodes)
    # The plan carries the learned integers of its INT8 layers only, and the model is that plan.
    assert fb.plan.rounded_weights and set(fb.plan.rounded_weights) == set(result.rounding.decided)
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in fb.model.graph.initializer}
    for name, q in fb.plan.rounded_weights.items():
        assert np.array_equal(stored[f"{name}_quantized"], q)
    # The reported fidelity and compute share are those of the returned model, measured again here.
    again = fidelity.compare(
        reference,
        fidelity.run_batches(fidelity.session(fb.model, semantics=ort_core.REFERENCE), held),
        gate,
        kinds,
        ort_core.REFERENCE,
    )
    assert again.outputs[0].cosine == pytest.approx(fb.final.outputs[0].cosine, abs=1e-6)
    costs = layer_cost.layer_macs(model, held[0])
    assert fb.float_compute == pytest.approx(layer_cost.float_share(costs, fb.plan.quantized_nodes))
    assert any("learned_rounding" in t for t in fb.trials)
