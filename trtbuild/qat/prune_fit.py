"""Data-aware one-shot 2:4 pruning: choose each layer's mask by |w| x input norm and re-fit the kept
weights by least squares so the layer's output on calibration data stays that of the original model.

Why: a plain magnitude 2:4 prune of every 1x1 conv of a trained EfficientNet-Lite0 leaves top-1 agreement
near 0 (each layer loses half its inputs and the errors compound through ~30 layers), which a few hundred
distillation steps on unlabeled crops cannot recover. Layer by layer, in forward order, with the inputs of
the already pruned model (X_p) and of the original one (X_o), each output row w keeps the 2 of every 4
input channels with the largest |w_j| * ||x_j|| (Wanda, Sun et al. 2023) and its kept entries solve
``min ||X_p w' - X_o w||^2 + lambda ||w' - w||^2``: the later layers also undo the error of the earlier
ones (SparseGPT-style reconstruction, Frantar & Alistarh 2023, with the mask fixed first). The ridge pulls
toward the original weights, not toward zero: a classifier fitted on 64 pooled vectors (rank 64 < 1280
inputs) otherwise over-fits them (measured: EfficientNet-Lite0's 2:4 classifier alone, held-out KL 0.27
shrinking toward zero vs 0.017 toward w).
Only Linear and 1x1 Conv layers (the eligible layers of mobile nets and transformers) are re-fitted;
other eligible layers fall back to magnitude masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from calibrators.sparsity import GROUP, KEEP
from trtbuild.qat.prune import PruneDecision, mask_2to4

log = logging.getLogger(__name__)
DAMP = 0.1  # ridge toward the original weights, relative to H's mean diagonal (few samples: stay close)
ROW_CHUNK = 64  # output rows solved per batch (bounds memory: rows x kept^2 floats)
MAX_ROWS = 4096  # pixels per batch and layer: enough for a C x C covariance, and far cheaper


class _Stop(Exception):
    """Raised by a hook once the layer's input is captured: the rest of the forward pass is not needed."""


def _as_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as [samples, in_features] rows (1x1 conv: one row per pixel, evenly subsampled to
    MAX_ROWS -- the same pixels for the pruned and the original model)."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        stride: tuple[int, ...] = module.stride  # type: ignore[assignment]
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    every = -(-rows.shape[0] // MAX_ROWS)
    return rows[::every].float()


def _fittable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # Only 1x1 convs without padding are a plain matrix product of the pixels' channel vectors.
        unpadded = all(p == 0 for p in module.padding) if not isinstance(module.padding, str) else False
        return module.groups == 1 and all(k == 1 for k in module.kernel_size) and unpadded
    return False


def _input(model: nn.Module, module: nn.Module, feeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """One batch's input to ``module`` as rows, stopping the forward pass at the module."""
    rows: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        rows.append(_as_rows(module, args[0].detach()))
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*feeds)
    except _Stop:
        pass
    finally:
        handle.remove()
    return rows[0]


def _original_inputs(
    original: nn.Module, names: Sequence[str], batches: Sequence[Sequence[torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """Every fitted layer's input rows in the original model, per batch, from one pass per batch (the rows
    are subsampled, so keeping them all is cheap)."""
    modules = dict(original.named_modules())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            rows[name].append(_as_rows(module, args[0].detach()))

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for feeds in batches:
                original(*feeds)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _statistics(
    model: nn.Module, name: str, x_orig: Sequence[torch.Tensor], batches: Sequence[Sequence[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """H = X_p'X_p and G = X_p'X_o of the layer ``name`` over all batches (summed batch by batch)."""
    module = dict(model.named_modules())[name]
    h = g = torch.zeros(())
    for feeds, x_o in zip(batches, x_orig, strict=True):
        x_p = _input(model, module, feeds)
        h = h + (x_p.T @ x_p).double()
        g = g + (x_p.T @ x_o).double()
    return h, g


MaskChooser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def wanda_mask(w: torch.Tensor, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keep the 2 of every 4 inputs with the largest |w_j| * ||x_j|| (Wanda), per output row."""
    groups = (w.abs() * h.diagonal().sqrt()).reshape(w.shape[0], -1, GROUP)
    keep = groups.topk(KEEP, dim=2).indices
    return torch.zeros_like(groups).scatter_(2, keep, 1.0).reshape(w.shape)


def fit_2to4(
    weight: torch.Tensor, h: torch.Tensor, g: torch.Tensor, choose: MaskChooser = wanda_mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2:4 weight [out, in], its 0/1 mask): the weight whose output on the pruned model's inputs best
    matches ``weight`` on the original inputs, given H = X_p'X_p and G = X_p'X_o. ``choose(w, H + damp,
    target)`` picks the mask (Wanda by default, prune_obs.sparsegpt_mask), the kept entries are then solved
    exactly."""
    w = weight.double()
    damp = DAMP * h.diagonal().mean().clamp_min(1e-12)
    h = h + torch.eye(h.shape[0], dtype=h.dtype) * damp
    target = w @ g.T + damp * w  # row k: X_p' X_o w_k, plus the ridge pulling toward the original w_k
    mask = choose(w, h, target)
    kept = w.shape[1] // GROUP * KEEP
    result = torch.zeros_like(w)
    for start in range(0, w.shape[0], ROW_CHUNK):
        rows = torch.arange(start, min(start + ROW_CHUNK, w.shape[0]))
        index = mask[rows].nonzero()[:, 1].reshape(len(rows), kept)  # kept input channels, per row
        sub_h = h[index.unsqueeze(-1), index.unsqueeze(-2)]
        sub_t = torch.gather(target[rows], 1, index)
        # Cholesky, not linalg.solve: sub_h is SPD (damped), and MKL's batched LU failed with 2 threads
        # ("Pivots given to lu_solve must all be >= 1" on _blocks.9._project_conv of EfficientNet-Lite0).
        chol = torch.linalg.cholesky(sub_h)
        result[rows.unsqueeze(-1), index] = torch.cholesky_solve(sub_t.unsqueeze(-1), chol).squeeze(-1)
    return result.to(weight.dtype), mask.to(weight.dtype)


def prune_fitted(
    model: nn.Module,
    original: nn.Module,
    decisions: Sequence[PruneDecision],
    batches: Sequence[Sequence[torch.Tensor]],
    accept: Callable[[str, int], bool] | None = None,
    choose: MaskChooser = wanda_mask,
) -> dict[str, torch.Tensor]:
    """Prune ``model``'s eligible layers to 2:4 in forward order, re-fitting 1x1 conv / Linear weights on
    ``batches`` against ``original`` (an unpruned copy); returns the masks (weights changed in place).
    ``accept(name, params)``, asked after each layer is pruned (prune_select.py), may keep it dense: its
    original weights come back and it gets no mask. ``choose``: the mask rule of re-fitted layers."""
    modules = dict(model.named_modules())
    order = [name for name, _ in model.named_modules()]
    eligible = sorted((d.module for d in decisions if d.reason is None), key=order.index)
    masks: dict[str, torch.Tensor] = {}
    x_orig = _original_inputs(original, [n for n in eligible if _fittable(modules[n])], batches)
    for name in eligible:
        module = modules[name]
        weight = module.weight
        dense = weight.detach().clone()
        if not _fittable(module):
            masks[name] = mask_2to4(weight)
            with torch.no_grad():
                weight.mul_(masks[name])
        else:
            h, g = _statistics(model, name, x_orig.pop(name), batches)
            fitted, mask = fit_2to4(weight.detach().reshape(weight.shape[0], -1), h, g, choose)
            with torch.no_grad():
                weight.copy_(fitted.reshape(weight.shape))
            masks[name] = mask.reshape(weight.shape)
            log.info("2:4 re-fitted %s", name)
        if accept is not None and not accept(name, int(weight.numel())):
            with torch.no_grad():
                weight.copy_(dense)
            del masks[name]
    return masks
