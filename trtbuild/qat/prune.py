"""2:4 magnitude pruning of a PyTorch model's Conv/Linear weights along their input-channel axis.

The masks are fixed once (the 2 largest |w| of every 4 consecutive input channels, per output channel and
kernel position) and kept during recovery training; the rule is calibrators/sparsity.py's, the one
`trtbuild plan` checks the exported ONNX against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrators.sparsity import GROUP, KEEP, ineligible_reason


@dataclass(frozen=True)
class PruneDecision:
    module: str
    kind: str
    params: int
    reason: str | None  # None: pruned to 2:4


def _kind_and_shape(module: nn.Module) -> tuple[str, int, int] | None:
    """(ONNX op it exports to, reduction channels, groups) of a weighted module, or None."""
    if isinstance(module, nn.Linear):
        return "Gemm", module.in_features, 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "Conv", module.in_channels, module.groups
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "ConvTranspose", module.in_channels, module.groups
    return None


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask keeping the 2 largest |w| of every 4 consecutive entries along axis 1 (input channels)."""
    w = weight.detach().movedim(1, -1)  # [K, R, S, C]: groups of 4 consecutive input channels last
    groups = w.abs().reshape(-1, GROUP)
    keep = groups.topk(KEEP, dim=1).indices
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
    return mask.reshape(w.shape).movedim(-1, 1).contiguous()


def plan_pruning(model: nn.Module, only: set[str] | None = None) -> list[PruneDecision]:
    """Which weighted modules take 2:4 and, for the others, why not. ``only``: restrict to these names."""
    decisions = []
    for name, module in model.named_modules():
        shape = _kind_and_shape(module)
        if shape is None or (only is not None and name not in only):
            continue
        kind, channels, groups = shape
        reason = ineligible_reason(kind, channels, groups)
        decisions.append(PruneDecision(name, kind, int(module.weight.numel()), reason))
    return decisions
