"""Output-weighted learned rounding (calibrators/adaround_fisher.py) and the torch evaluator of ONNX graphs
it differentiates (calibrators/onnx_torch.py), on the real EfficientNet-Lite0 and real photos."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from calibrators import adaround, adaround_fisher, onnx_torch
from calibrators.adaround_layers import learnable_layers
from calibrators.collect import instrument
from calibrators.qdq import QdqOptions, plan_qdq
from trtbuild.core import ort as ort_core


def test_torch_evaluator_computes_what_ort_does(effnet_mse: tuple, photo_batch: np.ndarray) -> None:
    """The TorchScript export's "same" padding (Shape/Slice/Concat/Pad arithmetic), convs and head, in
    torch: the logits and an inner conv output equal ORT's."""
    cache, _, _ = effnet_mse
    inner = next(n for n in cache.model.graph.node if n.op_type == "Conv" and "_blocks.5" in n.name)
    x = photo_batch[:2]
    names = ["logits", inner.output[0]]
    want = [
        ort_core.cpu_session(m).run([name], {"images": x})[0]
        for m, name in ((cache.model, names[0]), (instrument(cache.model, names[1:]), names[1]))
    ]
    got = onnx_torch.run(cache.model, {"images": torch.from_numpy(x)}, [inner.output[0]])
    for expected, name in zip(want, names, strict=True):
        value = got[name].detach().numpy()
        assert value.shape == expected.shape
        assert np.abs(value - expected).max() <= 1e-4 * np.abs(expected).max(), name


def test_fisher_weights_follow_the_likely_classes(effnet_mse: tuple) -> None:
    """On the classifier (its output is the logits) the softmax Fisher p (1 - p) puts the weight on the
    classes the FP32 model finds likely: the predicted classes weigh far more than the median class. Per
    layer the weights have mean 1 and are the same for the same seed."""
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions())
    layers = learnable_layers(cache.model, cache.graph, plan.weights)
    fc = [layers[0], layers[-1]]
    weights = adaround_fisher.channel_weights(cache.model, fc, calib[:1], seed=3)
    assert weights is not None and set(weights) == {layer.weight for layer in fc}
    for layer in fc:
        w = weights[layer.weight]
        assert w.shape == (layer.groups, layer.shape[0] // layer.groups)
        assert np.isclose(w.mean(), 1.0, rtol=1e-4) and np.all(w >= 0)
    logits = ort_core.cpu_session(cache.model).run(None, calib[0])[0]
    classifier = weights[layers[-1].weight][0]
    assert classifier[np.unique(logits.argmax(1))].mean() > 20 * np.median(classifier)
    again = adaround_fisher.channel_weights(cache.model, fc[1:], calib[:1], seed=3)
    assert again is not None and np.array_equal(again[layers[-1].weight][0], classifier)


def test_output_weighted_learning_still_beats_nearest(effnet_mse: tuple) -> None:
    """With output weights the learning picks other integers, and each kept layer's weighted error on
    held-out rows (other images) is below round-to-nearest's."""
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False))
    names = [layer.weight for layer in learnable_layers(cache.model, cache.graph, plan.weights)[1:3]]
    config = adaround.AdaRoundConfig(samples=8, rows=512)
    plain = adaround.learn_rounding(cache, plan, calib, config, only=names)
    weighted = adaround.learn_rounding(cache, plan, calib, replace(config, output_weight=1.0), only=names)
    assert [r.weight for r in weighted.layers] == names
    assert all(r.learned_error < r.nearest_error for r in weighted.layers)
    assert any(not np.array_equal(plain.weights[n], weighted.weights[n]) for n in names)


def test_an_op_the_evaluator_lacks_leaves_learning_unweighted(caplog: pytest.LogCaptureFixture) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="erf")], "g", [x], [y])
    )
    with caplog.at_level(logging.WARNING):
        assert adaround_fisher.channel_weights(model, [], [{"x": np.zeros((2, 3), np.float32)}]) is None
    assert "Erf" in caplog.text
