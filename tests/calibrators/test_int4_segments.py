"""awq-gptq's segment runner (calibrators/int4/segments.py) on MiniLM-L6: each group's inputs from the
partly quantized model, one forward pass in all, equal to a full pass of that model per group."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_quantize_models import build_minilm_onnx

from calibrators.collect import load_model
from calibrators.data import model_inputs, open_data
from calibrators.int4 import ridge, sequential
from calibrators.int4.blocks import quantize_blocks
from calibrators.int4.graph import find_layers, weight_kn
from calibrators.int4.pipeline import collect_inputs
from calibrators.int4.segments import SegmentRunner
from calibrators.qdq import ensure_node_names


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    path, samples = build_minilm_onnx(tmp_path_factory.mktemp("minilm_segments"))
    return ensure_node_names(load_model(path)), samples


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return copy


def test_segments_equal_full_passes_of_the_partly_quantized_model(
    minilm: tuple[onnx.ModelProto, list[dict[str, np.ndarray]]],
) -> None:
    model, samples = minilm
    calib = open_data(samples, model_inputs(model), None)
    layers = find_layers(model, ())
    activations = list(dict.fromkeys(layer.activation for layer in layers))
    runner = SegmentRunner(model, calib.batches(4), None, 0)
    assert [runner.position(a) for a in activations] == sorted(runner.position(a) for a in activations)
    weights: dict[str, np.ndarray] = {}
    checked = 0
    for index, activation in enumerate(activations):
        rows = runner.rows(activation, weights)
        if index % 5 == 0 or index == len(activations) - 1:  # a full pass per check: a sample of groups
            full = collect_inputs(_with_weights(model, weights), [activation], calib, 4, None, 0)[0]
            np.testing.assert_allclose(rows, full[activation], rtol=1e-4, atol=1e-4)
            checked += 1
        for layer in (layer for layer in layers if layer.activation == activation):
            quant = quantize_blocks(weight_kn(model, layer), 64)
            weights[layer.weight] = sequential.stored_weight(layer, quant, None)
    assert checked >= 4
    # the quantized prefix really changed the later inputs (the check above is not comparing FP32 twice)
    fp32 = collect_inputs(model, [activations[-1]], calib, 4, None, 0)[0][activations[-1]]
    assert not np.allclose(rows, fp32, atol=1e-3)
    with pytest.raises(ValueError, match="graph order"):
        runner.rows(activations[0], weights)


def test_fit_group_error_from_grams_matches_the_rows(
    minilm: tuple[onnx.ModelProto, list[dict[str, np.ndarray]]],
) -> None:
    model, samples = minilm
    calib = open_data(samples, model_inputs(model), None)
    layers = find_layers(model, ())
    first = layers[0].activation
    xf = collect_inputs(model, [first], calib, 4, None, 0)[0][first]
    xq = xf + np.random.default_rng(0).normal(0, 0.05, xf.shape).astype(np.float32)
    weights = [weight_kn(model, layer) for layer in layers if layer.activation == first]
    result = sequential.fit_group(xf, xq, weights, 64)
    direct = sum(
        float(np.sum((xq.astype(np.float64) @ (q.dequantized() / result.scale[:, None]) - xf @ w) ** 2))
        for q, w in zip(result.quants, weights, strict=True)
    )
    assert result.error == pytest.approx(direct, rel=1e-3)


def test_ridge_is_chosen_on_held_out_rows(
    minilm: tuple[onnx.ModelProto, list[dict[str, np.ndarray]]],
) -> None:
    """A systematic input error (each channel scaled) is worth correcting; pure noise on too few rows is
    not: the least-squares correction would fit it, so W itself (no ridge) is kept."""
    model, samples = minilm
    calib = open_data(samples, model_inputs(model), None)
    layer = find_layers(model, ())[-1]  # the FFN's second MatMul: 1536 inputs, fewer rows than that
    xf = collect_inputs(model, [layer.activation], calib, 4, None, 0)[0][layer.activation]
    w = weight_kn(model, layer).astype(np.float64)
    assert len(xf) < w.shape[0]
    rng = np.random.default_rng(0)
    scaled = xf * np.asarray(rng.uniform(0.8, 1.2, xf.shape[1]), np.float32)
    assert ridge.choose_ridge(scaled, xf, ridge.grams(scaled, xf), w) == ridge.RIDGES[0]
    noisy = xf + rng.normal(0, float(xf.std()), xf.shape).astype(np.float32)
    assert ridge.choose_ridge(noisy, xf, ridge.grams(noisy, xf), w) != ridge.RIDGES[0]
