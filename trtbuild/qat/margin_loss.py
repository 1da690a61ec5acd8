"""Top-1-aimed distillation terms for classifier logits, added to the KL of losses.py.

Why: on EfficientNet-Lite0 the QAT student's top-1 misses sit where FP32's best two classes are close.
KL weighs every sample by how much probability mass moves, so a sample whose top-2 margin is small costs
little KL even when its top-1 flips. Two terms aim at the decision itself:

- ``margin``: per sample, with a the teacher's top-1 class, the student's margin of a over its own
  runner-up is pushed up to the teacher's margin: ``relu(m_t - (s[a] - max_{j != a} s[j])) / max(m_t,
  floor)`` -- the fraction of the teacher's margin the student lost, so small-margin samples weigh more
  (1 / teacher margin), and a student already as decided as the teacher adds nothing;
- ``topk``: the teacher's logit gaps to its next ``k`` classes are matched, ``((s[a] - s[j]) - (t[a] -
  t[j]))^2`` averaged over those j, divided by ``max(m_t, floor)`` -- a smooth version of the same idea
  that also keeps the order of the runners-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from calibrators.output_kinds import OutputKind
from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.train import LossFn

TERMS = ("none", "margin", "topk")
DEFAULT_TERM = "none"
DEFAULT_WEIGHT = 1.0
MARGIN_FLOOR = 0.05  # logits: below this the teacher's top-1 is a coin flip (the FP16 floor is ~0.07)
TOPK = 5


def _teacher_margin(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-1 class and its margin over the runner-up, per row."""
    top2 = t.topk(2, dim=1)
    return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]


def margin_term(s: torch.Tensor, t: torch.Tensor, floor: float = MARGIN_FLOOR) -> torch.Tensor:
    """Mean over rows of the teacher margin the student lost, relative to the teacher margin."""
    a, m_t = _teacher_margin(t)
    own = s.gather(1, a[:, None])[:, 0]
    rest = s.scatter(1, a[:, None], float("-inf")).amax(dim=1)
    return (torch.relu(m_t - (own - rest)) / m_t.clamp_min(floor)).mean()


def topk_term(s: torch.Tensor, t: torch.Tensor, k: int = TOPK, floor: float = MARGIN_FLOOR) -> torch.Tensor:
    """Mean over rows of the squared error of the gaps between the teacher's top-1 and its next k classes."""
    top = t.topk(k + 1, dim=1).indices
    gaps_t = t.gather(1, top[:, :1]) - t.gather(1, top[:, 1:])
    gaps_s = s.gather(1, top[:, :1]) - s.gather(1, top[:, 1:])
    _, m_t = _teacher_margin(t)
    return (((gaps_s - gaps_t) ** 2).mean(dim=1) / m_t.clamp_min(floor)).mean()


def check(term: str, weight: float) -> None:
    """Bad --margin-term / --margin-weight -> one TrtbuildError line (before anything is exported)."""
    if term not in TERMS:
        raise TrtbuildError(f"unknown QAT margin term '{term}'", f"use one of {', '.join(TERMS)}")
    if not weight >= 0:
        raise TrtbuildError(f"--margin-weight must be >= 0 (got {weight})", "pass a weight >= 0")


def with_margin(
    base: LossFn,
    kinds: Mapping[str, OutputKind],
    output_names: Sequence[str],
    term: str,
    weight: float,
) -> LossFn:
    """``base`` plus ``weight`` x ``term`` on every classification output of raw logits."""
    check(term, weight)
    if term == "none" or weight == 0:
        return base
    names = list(output_names)
    fn = margin_term if term == "margin" else topk_term

    def loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        total = base(student, teacher)
        for name, s, t in zip(names, student, teacher, strict=True):
            kind = kinds.get(name)
            logits = kind is not None and kind.kind == "classification" and not kind.log_probabilities
            if logits and t.dim() == 2 and t.shape[1] > TOPK:
                total = total + weight * fn(s.float(), t.float())
        return total

    return loss
