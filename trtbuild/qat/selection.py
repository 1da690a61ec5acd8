"""Which held-out evaluation is the best training step: the score each evaluation is ranked by.

"kl" (the fidelity gate's continuous error: KL where top-1 judges, else 1 - cosine) keeps the step closest
to FP32 in distribution. "top1-kl" adds, for every output judged by top-1, the fraction of decisive
held-out samples (near-ties set aside, as the gate does) whose top-1 differs: one miss of 117 crops is
0.0085, more than the KL moves between steps (~0.0005), so it ranks by top-1 first and KL second. Why:
with the margin term (margin_loss.py) EfficientNet-Lite0's decisive held-out top-1 rose while the KL rose
a little, and ranking by KL alone returned the PTQ start.
"""

from __future__ import annotations

from collections.abc import Callable

from calibrators.fidelity import FidelityReport
from trtbuild.core.errors import TrtbuildError

SELECTIONS = ("kl", "top1-kl")
DEFAULT_SELECTION = "kl"
Scorer = Callable[[FidelityReport], float]


def kl_score(report: FidelityReport) -> float:
    return report.score()


def top1_kl_score(report: FidelityReport) -> float:
    misses = sum(1.0 - o.top1_agreement for o in report.outputs if o.top1_agreement is not None)
    return misses + report.score()


def scorer(selection: str) -> Scorer:
    if selection not in SELECTIONS:
        raise TrtbuildError(f"unknown --select '{selection}'", f"use one of {', '.join(SELECTIONS)}")
    return top1_kl_score if selection == "top1-kl" else kl_score
