"""Which eligible layers take 2:4: a budget on the model-output error, shared out per pruned weight.

Why: on EfficientNet-Lite0 every eligible layer is a 1x1 conv or the classifier, and one layer pruned alone
(even re-fitted) moves the output by very different amounts: the first expand conv of a stage costs
10-100x the KL per weight of a late project conv. Pruning all of them compounds to ~60 % top-1 agreement.
During the sequential prune (prune_fit.py), after each layer is re-fitted the model's output on the fit
samples is compared with the teacher's; the layer stays 2:4 only when the KL it added is within its share
of the budget -- ``budget x its weights / all eligible weights`` -- so the layers with the most error per
pruned weight stay dense and the weights that are cheap to prune are pruned. Which layers stay dense, and
why, is reported (never hidden): they keep their original weights.

``max_dense`` caps the weights kept dense (a size target: EfficientNet-Lite0's 2:4 + INT8 bundle is 5x
smaller than FP32 only with <= ~200k of its 4.43M eligible weights dense): a layer over its share stays
dense only while the cap allows, in forward order -- where the cheap, most sensitive layers are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trtbuild.qat.train import as_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerChoice:
    module: str
    params: int
    added_kl: float  # KL on the fit samples added by pruning this layer (after earlier choices)
    allowed_kl: float
    sparse: bool
    capped: bool = False  # over its share, but pruned: keeping it dense would pass the max_dense cap


class OutputBudget:
    """``accept(name, params)`` after each re-fitted layer: keep it 2:4 when its added KL fits its share."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        batches: Sequence[Sequence[torch.Tensor]],
        budget: float,
        total_params: int,
        max_dense: int | None = None,
    ) -> None:
        self.model, self.batches, self.budget, self.total = model, list(batches), budget, total_params
        self.max_dense, self.dense = max_dense, 0
        self.reference = [self._log_probs(teacher, b) for b in self.batches]
        self.current = self._kl()
        self.choices: list[LayerChoice] = []

    @staticmethod
    def _log_probs(model: nn.Module, feeds: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(as_outputs(model(*feeds))[0].float().flatten(1), dim=1)

    def _kl(self) -> float:
        total = 0.0
        for feeds, ref in zip(self.batches, self.reference, strict=True):
            out = self._log_probs(self.model, feeds)
            total += float(F.kl_div(out, ref, log_target=True, reduction="sum"))
        return total / sum(len(r) for r in self.reference)

    def refresh(self) -> None:
        """Re-read the current KL after the model changed outside ``accept`` (a block reconstruction)."""
        self.current = self._kl()

    def accept(self, name: str, params: int) -> bool:
        kl = self._kl()
        added, allowed = kl - self.current, self.budget * params / self.total
        capped = added > allowed and self.max_dense is not None and self.dense + params > self.max_dense
        sparse = added <= allowed or capped
        self.choices.append(LayerChoice(name, params, added, allowed, sparse, capped))
        if sparse:
            self.current = kl
        else:
            self.dense += params
        cap = " (dense cap reached)" if capped else ""
        log.info("2:4 %s: added KL %.5f, allowed %.5f -> %s%s", name, added, allowed, sparse, cap)
        return sparse
