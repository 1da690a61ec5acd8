"""Learned weight rounding (calibrators/adaround.py) on the real EfficientNet-Lite0 and real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibrators import adaround
from calibrators.adaround_layers import learnable_layers
from calibrators.adaround_prefix import PrefixRunner
from calibrators.collect import instrument
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq
from calibrators.quantize import quantize
from trtbuild.core import ort as ort_core

FAST = adaround.AdaRoundConfig(samples=16, rows=1024, iterations=150)


def test_layer_rows_reproduce_the_onnx_layer(effnet_mse: tuple, photo_batch: np.ndarray) -> None:
    """The grouped-matrix view of every Conv/Gemm (pads, strides, depthwise groups) computes what ORT does."""
    cache, ranges, _ = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions())
    layers = learnable_layers(cache.model, cache.graph, plan.weights)
    assert {layer.op_type for layer in layers} == {"Conv", "Gemm"} and len(layers) > 40
    wanted = [t for layer in layers for t in (layer.activation, cache.graph.by_name[layer.node].output[0])]
    wanted = [t for t in dict.fromkeys(wanted) if t != "images"]
    x = photo_batch[:2]
    ran = ort_core.cpu_session(instrument(cache.model, wanted)).run(wanted, {"images": x})
    values = dict(zip(wanted, ran, strict=True))
    values["images"] = x
    for i, layer in enumerate(layers):
        node = cache.graph.by_name[layer.node]
        rows = layer.rows(values[layer.activation], 5, np.random.default_rng(i))
        w = layer.to_matrix(cache.graph.constant(layer.weight).astype(np.float32))
        got = np.einsum("rgi,goi->rgo", rows, w).reshape(rows.shape[0], -1) + cache.graph.constant(
            node.input[2]
        )
        y = values[node.output[0]]
        rng = np.random.default_rng(i)  # the same positions rows() drew
        if layer.op_type == "Conv":
            flat = y.reshape(y.shape[0], y.shape[1], -1)
            pos = np.stack([rng.choice(flat.shape[2], min(5, flat.shape[2]), replace=False) for _ in flat])
            y = np.take_along_axis(flat, pos[:, None, :], 2).transpose(0, 2, 1)
        y = y.reshape(-1, got.shape[1])
        assert np.abs(got - y).max() <= 1e-4 * np.abs(y).max(), layer.node
        assert np.array_equal(layer.from_matrix(w), cache.graph.constant(layer.weight))


def test_learned_rounding_beats_nearest_and_stays_on_the_grid(
    effnet_mse: tuple, photo_batch: np.ndarray
) -> None:
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False))
    names = [layer.weight for layer in learnable_layers(cache.model, cache.graph, plan.weights)[:3]]
    learned = adaround.learn_rounding(cache, plan, calib, FAST, only=names)
    assert [r.weight for r in learned.layers] == names and not learned.skipped
    assert all(r.learned_error < r.nearest_error for r in learned.layers)  # on rows of other images
    for name in learned.weights:
        q = learned.weights[name].astype(np.float64)
        scaled = cache.graph.constant(name) / np.asarray(plan.weights[name].scales).reshape(-1, 1, 1, 1)
        assert np.all(q >= np.floor(scaled)) and np.all(q <= np.ceil(scaled))
        assert 0.0 < np.mean(q != np.rint(scaled)) < 0.5  # some weights really rounded the other way

    # In the graph, on held-out photos: the learned layers' outputs are closer to FP32 than nearest's.
    outs = [
        cache.graph.by_name[layer.node].output[0]
        for layer in learnable_layers(cache.model, cache.graph, {n: plan.weights[n] for n in names})
    ]
    feed = {"images": photo_batch[16:]}
    fp = ort_core.cpu_session(instrument(cache.model, outs)).run(outs, feed)
    errors = []
    for weights in ({}, learned.weights):
        q_plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False, learned_rounding=weights))
        got = ort_core.cpu_session(instrument(apply_qdq(cache, q_plan), outs)).run(outs, feed)
        errors.append([float(np.mean((a - b) ** 2)) for a, b in zip(fp, got, strict=True)])
    assert all(lrn < near for near, lrn in zip(*errors, strict=True))

    again = adaround.learn_rounding(cache, plan, calib, FAST, only=names)
    assert sorted(again.weights) == sorted(learned.weights)
    assert all(np.array_equal(again.weights[n], learned.weights[n]) for n in learned.weights)
    other = adaround.learn_rounding(
        cache, plan, calib, adaround.AdaRoundConfig(**{**FAST.__dict__, "seed": 1}), only=names[:1]
    )
    assert other.layers[0].learned_error < other.layers[0].nearest_error


def test_quantize_learned_rounding_end_to_end(
    effnet_onnx: Path, photo_batch: np.ndarray, tmp_path: Path
) -> None:
    """`quantize(rounding="learned")` stores the learned integers, reports them, and stays in its budget."""
    data = tmp_path / "photos.npy"
    np.save(data, photo_batch[:24])
    result = quantize(
        effnet_onnx,
        data,
        tmp_path / "out",
        holdout=8,
        min_fidelity="top1=0.5",
        rounding="learned",
        rounding_budget_s=3.0,
        show_progress=False,
    )
    assert result.rounding is not None and result.rounding.layers  # the first layer always runs
    assert result.rounding.seconds < 3.0 + 120.0  # the budget stops it (after the layer under way)
    assert result.rounding.skipped  # 3 s is not enough for every layer: the budget was used
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(result.onnx_path)).graph.initializer}
    for name, q in result.rounding.weights.items():
        assert np.array_equal(stored[f"{name}_quantized"], q)
    report = json.loads(result.report_path.read_text())
    # the learned graph was also measured end to end against round-to-nearest on the held-out photos
    scores = report["learned_rounding"]["end_to_end"]
    kept = report["learned_rounding"]["end_to_end_kept"]
    assert set(scores) == {"learned", "nearest"} and (kept or scores["nearest"] < scores["learned"])
    if not result.rounding.end_to_end_kept:
        assert report["rounding"] == "nearest" and not result.plan.rounded_weights
        return
    assert report["rounding"] == "learned"
    assert sorted(report["plan"]["learned_rounding"]) == sorted(result.rounding.decided)
    # Bias correction stays off where the learning decided the rounding, on where it ran out of time.
    assert report["learned_rounding"]["bias_correction_off"] == sorted(result.rounding.decided)
    weights = result.plan.weights
    assert all(weights[n].bias_shift is None for n in result.rounding.decided)
    assert any(weights[n].bias_shift is not None for n in result.rounding.skipped)


def test_unknown_rounding_is_refused_before_any_work(effnet_onnx: Path, tmp_path: Path) -> None:
    from trtbuild.core.errors import TrtbuildError

    with pytest.raises(TrtbuildError, match="unknown rounding 'up'"):
        quantize(effnet_onnx, tmp_path / "missing", tmp_path / "out", rounding="up", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_incremental_prefix_gives_the_full_graphs_values(effnet_mse: tuple) -> None:
    """Layer after layer, the frontier cache yields exactly what running the quantized graph from the
    images does, and holds only a few tensors (memory does not grow with the depth)."""
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False))
    qmodel = apply_qdq(cache, plan)
    by_name = {n.name: n for n in qmodel.graph.node}
    layers = learnable_layers(cache.model, cache.graph, plan.weights)[:12]
    tensors = [by_name[layer.node].input[0] for layer in layers]
    full = ort_core.cpu_session(instrument(qmodel, tensors)).run(tensors, calib[0])
    runner = PrefixRunner(calib, threads=None)
    largest = 0
    for t, expected in zip(tensors, full, strict=True):
        got = runner.run(qmodel, [t])
        assert len(got) == len(calib)
        np.testing.assert_allclose(got[0][t], expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))
        largest = max(largest, len(runner.cache[0]))
    assert largest <= 4


def test_learning_does_not_depend_on_the_thread_count(effnet_mse: tuple) -> None:
    cache, ranges, calib = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False))
    names = [layer.weight for layer in learnable_layers(cache.model, cache.graph, plan.weights)[1:3]]
    config = adaround.AdaRoundConfig(samples=8, rows=512, iterations=60)
    one = adaround.learn_rounding(cache, plan, calib, config, threads=1, only=names)
    two = adaround.learn_rounding(cache, plan, calib, config, threads=2, only=names)
    assert sorted(one.decided) == sorted(two.decided) == sorted(names)
    assert all(np.array_equal(one.decided[n], two.decided[n]) for n in names)


def test_closed_form_gradient_is_the_direct_one(effnet_mse: tuple, photo_batch: np.ndarray) -> None:
    """The Gram-matrix gradient (fewer inputs than rows) equals the one from the rows themselves."""
    import torch

    cache, ranges, _ = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions())
    layer = next(x for x in learnable_layers(cache.model, cache.graph, plan.weights) if x.groups == 1)
    (act,) = ort_core.cpu_session(instrument(cache.model, [layer.activation])).run(
        [layer.activation], {"images": photo_batch[:4]}
    )
    rows = layer.rows(act, 64, np.random.default_rng(0))  # [256, 1, I]: real activations
    w = layer.to_matrix(cache.graph.constant(layer.weight).astype(np.float32))
    x = torch.from_numpy(np.ascontiguousarray(rows.transpose(1, 0, 2)))
    y = torch.from_numpy(np.einsum("gri,goi->gro", rows.transpose(1, 0, 2), w).astype(np.float32))
    w_q = torch.from_numpy(np.round(w * 8) / 8)  # some other weight: a non-zero gradient
    w_q.requires_grad_(True)
    ((torch.bmm(x, w_q.transpose(1, 2)) - y) ** 2).sum(dim=(0, 2)).mean().backward()
    assert x.shape[2] < x.shape[1]  # the Gram branch
    got = adaround._recon_gradient(x, y)(w_q.detach())
    torch.testing.assert_close(got, w_q.grad, rtol=1e-4, atol=1e-5 * float(w_q.grad.abs().max()))


def test_the_budget_stops_a_layer_mid_way(effnet_mse: tuple, photo_batch: np.ndarray) -> None:
    """A deadline that has passed stops a layer's steps (the budget is a bound on the run, not a check
    between layers only); without one the same layer is learned."""

    cache, ranges, _ = effnet_mse
    plan = plan_qdq(cache, ranges, QdqOptions())
    layer = next(x for x in learnable_layers(cache.model, cache.graph, plan.weights) if x.groups == 1)
    (act,) = ort_core.cpu_session(instrument(cache.model, [layer.activation])).run(
        [layer.activation], {"images": photo_batch[:4]}
    )
    rows = layer.rows(act, 64, np.random.default_rng(0))
    w = cache.graph.constant(layer.weight).astype(np.float32)
    target = np.einsum("rgi,goi->rgo", rows, layer.to_matrix(w)).astype(np.float32)
    scales = np.asarray(plan.weights[layer.weight].scales, np.float32)
    args = (layer, w, scales, rows, target, FAST)
    assert adaround._learn_layer(*args, deadline=adaround.budget_clock() - 1) is None
    learned = adaround._learn_layer(*args, deadline=None)
    assert learned is not None and learned[0].shape == w.shape


def test_nearest_is_kept_when_the_learned_graph_measures_worse(
    effnet_mse: tuple, photo_batch: np.ndarray
) -> None:
    """The end-to-end check after learning (calibrators/quantize.py `_nearest_if_better`): a rounding that
    went wrong -- every conv weight rounded the other way -- loses to round-to-nearest on held-out photos,
    so nearest is kept and the scores of both are recorded; a learned graph that is not worse is kept."""
    from dataclasses import replace

    from calibrators import fidelity
    from calibrators.quantize import _nearest_if_better

    cache, ranges, _ = effnet_mse
    options = QdqOptions()
    plan = plan_qdq(cache, ranges, options)
    wrong = {}
    for layer in learnable_layers(cache.model, cache.graph, plan.weights):
        if layer.op_type != "Conv":
            continue
        w = cache.graph.constant(layer.weight)
        scaled = w / np.asarray(plan.weights[layer.weight].scales).reshape(-1, 1, 1, 1)
        other_way = np.where(np.rint(scaled) == np.floor(scaled), np.ceil(scaled), np.floor(scaled))
        wrong[layer.weight] = np.clip(other_way, -127, 127).astype(np.int8)
    held = [{"images": photo_batch[16:24]}]
    reference = fidelity.run_batches(fidelity.session(cache.model, 1), held)
    kinds = fidelity.decide_kinds(cache.model, reference)
    gate = fidelity.parse_min_fidelity("cosine=0")

    def measured(learned_rounding: dict[str, np.ndarray] | None) -> fidelity.FidelityReport:
        qmodel = apply_qdq(
            cache, plan_qdq(cache, ranges, replace(options, learned_rounding=learned_rounding))
        )
        test = fidelity.run_batches(fidelity.session(qmodel, 1, ort_core.REFERENCE), held)
        return fidelity.compare(reference, test, gate, kinds, ort_core.REFERENCE)

    bad = adaround.LearnedRounding(weights=wrong, decided=wrong)
    bad_report = measured(wrong)
    chosen = _nearest_if_better(cache.model, ranges, options, bad, bad_report, held, reference, kinds, 1)
    assert chosen is not None and not bad.end_to_end_kept
    assert chosen[2].score() == bad.end_to_end["nearest"] < bad.end_to_end["learned"] == bad_report.score()
    assert not chosen[0].rounded_weights  # the plan kept is round-to-nearest, with its bias correction
    same = adaround.LearnedRounding()
    assert (
        _nearest_if_better(cache.model, ranges, options, same, measured(None), held, reference, kinds, 1)
        is None
    )
    assert same.end_to_end_kept and same.end_to_end["learned"] == same.end_to_end["nearest"]
