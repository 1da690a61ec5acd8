"""Data-aware 2:4 pruning (trtbuild/qat/prune_fit.py): the pattern runs along the input channels, and the
pruned model keeps far more fidelity before any recovery training than a magnitude prune does."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from qat_models import tiny_data, tiny_net

from calibrators.sparsity import analyze, is_2to4
from trtbuild.qat.prune import mask_2to4, plan_pruning
from trtbuild.qat.prune_fit import prune_fitted


def _top1_and_error(
    model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor
) -> tuple[float, float]:
    with torch.no_grad():
        ref, out = reference(x), model(x)
    top1 = float((out.argmax(1) == ref.argmax(1)).float().mean())
    return top1, float(((out - ref) ** 2).mean() / (ref**2).mean())


def _magnitude_pruned(model: torch.nn.Module) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for d in plan_pruning(pruned):
            if d.reason is None:
                modules[d.module].weight.mul_(mask_2to4(modules[d.module].weight))
    return pruned


def test_fitted_prune_is_2to4_on_input_channels_and_beats_magnitude(tmp_path: Path) -> None:
    model = tiny_net()
    x = torch.from_numpy(tiny_data(64, seed=3))
    fit, held = x[:32], x[32:]
    pruned = copy.deepcopy(model)
    decisions = plan_pruning(pruned)
    masks = prune_fitted(pruned, model, decisions, [[fit[:16]], [fit[16:]]])
    assert set(masks) == {d.module for d in decisions if d.reason is None} == {"pw.0", "expand", "head"}
    for name, mask in masks.items():
        assert float(mask.mean()) == 0.5, name
    # The exported graph is 2:4 along the reduction axis TensorRT checks (Conv axis 1, Gemm transB axis 1)
    # and not along the output axis: the groups run over input channels.
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(pruned, (x[:1],), str(path), input_names=["x"], dynamo=False)
    graph = onnx.load(str(path))
    report = analyze(graph)
    assert len(report.sparse) == len(report.eligible) == 3
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    conv = next(n for n in graph.graph.node if n.op_type == "Conv" and weights[n.input[1]].shape[1] == 32)
    assert is_2to4(weights[conv.input[1]], 1) and not is_2to4(weights[conv.input[1]], 0)
    # Before any training: the re-fit keeps the outputs far closer to the original than magnitude masks.
    fitted_top1, fitted_err = _top1_and_error(pruned, model, held)
    magnitude_top1, magnitude_err = _top1_and_error(_magnitude_pruned(model), model, held)
    assert fitted_err < 0.5 * magnitude_err
    assert fitted_top1 >= magnitude_top1 and fitted_top1 >= 0.5  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_effnet_fitted_prune_keeps_fidelity_before_recovery(
    effnet_model: torch.nn.Module, photo_batch: np.ndarray
) -> None:
    """Every eligible layer of EfficientNet-Lite0 (classifier included) pruned to 2:4: top-1 agreement far
    above chance (1/1000) before recovery training, where magnitude masks leave almost nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(photo_batch)
        fit, held = x[:16], x[16:]
        pruned = copy.deepcopy(effnet_model)
        masks = prune_fitted(pruned, effnet_model, plan_pruning(pruned), [[fit[:8]], [fit[8:]]])
        assert len(masks) == 33
        fitted_top1, _ = _top1_and_error(pruned, effnet_model, held)
        magnitude_top1, _ = _top1_and_error(_magnitude_pruned(effnet_model), effnet_model, held)
    finally:
        torch.set_num_threads(threads)
    assert magnitude_top1 <= 0.25 and fitted_top1 >= 0.4, (magnitude_top1, fitted_top1)
