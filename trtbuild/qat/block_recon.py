"""2:4 prune block by block, each block reconstructed right after its layers are pruned.

Why: the layer re-fit (prune_fit.py) matches each layer's *linear* output; the error that survives the
block's BatchNorm, activation and depthwise conv compounds over ~16 MBConv blocks (EfficientNet-Lite0: all
33 layers 2:4 -> 62 % top-1), and end-to-end distillation on a few hundred crops over-fits (one scalar
signal per sample). Here, in forward order, each block (a child of a ModuleList/Sequential holding
eligible layers, sparse_recover.feature_points) has its layers pruned and re-fitted on the pruned prefix,
then *all* its parameters -- the kept weights (masks fixed), depthwise convs, BatchNorm affine -- are
trained with Adam so the block's output on the *student's* input matches the teacher's block output on
the teacher's input, over many augmented views (augment.py) of the training samples (BRECQ-style block
reconstruction, Li et al. 2021): thousands of output values per view instead of one KL, and the block
also absorbs the error of the pruned prefix. A slice of the views is held back and the best state on it
is kept, so reconstruction never leaves a block worse than its re-fit. Layers outside any block (a
classifier head) keep the plain re-fit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trtbuild.qat.prune import PruneDecision
from trtbuild.qat.prune_fit import MaskChooser, prune_fitted, wanda_mask
from trtbuild.qat.sparse_recover import feature_points

log = logging.getLogger(__name__)
CHUNK = 32  # views per forward pass when caching block inputs/outputs
VALIDATION = 8  # every VALIDATION-th view is held back to pick the best reconstruction state


@dataclass(frozen=True)
class ReconConfig:
    steps: int = 100  # Adam steps per block
    lr: float = 1e-4
    batch_size: int = 16
    evals: int = 5  # validation checks per block (best state kept, step 0 included)
    seed: int = 0


@dataclass(frozen=True)
class BlockResult:
    block: str
    layers: int
    before: float  # normalised block-output MSE on the held-back views after the re-fit
    after: float  # ... after reconstruction (best state)


class _Stop(Exception):
    """Raised by a hook once what it captures is captured."""


def _capture(model: nn.Module, block: nn.Module, views: torch.Tensor, want_input: bool) -> torch.Tensor:
    """The block's input (``want_input``) or output on every view, stopping each pass at the block."""
    out: list[torch.Tensor] = []

    def pre(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        out.append(args[0].detach())
        raise _Stop

    def post(_: nn.Module, __: Any, value: torch.Tensor) -> None:
        out.append(value.detach())
        raise _Stop

    handle = block.register_forward_pre_hook(pre) if want_input else block.register_forward_hook(post)
    try:
        with torch.no_grad():
            for i in range(0, len(views), CHUNK):
                with contextlib.suppress(_Stop):
                    model(views[i : i + CHUNK])
    finally:
        handle.remove()
    return torch.cat(out)


def _error(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = torch.cat([block(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])
    return float(((out - y) ** 2).mean() / y.var().clamp_min(1e-12))


def reconstruct(
    model: nn.Module,
    teacher: nn.Module,
    name: str,
    masks: dict[str, torch.Tensor],
    views: torch.Tensor,
    config: ReconConfig,
) -> BlockResult:
    """Train block ``name`` of ``model`` (masks of its pruned layers held) toward the teacher's block."""
    block = dict(model.named_modules())[name]
    x = _capture(model, block, views, want_input=True)
    y = _capture(teacher, dict(teacher.named_modules())[name], views, want_input=False)
    val = torch.arange(len(views)) % VALIDATION == 0
    x_val, y_val, x_fit, y_fit = x[val], y[val], x[~val], y[~val]
    scale = y_fit.var().clamp_min(1e-12)
    modules = dict(block.named_modules())
    handles = []
    for full, mask in masks.items():
        if full.startswith(name + "."):  # masked gradients: Adam never moves a pruned weight
            weight = modules[full[len(name) + 1 :]].weight
            handles.append(weight.register_hook(lambda g, m=mask: g * m))
    params = [p for p in block.parameters() if p.is_floating_point()]
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    before = best = _error(block, x_val, y_val)
    best_state = copy.deepcopy(block.state_dict())
    every = max(1, config.steps // max(1, config.evals))
    try:
        for step in range(1, config.steps + 1):
            pick = torch.randint(0, len(x_fit), (config.batch_size,), generator=gen)
            loss = ((block(x_fit[pick]) - y_fit[pick]) ** 2).mean() / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % every == 0 or step == config.steps:
                err = _error(block, x_val, y_val)
                if err < best:
                    best, best_state = err, copy.deepcopy(block.state_dict())
    finally:
        for handle in handles:
            handle.remove()
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g)
    block.load_state_dict(best_state)
    layers = sum(1 for m in masks if m.startswith(name + "."))
    log.info("2:4 block %s reconstructed: block error %.4f -> %.4f", name, before, best)
    return BlockResult(name, layers, before, best)


def prune_blockwise(
    model: nn.Module,
    teacher: nn.Module,
    decisions: Sequence[PruneDecision],
    feeds: Sequence[Sequence[torch.Tensor]],
    views: torch.Tensor,
    config: ReconConfig,
    accept: Callable[[str, int], bool] | None = None,
    choose: MaskChooser = wanda_mask,
    on_block: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[BlockResult]]:
    """Prune ``model`` (a single-input model) block by block: re-fit the block's eligible layers on
    ``feeds`` (prune_fit.py, ``accept``/``choose`` as there), then reconstruct the block on ``views``
    and call ``on_block()``. Returns the masks and each block's reconstruction result."""
    order = [n for n, _ in model.named_modules()]
    eligible = sorted((d for d in decisions if d.reason is None), key=lambda d: order.index(d.module))
    blocks = feature_points(model, [d.module for d in eligible])
    groups: list[tuple[str | None, list[PruneDecision]]] = []
    for d in eligible:
        owner = next((b for b in blocks if d.module.startswith(b + ".")), None)
        if groups and groups[-1][0] == owner:
            groups[-1][1].append(d)
        else:
            groups.append((owner, [d]))
    masks: dict[str, torch.Tensor] = {}
    results = []
    for owner, group in groups:
        masks.update(prune_fitted(model, teacher, group, feeds, accept, choose))
        if owner is not None and config.steps > 0:
            own = {k: v for k, v in masks.items() if k.startswith(owner + ".")}
            if own:
                results.append(reconstruct(model, teacher, owner, own, views, config))
                if on_block is not None:
                    on_block()
    return masks, results
