"""QDrop input mixing for learned rounding (calibrators/adaround_qdrop.py) on the real EfficientNet-Lite0."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from calibrators import adaround, adaround_qdrop
from calibrators.adaround_layers import learnable_layers
from calibrators.collect import instrument
from calibrators.qdq import QdqOptions, plan_qdq
from trtbuild.core import ort as ort_core

FAST = adaround.AdaRoundConfig(samples=16, rows=1024, iterations=150)


def test_mix_takes_the_float_share_asked_for_deterministically() -> None:
    rng = np.random.default_rng(0)
    q = [rng.normal(size=(2, 8, 16, 16)).astype(np.float32) for _ in range(2)]
    f = [v + 1.0 for v in q]
    assert all(np.array_equal(a, b) for a, b in zip(adaround_qdrop.mix(q, f, 0.0, 0, 3), q, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(adaround_qdrop.mix(q, f, 1.0, 0, 3), f, strict=True))
    half = adaround_qdrop.mix(q, f, 0.5, 0, 3)
    share = np.mean([np.mean(m == fv) for m, fv in zip(half, f, strict=True)])
    assert 0.45 < share < 0.55
    assert all(np.all((m == qv) | (m == fv)) for m, qv, fv in zip(half, q, f, strict=True))
    again = adaround_qdrop.mix(q, f, 0.5, 0, 3)
    assert all(np.array_equal(a, b) for a, b in zip(half, again, strict=True))
    assert not np.array_equal(adaround_qdrop.mix(q, f, 0.5, 1, 3)[0], half[0])  # another seed, other mask
    assert not np.array_equal(half[0] == f[0], half[1] == f[1])  # batches get their own masks


def test_float_inputs_are_the_float_graphs_values(effnet_mse: tuple) -> None:
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions())
    layers = learnable_layers(cache.model, cache.graph, plan.weights)[:8]
    wanted = [layer.activation for layer in layers if layer.activation != "images"]
    full = ort_core.cpu_session(instrument(cache.model, wanted)).run(wanted, calib[1])
    floats = adaround_qdrop.FloatInputs(cache, calib, threads=1)
    for tensor, expected in zip(wanted, full, strict=True):
        got = floats.values(tensor)
        assert len(got) == len(calib)
        np.testing.assert_allclose(got[1], expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))


def test_qdrop_learns_another_rounding_that_still_beats_nearest(effnet_mse: tuple) -> None:
    """Fitted on mixed inputs, judged on the quantized ones: a different rounding, on the grid, better than
    round-to-nearest on held-out rows."""
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False))
    names = [layer.weight for layer in learnable_layers(cache.model, cache.graph, plan.weights)[2:4]]
    plain = adaround.learn_rounding(cache, plan, calib, FAST, threads=1, only=names)
    mixed = adaround.learn_rounding(cache, plan, calib, replace(FAST, drop=0.5), threads=1, only=names)
    assert [r.weight for r in mixed.layers] == names
    assert all(r.learned_error < r.nearest_error for r in mixed.layers)
    # The first layer's judged (quantized) rows are the same, so nearest's error is too; the fit is not.
    assert mixed.layers[0].nearest_error == pytest.approx(plain.layers[0].nearest_error)
    assert any(not np.array_equal(mixed.decided[n], plain.decided[n]) for n in names)
    for name in mixed.weights:
        scaled = cache.graph.constant(name) / np.asarray(plan.weights[name].scales).reshape(-1, 1, 1, 1)
        q = mixed.weights[name].astype(np.float64)
        assert np.all(q >= np.floor(scaled)) and np.all(q <= np.ceil(scaled))
