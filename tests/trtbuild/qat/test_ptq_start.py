"""QAT starts from our best PTQ (trtbuild/qat/ptq_start.py): with the learned integers and the bias
correction folded into the PyTorch weights, step 0 of QAT -- the fake-quantized student, and the Q/DQ
graph `qat` exports from it -- is the learned-rounding PTQ graph."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from qat_models import tiny_data, tiny_net

from calibrators import fidelity
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.data import open_data
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
from trtbuild.qat.mapping import map_plan
from trtbuild.qat.pipeline import _declared_inputs, _export, quantize_student
from trtbuild.qat.ptq_start import fold_plan, learned_plan


def _run(model: object, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = fidelity.session(model)  # type: ignore[arg-type]
    return np.asarray(session.run(None, feeds)[0])


def test_step_zero_is_the_learned_rounding_ptq_graph(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_net()
    inputs = ["x:1x3x16x16"]
    x = tiny_data(40, seed=7)
    data = open_data([{"x": x[i : i + 1]} for i in range(32)], _declared_inputs(inputs, True), None)
    graph = _export(copy.deepcopy(model), inputs, tmp_path / "a.onnx", ["y"], None, True)
    ranges = compute_ranges(
        collect(graph, data, tensors=quantizable_activations(graph), show_progress=False), "mse"
    )
    options = QdqOptions(bias_correction=False)
    plan, learned = learned_plan(graph, ranges, options, data.batches(8), budget_s=60.0, seed=0)
    assert plan.rounded_weights, "learned rounding kept nothing: the test would not test the fold"
    sample = {"x": x[:1]}
    qmap = map_plan(model, graph, plan, sample, ["x"])
    assert fold_plan(model, graph, plan, qmap.weighted) == len(qmap.weighted)

    held = {"x": x[32:]}
    ptq = _run(apply_qdq(graph, plan), held)
    # The folded float model, exported and quantized by round-to-nearest without bias correction (what
    # `qat` does after training), is the learned-rounding PTQ graph: same integers, same biases.
    folded = _export(copy.deepcopy(model), inputs, tmp_path / "b.onnx", ["y"], None, True)
    again = apply_qdq(folded, plan_qdq(folded, ranges, options))
    np.testing.assert_allclose(_run(again, held), ptq, rtol=1e-4, atol=1e-4 * np.abs(ptq).max())
    # And the fake-quantized student at step 0 computes it too (torch vs ONNX Runtime rounding aside).
    hooks, _ = quantize_student(model, qmap, plan, {}, torch.device("cpu"))
    with torch.no_grad():
        student = model(torch.from_numpy(held["x"])).numpy()
    hooks.remove()
    plain = _run(apply_qdq(graph, plan_qdq(graph, ranges, options)), held)  # nearest, unfolded
    assert np.abs(student - ptq).mean() < 0.1 * np.abs(plain - ptq).mean()


def test_kl_loss_on_logits_and_mse_elsewhere() -> None:
    """KL at a temperature on classifier logits (zero only at the teacher), normalised MSE on the rest."""
    from calibrators.output_kinds import OutputKind
    from trtbuild.qat.losses import kind_loss
    from trtbuild.qat.train import distillation_loss

    kinds = {"logits": OutputKind("classification", "test"), "emb": OutputKind("embedding", "test")}
    loss = kind_loss(kinds, ["logits", "emb"], temperature=2.0)
    g = torch.Generator().manual_seed(0)
    t_logits, t_emb = torch.randn(4, 10, generator=g), torch.randn(4, 8, generator=g)
    assert float(loss([t_logits, t_emb], [t_logits, t_emb])) == pytest.approx(0.0, abs=1e-6)
    shifted = t_logits + 5.0  # softmax is shift-invariant: KL stays 0 where MSE would not
    assert float(loss([shifted, t_emb], [t_logits, t_emb])) == pytest.approx(0.0, abs=1e-5)
    s_logits = t_logits.clone().requires_grad_(True)
    other = torch.randn(4, 10, generator=g)
    value = loss([other, t_emb * 1.1], [t_logits, t_emb])
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(other / 2, 1),
        torch.log_softmax(t_logits / 2, 1),
        log_target=True,
        reduction="batchmean",
    )
    expected = kl * 4 + distillation_loss([t_emb * 1.1], [t_emb])
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    loss([s_logits + other, t_emb], [t_logits, t_emb]).backward()
    assert s_logits.grad is not None and float(s_logits.grad.abs().sum()) > 0
