"""Ranking held-out QAT evaluations (trtbuild/qat/selection.py): KL, or decisive top-1 first and KL second."""

from __future__ import annotations

import pytest

from calibrators.fidelity import FidelityReport, OutputFidelity
from trtbuild.core.errors import TrtbuildError
from trtbuild.qat import selection
from trtbuild.qat.train import TrainConfig


def _report(top1: float | None, kl: float | None, cosine: float = 0.99) -> FidelityReport:
    kind = "classification" if top1 is not None else "regression"
    return FidelityReport(117, [OutputFidelity("y", cosine, cosine, 30.0, top1, kl, kind)])


def test_top1_kl_ranks_fewer_decisive_misses_first_then_kl() -> None:
    rank = selection.scorer("top1-kl")
    start, trained = _report(113 / 117, 0.0052), _report(116 / 117, 0.0057)  # one miss left, KL +10 %
    assert rank(trained) < rank(start)  # what EfficientNet-Lite0's margin-term QAT needed
    assert selection.scorer("kl")(trained) > selection.scorer("kl")(start)  # KL alone keeps the start
    tie_a, tie_b = _report(116 / 117, 0.0057), _report(116 / 117, 0.0056)
    assert rank(tie_b) < rank(tie_a)  # same top-1: the lower KL


def test_without_top1_both_rank_as_the_gate_score() -> None:
    embedding = _report(None, None, cosine=0.998)
    for name in selection.SELECTIONS:
        assert selection.scorer(name)(embedding) == pytest.approx(embedding.score())


def test_unknown_selection_is_a_trtbuild_error() -> None:
    with pytest.raises(TrtbuildError, match="--select"):
        TrainConfig(select="top5")
    from trtbuild.cli.qat_cmd import qat_command

    params = {p.name: p for p in qat_command.params}
    assert params["select"].default == selection.DEFAULT_SELECTION
    assert list(params["select"].type.choices) == list(selection.SELECTIONS)  # type: ignore[attr-defined]
