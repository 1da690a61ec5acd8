"""Block reconstruction with learned activation steps (calibrators/block_recon.py, act_step.py) on the real
EfficientNet-Lite0 and real photos."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibrators import act_step, adaround, block_recon, cache, fidelity
from calibrators.qdq import GraphCache, QdqOptions, apply_qdq, plan_qdq
from calibrators.ranges import RangeSet
from trtbuild.core import ort as ort_core

# A few steps on two blocks: what is tested is the wiring, not the accuracy (bench/bench_int8_accuracy.py)
TINY = block_recon.BlockConfig(samples=16, check=4, iterations=12, batch=4, worst=2, budget_s=120.0)


@pytest.fixture(scope="module")
def setup(effnet_mse: tuple) -> tuple[GraphCache, RangeSet, QdqOptions, list[dict[str, np.ndarray]]]:
    graph, ranges, calib = effnet_mse
    # The warm start: layer-wise learned rounding of the first layers (a few steps: fast)
    plan = plan_qdq(graph, ranges, QdqOptions(bias_correction=False))
    config = adaround.AdaRoundConfig(samples=8, rows=256, iterations=10)
    learned = adaround.learn_rounding(graph, plan, calib, config, only=list(plan.weights)[:12])
    return graph, ranges, QdqOptions(learned_rounding=learned.decided), calib


def test_blocks_are_the_mbconv_blocks_and_run_as_the_qdq_graph(setup: tuple, photo_batch: np.ndarray) -> None:
    """The cut points are the MBConv blocks' outputs; the blocks run in torch reproduce the written Q/DQ
    graph (reference semantics) and the float graph."""
    graph, ranges, options, _ = setup
    plan = plan_qdq(graph, ranges, options)
    qmodel = apply_qdq(graph, plan)
    blocks = block_recon.find_blocks(graph.model, qmodel, plan)
    ends = [b.end for b in blocks]
    convs = [n for n in graph.model.graph.node if n.op_type == "Conv"]
    assert len(blocks) >= 16 and ends[-1] == "logits"
    for b in blocks:
        producer = graph.graph.producer[b.end].op_type
        assert producer in ("Conv", "Add", "GlobalAveragePool", "Gemm", "Reshape", "Flatten"), b.end
        assert len(b.weights) <= 3  # expand, depthwise, project
    # every activation Q/DQ of its own (no shared group) is learnable in exactly one block
    steps = [t for b in blocks for t in b.steps.values()]
    groups = [a.group for a in plan.activations.values()]
    own = {k for k, a in plan.activations.items() if groups.count(a.group) == 1}
    assert len(steps) == len(set(steps)) and set(steps) == own and len(own) > len(convs) // 2
    x = torch.from_numpy(photo_batch[:4])
    meta = block_recon._Meta(graph.model, blocks, x)
    assert meta.fixed  # the shape arithmetic reads the rank / batch only: crops are allowed
    q = f = x
    with torch.no_grad():
        for b in blocks:
            q = block_recon._Evaluator(qmodel, b.qnodes, meta)(q, b.start, {}, {})
            f = block_recon._Evaluator(graph.model, b.fnodes, meta)(f, b.start, {}, {})
    feed = [{"images": photo_batch[:4]}]
    ort_q = fidelity.run_batches(fidelity.session(qmodel, 1), feed)["logits"]
    ort_f = fidelity.run_batches(fidelity.session(graph.model, 1), feed)["logits"]
    assert np.allclose(f.numpy(), ort_f, atol=1e-3)
    # Not bit-exact: torch's and ORT's convs sum in another order (~4e-5 apart), which flips a few roundings
    # at the next Q/DQ, and those flips cascade (measured: cosine 0.9988-0.9994 on these crops)
    mine = q.numpy()
    cos = np.sum(mine * ort_q, 1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(ort_q, axis=1)
    assert cos.min() > 0.995 and np.mean(mine.argmax(1) == ort_q.argmax(1)) >= 0.75


def test_learned_steps_are_what_every_artifact_carries(setup: tuple) -> None:
    """The learned steps become ranges (amax = 127 * step): the Q/DQ graph's scales, the calibration cache
    and ranges.json all carry exactly them; kept blocks measured better; the same seed, the same graph."""
    graph, ranges, options, calib = setup
    result = block_recon.reconstruct(graph, ranges, options, calib, TINY)
    assert result.unsupported is None and result.blocks and len(result.blocks) <= (TINY.worst or 0)
    for b in result.blocks:
        assert (b.error_after < b.error_before) == b.kept
    assert result.scales or not any(b.kept for b in result.blocks)
    stepped = act_step.with_scales(ranges, result.scales)
    plan = plan_qdq(graph, stepped, block_recon.options_after(options, result))
    qmodel = apply_qdq(graph, plan)
    stored = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    text = cache.cache_text(stepped)
    for tensor, step in result.scales.items():
        assert np.float32(plan.activations[tensor].scale) == np.float32(step)
        assert stored[f"{tensor}_scale"] == np.float32(step)
        assert f"{tensor}: {cache.scale_hex(step)}" in text
        assert RangeSet.from_json(stepped.to_json())[tensor].amax == stepped[tensor].amax
    for name, q in result.weights.items():
        assert np.array_equal(stored[f"{name}_quantized"], q)
        assert np.abs(q.astype(np.int16) - options.learned_rounding[name].astype(np.int16)).max() <= 1
    again = block_recon.reconstruct(graph, ranges, options, calib, TINY)
    assert again.scales == result.scales
    assert all(np.array_equal(again.weights[k], v) for k, v in result.weights.items())


def test_block_reconstruction_lowers_the_held_out_output_error(setup: tuple, photo_batch: np.ndarray) -> None:
    """On photos it never saw (neither fitted nor checked on), the graph with the blocks' learned steps and
    rounding is closer to FP32 than the layer-wise learned graph it started from."""
    graph, ranges, options, calib = setup
    config = replace(TINY, iterations=40)
    result = block_recon.reconstruct(graph, ranges, options, calib, config)
    assert any(b.kept for b in result.blocks), result.blocks
    held = [{"images": photo_batch[16:32]}]
    reference = fidelity.run_batches(fidelity.session(graph.model, 1), held)["logits"]

    def error(model: onnx.ModelProto) -> float:
        out = fidelity.run_batches(fidelity.session(model, 1, ort_core.REFERENCE), held)["logits"]
        return float(((out - reference) ** 2).mean())

    layer_wise = apply_qdq(graph, plan_qdq(graph, ranges, options))
    stepped = act_step.with_scales(ranges, result.scales)
    blocked = apply_qdq(graph, plan_qdq(graph, stepped, block_recon.options_after(options, result)))
    assert error(blocked) < error(layer_wise)


def test_a_fixed_batch_one_export_runs_sample_by_sample(
    effnet_model: torch.nn.Module, setup: tuple, tmp_path: Path
) -> None:
    """A fixed-batch-1 export (its final Reshape takes one sample) learns through blocks run sample by
    sample, as the dynamic-batch export of the same network learns batched; a fixed batch of 2 is refused
    (result.unsupported), not a traceback."""
    graph, ranges, learned, calib = setup
    # round-to-nearest on both: TorchScript names the folded weights differently in each export
    options = replace(learned, learned_rounding=None)
    fixed: dict[int, GraphCache] = {}
    for batch in (1, 2):
        path = tmp_path / f"static{batch}.onnx"
        torch.onnx.export(
            effnet_model,
            (torch.zeros(batch, 3, 224, 224),),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
        )
        fixed[batch] = GraphCache(onnx.load(str(path)))
        assert block_recon.static_batch(fixed[batch].model) == batch
    assert block_recon.static_batch(graph.model) is None
    ones = [{"images": b["images"][i : i + 1]} for b in calib for i in range(len(b["images"]))]
    config = replace(TINY, worst=1)
    result = block_recon.reconstruct(fixed[1], ranges, options, ones, config)
    dynamic = block_recon.reconstruct(graph, ranges, options, calib, config)
    assert result.unsupported is None and len(result.blocks) == 1
    # the same block, about the same start and end error (the same crops and steps); not equal: a batch of
    # 1 sums convolutions in another order, which flips a few roundings at the Q/DQs before (measured 1e-3)
    (one,), (many,) = result.blocks, dynamic.blocks
    assert one.end == many.end and one.steps == many.steps, (one, many)
    assert one.error_before == pytest.approx(many.error_before, rel=1e-2), (one, many)
    assert one.error_after == pytest.approx(many.error_after, rel=1e-2), (one, many)
    refused = block_recon.reconstruct(fixed[2], ranges, options, calib, config)
    assert refused.unsupported == "a fixed batch of 2" and not refused.blocks
