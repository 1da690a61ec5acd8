"""Distillation losses that follow what the fidelity gate measures.

Classifier logits: KL(teacher || student) of the softmax at a temperature (times T^2, Hinton et al.), the
gate's own KL/top-1 metric for that output; every other output: MSE normalised by the teacher's mean
square (scale-free across outputs). The plain normalised MSE on logits trained EfficientNet-Lite0 away from
the teacher's top-1 (it weighs every one of 1000 logits alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from calibrators.output_kinds import OutputKind
from trtbuild.qat.train import LossFn, distillation_loss

LOSSES = ("kl", "mse")


def _is_logits(kind: OutputKind | None, teacher: torch.Tensor) -> bool:
    return kind is not None and kind.kind == "classification" and teacher.dim() == 2 and teacher.shape[1] > 1


def kind_loss(
    kinds: Mapping[str, OutputKind], output_names: Sequence[str], temperature: float = 1.0
) -> LossFn:
    """KL at ``temperature`` on classification outputs, normalised MSE on the others."""
    names = list(output_names)

    def loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=teacher[0].device)
        for name, s, t in zip(names, student, teacher, strict=True):
            kind = kinds.get(name)
            if not _is_logits(kind, t):
                total = total + distillation_loss([s], [t]).to(total.device)
                continue
            log_s, log_t = s.float(), t.float()
            if not (kind is not None and kind.log_probabilities):
                log_s = F.log_softmax(log_s / temperature, dim=1)
                log_t = F.log_softmax(log_t / temperature, dim=1)
            kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
            total = total + kl * temperature**2
        return total

    return loss
