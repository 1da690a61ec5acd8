"""`qat --sparsity 2:4`'s recipe before QAT: data-aware prune with a layer budget, then the recovery set-up.

prune: masks (SparseGPT's OBS choice, prune_obs.py, or Wanda's) + ridge re-fit in forward order
(prune_fit.py); for a model with one image input, each block is then reconstructed on augmented views of
the fit samples (block_recon.py). With ``budget`` the layers whose added output KL exceeds their
per-weight share stay dense (prune_select.py) and say so in their decision.
recovery: feature distillation on freshly augmented views of the calibration samples (sparse_recover.py)
when the model has one image-like input, else the plain distillation on the fixed samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.augment import augment, augmentable
from trtbuild.qat.block_recon import BlockResult, ReconConfig, prune_blockwise
from trtbuild.qat.prune import PruneDecision
from trtbuild.qat.prune_fit import MaskChooser, prune_fitted, wanda_mask
from trtbuild.qat.prune_obs import sparsegpt_mask
from trtbuild.qat.prune_select import LayerChoice, OutputBudget
from trtbuild.qat.sparse_recover import FeatureDistillation, feature_points, stack_pool
from trtbuild.qat.train import LossFn

DEFAULT_BUDGET: float | None = None  # KL budget on the fit samples; None prunes every eligible layer
RECOVERY_LR = 1e-4  # Adam on the pruned FP32 weights (larger than QAT's: pruning moves them far)
MASKS: dict[str, MaskChooser] = {"sparsegpt": sparsegpt_mask, "wanda": wanda_mask}
DEFAULT_MASKS = "sparsegpt"  # held-out KL of all 33 EfficientNet-Lite0 layers re-fitted: 0.228 vs 0.288
DEFAULT_RECON: ReconConfig | None = None  # ReconConfig(): block reconstruction (block_recon.py)
VIEWS_PER_SAMPLE = 4  # reconstruction views: the fit samples plus 3 augmented views of each


def check_max_dense(max_dense: int | None, budget: float | None) -> None:
    """A dense-weight cap only limits what a KL budget keeps dense: it needs one, and must be >= 0."""
    if max_dense is None:
        return
    if budget is None:
        raise TrtbuildError(
            "--sparse-max-dense caps the layers --sparse-budget keeps dense, but no budget was given",
            "add --sparse-budget KL (e.g. 1.0) or drop --sparse-max-dense",
        )
    if max_dense < 0:
        raise TrtbuildError(f"--sparse-max-dense must be >= 0 weights, not {max_dense}", "pass a count >= 0")


def reconstruction_views(feeds: Sequence[Sequence[torch.Tensor]], seed: int) -> torch.Tensor | None:
    """The fit samples and augmented views of them, for a model with one image-like input; else None."""
    if any(len(f) != 1 for f in feeds):
        return None
    pool = torch.cat([f[0] for f in feeds]).float()
    if not augmentable([pool]):
        return None
    extra = augment(pool, (VIEWS_PER_SAMPLE - 1) * len(pool), torch.Generator().manual_seed(seed))
    return torch.cat([pool, extra])


def prune(
    model: nn.Module,
    teacher: nn.Module,
    decisions: Sequence[PruneDecision],
    feeds: Sequence[Sequence[torch.Tensor]],
    budget: float | None,
    masks_rule: str = DEFAULT_MASKS,
    recon: ReconConfig | None = DEFAULT_RECON,
    blocks: list[BlockResult] | None = None,
    max_dense: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[PruneDecision], list[LayerChoice]]:
    """(masks, decisions with the kept-dense layers' reasons, per-layer choices) after pruning ``model``.
    ``blocks``, when given, receives each reconstructed block's result; ``max_dense`` caps the weights the
    budget may keep dense (prune_select.py)."""
    eligible = [d for d in decisions if d.reason is None]
    selector = (
        None
        if budget is None
        else OutputBudget(model, teacher, feeds, budget, sum(d.params for d in eligible), max_dense)
    )
    accept = None if selector is None else selector.accept
    views = None if recon is None else reconstruction_views(feeds, recon.seed)
    if views is None or recon is None:
        masks = prune_fitted(model, teacher, decisions, feeds, accept, MASKS[masks_rule])
    else:
        on_block = None if selector is None else selector.refresh
        masks, results = prune_blockwise(
            model, teacher, decisions, feeds, views, recon, accept, MASKS[masks_rule], on_block
        )
        if blocks is not None:
            blocks.extend(results)
    choices = [] if selector is None else selector.choices
    dense = {c.module: c for c in choices if not c.sparse}
    updated = [
        dataclasses.replace(
            d,
            reason=f"kept dense: pruning it added KL {dense[d.module].added_kl:.4f} on the fit samples, "
            f"over its budget share {dense[d.module].allowed_kl:.4f}",
        )
        if d.module in dense
        else d
        for d in decisions
    ]
    return masks, updated, choices


def recovery(
    model: nn.Module,
    teacher: nn.Module,
    train: Sequence[Mapping[str, Any]],
    input_names: Sequence[str],
    masks: Mapping[str, torch.Tensor],
    output_loss: LossFn,
    batch_size: int,
    seed: int,
) -> FeatureDistillation | None:
    """The augmented feature-distillation loader/loss for an image model, None for other inputs."""
    if len(input_names) != 1 or not train:
        return None
    pool = stack_pool(train, input_names[0])
    if not augmentable([pool]):
        return None
    points = feature_points(model, list(masks))
    return FeatureDistillation(model, teacher, pool, points, output_loss, batch_size, seed)
