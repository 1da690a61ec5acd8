"""Learned rounding on the FP8 E4M3 grid (calibrators/adaround.py, calibrators/rounding_grid.py) on the real
EfficientNet-Lite0 and real photos."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibrators import adaround, fp8, rounding_grid
from calibrators.adaround_layers import learnable_layers
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect, instrument
from calibrators.qdq import GraphCache, QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from calibrators.quantize import upgrade_opset
from trtbuild.core import ort as ort_core

FAST = adaround.AdaRoundConfig(samples=16, rows=1024, iterations=150)


def test_fp8_grid_neighbours_bracket_every_value() -> None:
    x = np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 60
    x = np.concatenate([x, [0.0, 448.0, -448.0, 1e-4, 3.0]]).astype(np.float32)
    lo, hi = rounding_grid.neighbours(x, "fp8")
    assert np.all(lo <= x) and np.all(x <= hi)
    assert np.array_equal(fp8.round_fp8(lo), lo) and np.array_equal(fp8.round_fp8(hi), hi)  # on the grid
    nearest = rounding_grid.nearest(x, "fp8")
    assert np.all((nearest == lo) | (nearest == hi))
    # Nothing on the grid lies between them: the next value above lo is hi (or x is on the grid).
    inside = (lo < x) & (x < hi)
    mid = (lo[inside] + hi[inside]) / 2
    assert np.all((fp8.round_fp8(mid) == lo[inside]) | (fp8.round_fp8(mid) == hi[inside]))
    lo8, hi8 = rounding_grid.neighbours(np.array([2.4, -2.4, 130.0], np.float32), "int8")
    assert lo8.tolist() == [2, -3, 127] and hi8.tolist() == [3, -2, 127]


def test_learned_fp8_rounding_beats_nearest_and_is_stored_exactly(
    effnet_onnx: Path, photo_batch: np.ndarray
) -> None:
    model = upgrade_opset(onnx.load(str(effnet_onnx)), fp8.FP8_OPSET)
    calib = [{"images": photo_batch[i : i + 8]} for i in range(0, 16, 8)]
    collection = collect(model, calib, tensors=quantizable_activations(model), show_progress=False)
    cache = GraphCache(model)
    ranges = compute_ranges(collection, "mse", grid="fp8")
    options = QdqOptions(activation_type="fp8", bias_correction=False)
    plan = plan_qdq(cache, ranges, options)
    names = [layer.weight for layer in learnable_layers(cache.model, cache.graph, plan.weights)[:3]]
    learned = adaround.learn_rounding(cache, plan, calib, FAST, only=names)
    assert [r.weight for r in learned.layers] == names and not learned.skipped
    assert all(r.learned_error < r.nearest_error for r in learned.layers)  # on rows of other images
    changed = 0.0
    for name, q in learned.weights.items():
        assert q.dtype == fp8.FP8_DTYPE
        scaled = cache.graph.constant(name) / np.asarray(plan.weights[name].scales).reshape(-1, 1, 1, 1)
        lo, hi = rounding_grid.neighbours(scaled, "fp8")
        values = q.astype(np.float32)
        assert np.all((values == lo) | (values == hi))  # one of the two E4M3 neighbours of w / s
        changed = max(changed, float(np.mean(values != fp8.round_fp8(scaled))))
    assert 0.0 < changed < 0.5  # some weights really rounded the other way

    with_learned = QdqOptions(activation_type="fp8", learned_rounding=learned.weights)
    qmodel = apply_qdq(cache, plan_qdq(cache, ranges, with_learned))
    stored = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    for name, q in learned.weights.items():
        key = next(k for k in stored if k.startswith(name) and k.endswith("_quantized"))
        assert stored[key].dtype == fp8.FP8_DTYPE and np.array_equal(stored[key], q)
    # In the graph, on held-out photos, the learned layers' outputs are closer to FP32 than nearest's.
    outs = [cache.graph.by_name[plan.weights[n].consumers[0][0]].output[0] for n in names]
    feed = {"images": photo_batch[16:]}
    reference = ort_core.cpu_session(instrument(cache.model, outs)).run(outs, feed)
    errors = []
    for weights in ({}, learned.weights):
        q_plan = plan_qdq(cache, ranges, replace(options, learned_rounding=weights))
        got = ort_core.cpu_session(instrument(apply_qdq(cache, q_plan), outs)).run(outs, feed)
        errors.append([float(np.mean((a - b) ** 2)) for a, b in zip(reference, got, strict=True)])
    assert all(lrn < near for near, lrn in zip(*errors, strict=True)), errors


@pytest.mark.parametrize("grid", ["int4", ""])
def test_unknown_grid_is_refused(grid: str) -> None:
    with pytest.raises(ValueError, match="unknown rounding grid"):
        rounding_grid.neighbours(np.zeros(3, np.float32), grid)


def test_quantize_fp8_with_learned_rounding_stores_the_learned_float8(tmp_path: Path) -> None:
    """`quantize(activation_type="fp8", rounding="learned")`: the FP8 layer's weight is learned on the E4M3
    grid and written as those float8 values; the layers FP8 keeps in FP16 are left alone."""
    from test_fp8 import _conv_net

    from calibrators.quantize import quantize

    model = tmp_path / "net.onnx"
    onnx.save(_conv_net(), str(model))
    x = np.random.default_rng(3).standard_normal((40, 3, 16, 16)).astype(np.float32)
    result = quantize(
        model,
        x,
        tmp_path / "out",
        activation_type="fp8",
        rounding="learned",
        holdout=8,
        min_fidelity="cosine=0.9",
        show_progress=False,
    )
    assert result.rounding is not None and [r.weight for r in result.rounding.layers] == ["w/pw"]
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(result.onnx_path)).graph.initializer}
    q = result.rounding.decided["w/pw"]
    key = next(k for k in stored if k.endswith("_quantized") and "pw" in k)
    assert stored[key].dtype == fp8.FP8_DTYPE and np.array_equal(stored[key], q)
    assert result.plan.weights["w/pw"].bias_shift is None  # learned: no bias correction on top
