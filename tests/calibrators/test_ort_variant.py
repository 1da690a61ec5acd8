"""The ORT-CPU graph's per-layer weight formats (int7, int8 for depthwise convs on CPUs whose u8 x s8
pairs saturate) and learned rounding on those grids (calibrators/ort_depthwise.py, ort_variant.py,
rounding_grid.py), on the real EfficientNet-Lite0 and real photos."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from calibrators import adaround, ort_cpu, rounding_grid
from calibrators.adaround_layers import learnable_layers
from calibrators.ort_depthwise import depthwise_weights
from calibrators.ort_variant import learn_variant_rounding
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq
from calibrators.qdq_select_ort import AFTER_FLOAT_REASON
from calibrators.quantize_settings import QuantizeSettings

FAST = adaround.AdaRoundConfig(samples=16, rows=1024, iterations=150)
AVX2 = ort_cpu.choose("x86-avx2")  # int7, depthwise int8: the same graph on every test machine


def test_int7_grid_neighbours_and_nearest_stay_within_63() -> None:
    scaled = np.array([-70.2, -62.6, -0.4, 0.5, 62.4, 62.6, 80.0], np.float32)
    below, above = rounding_grid.neighbours(scaled, "int7")
    assert below.tolist() == [-63, -63, -1, 0, 62, 62, 63] and above.tolist() == [-63, -62, 0, 1, 63, 63, 63]
    assert rounding_grid.nearest(scaled, "int7").tolist() == [-63, -63, -0.0, 0, 62, 63, 63]
    assert rounding_grid.nearest(scaled, "int8").tolist()[-1] == 80  # the int8 grid goes on to 127


def test_depthwise_convs_keep_int8_and_the_one_after_the_float_stem_stays_float(effnet_mse: tuple) -> None:
    cache, ranges, _ = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions(activation_type="uint8", **AVX2.formats()))
    depthwise = depthwise_weights(cache.model)
    assert len(depthwise) == 16  # EfficientNet-Lite0's depthwise convs
    formats = {w: q.weight_format for w, q in plan.weights.items()}
    assert {formats[w] for w in formats if w in depthwise} == {"int8"}
    assert {formats[w] for w in formats if w not in depthwise} == {"int7"}
    # The stem (3 channels) stays float, and so does the depthwise conv it feeds (one float NCHWc chain).
    first_depthwise = next(
        n.name for n in cache.model.graph.node if n.op_type == "Conv" and n.input[1] in depthwise
    )
    assert [e.node for e in plan.excluded if e.reason == AFTER_FLOAT_REASON] == [first_depthwise]
    assert first_depthwise not in plan.quantized_nodes
    graph = apply_qdq(cache, plan)
    assert AVX2.metadata()["trtbuild.depthwise_weight_format"] == "int8"
    # Depthwise int8 codes go past 63; every other weight stays 7-bit (the saturation check skips depthwise).
    assert ort_cpu.largest_weight_code(graph) <= 63 < ort_cpu.largest_weight_code(graph, skip_depthwise=False)
    # A TensorRT plan and explicit formats are unchanged: one format for every weight.
    for options in (QdqOptions(), QdqOptions(activation_type="uint8", weight_format="int7")):
        assert {w.weight_format for w in plan_qdq(cache, ranges, options).weights.values()} == {
            options.weight_format
        }


def test_variant_rounding_is_learned_on_its_own_grids(effnet_mse: tuple) -> None:
    cache, ranges, calib = effnet_mse
    options = QdqOptions(activation_type="uint8", bias_correction=False, **AVX2.formats())
    plan = plan_qdq(cache, ranges, options)
    layers = learnable_layers(cache.model, cache.graph, plan.weights)
    grids = [plan.weights[layer.weight].weight_format for layer in layers]
    names = [layer.weight for layer in layers[:3]]  # two 1x1 convs (int7), then a depthwise conv (int8)
    assert grids[:3] == ["int7", "int7", "int8"], grids[:3]
    learned = adaround.learn_rounding(cache, plan, calib, FAST, only=names)
    assert [r.weight for r in learned.layers] == names and not learned.skipped
    assert all(r.learned_error < r.nearest_error for r in learned.layers)
    for name, q in learned.decided.items():
        w = plan.weights[name]
        scaled = cache.graph.constant(name) / np.asarray(w.scales).reshape(-1, 1, 1, 1)
        qf = q.astype(np.float64)
        assert np.all(qf >= np.floor(scaled)) and np.all(qf <= np.ceil(scaled))
        assert np.abs(qf).max() <= (63 if w.weight_format == "int7" else 127)
        assert w.weight_format == "int8" or np.abs(qf).max() == 63  # the int7 scale puts max|w| at 63
    graph = apply_qdq(cache, plan_qdq(cache, ranges, replace(options, learned_rounding=learned.decided)))
    assert ort_cpu.largest_weight_code(graph) <= 63


def test_write_variant_learns_with_quantize_data(
    effnet_mse: tuple, photo_batch: np.ndarray, tmp_path: Path
) -> None:
    """learn_variant_rounding splits quantize's data as quantize did and learns the variant's grids; it does
    nothing where quantize did not learn or no data is given."""
    cache, ranges, _ = effnet_mse
    data = tmp_path / "photos.npy"
    np.save(data, photo_batch[:16])  # 8 to learn on, 8 held out
    options = QdqOptions(activation_type="uint8", **AVX2.formats())
    settings = QuantizeSettings(rounding="learned", rounding_budget_s=1.0, samples=16, threads=1)
    assert learn_variant_rounding(cache.model, ranges, options, QuantizeSettings(), 8, data) is None
    assert learn_variant_rounding(cache.model, ranges, options, settings, 8, None) is None
    learned = learn_variant_rounding(cache.model, ranges, options, settings, 8, data)
    assert learned is not None and learned.layers and learned.skipped  # 1 s: the first layer, then the budget
    first = learned.layers[0].weight
    assert first in learned.decided and np.abs(learned.decided[first]).max() <= 63  # a 1x1 conv: int7
