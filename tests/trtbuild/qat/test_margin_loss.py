"""The top-1-aimed QAT terms (trtbuild/qat/margin_loss.py): what they penalise, where their gradient points,
how they join the KL, and the CLI defaults that must equal the module's."""

from __future__ import annotations

import pytest
import torch

from calibrators.output_kinds import OutputKind
from trtbuild.core.errors import TrtbuildError
from trtbuild.qat import margin_loss
from trtbuild.qat.losses import kind_loss

KINDS = {"logits": OutputKind("classification", "test"), "box": OutputKind("regression", "test")}


def _teacher() -> torch.Tensor:
    t = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    t[:, 3] = t.max(dim=1).values + torch.tensor([0.01, 0.5, 2.0, 4.0])  # class 3 wins by these margins
    return t


@pytest.mark.parametrize("term", [margin_loss.margin_term, margin_loss.topk_term])
def test_zero_when_the_student_is_the_teacher(term: object) -> None:
    t = _teacher()
    assert float(term(t.clone(), t)) == 0.0  # type: ignore[operator]


def test_margin_term_is_relative_and_pushes_the_teachers_class_up() -> None:
    t = _teacher()
    s = t.clone()
    s[:, 3] -= 0.3  # every row loses 0.3 of margin: the near-tie rows lose more of theirs
    s.requires_grad_(True)
    loss = margin_loss.margin_term(s, t)
    margins = t.topk(2, dim=1).values
    m_t = (margins[:, 0] - margins[:, 1]).clamp_min(margin_loss.MARGIN_FLOOR)
    expected = (0.3 / m_t).mean()  # each row lost 0.3 of its (floored) teacher margin
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert s.grad is not None
    assert (s.grad[:, 3] < 0).all()  # descending raises the teacher's class ...
    assert (s.grad.sum(dim=1)).abs().max() < 1e-6  # ... and lowers the student's runner-up as much
    # a student more decided than the teacher costs nothing
    more = t.clone()
    more[:, 3] += 1.0
    assert float(margin_loss.margin_term(more, t)) == 0.0


def test_topk_term_sees_the_order_of_the_runners_up() -> None:
    t = _teacher()
    s = t.clone()
    runner_up = t.topk(3, dim=1).indices[:, 2]
    s[torch.arange(4), runner_up] += 0.2  # top-1 unchanged, one runner-up moved: KL-small, still counted
    assert float(margin_loss.topk_term(s, t)) > 0
    assert float(margin_loss.margin_term(s, t)) >= 0


def test_with_margin_adds_to_the_kl_on_logits_only() -> None:
    names = ["logits", "box"]
    base = kind_loss(KINDS, names)
    assert margin_loss.with_margin(base, KINDS, names, "none", 1.0) is base
    assert margin_loss.with_margin(base, KINDS, names, "margin", 0.0) is base
    t = [_teacher(), torch.randn(4, 4)]
    s = [t[0].clone(), t[1] + 0.1]
    s[0][:, 3] -= 0.3
    combined = margin_loss.with_margin(base, KINDS, names, "margin", 2.0)
    extra = float(combined(s, t)) - float(base(s, t))
    assert extra == pytest.approx(2.0 * float(margin_loss.margin_term(s[0], t[0])), rel=1e-5)


@pytest.mark.parametrize(("term", "weight"), [("hinge", 1.0), ("margin", -1.0), ("topk", float("nan"))])
def test_bad_term_or_weight_is_a_trtbuild_error(term: str, weight: float) -> None:
    with pytest.raises(TrtbuildError):
        margin_loss.check(term, weight)


def test_cli_defaults_are_the_modules() -> None:
    from trtbuild.cli.qat_cmd import qat_command

    params = {p.name: p for p in qat_command.params}
    assert params["margin_term"].default == margin_loss.DEFAULT_TERM
    assert params["margin_weight"].default == margin_loss.DEFAULT_WEIGHT
    assert list(params["margin_term"].type.choices) == list(margin_loss.TERMS)  # type: ignore[attr-defined]
