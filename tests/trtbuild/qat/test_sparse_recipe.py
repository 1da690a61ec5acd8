"""`qat --sparsity 2:4`'s recipe on the real EfficientNet-Lite0: augmented recovery data drawn from the
calibration samples only, the per-weight KL budget that keeps the most sensitive layers dense (and says so),
and the block-feature distillation loss that trains the kept weights and never the pruned ones."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trtbuild.qat.augment import augment, augmentable
from trtbuild.qat.fake_quant import QuantHooks
from trtbuild.qat.prune import plan_pruning
from trtbuild.qat.sparse_recipe import prune, recovery
from trtbuild.qat.train import distillation_loss


def test_augment_draws_fresh_views_of_the_pool_only(photo_batch: np.ndarray) -> None:
    pool = torch.from_numpy(photo_batch[:4])
    a = augment(pool, 6, torch.Generator().manual_seed(0))
    b = augment(pool, 6, torch.Generator().manual_seed(0))
    c = augment(pool, 6, torch.Generator().manual_seed(1))
    assert a.shape == (6, *pool.shape[1:]) and torch.equal(a, b) and not torch.equal(a, c)
    # New views, not copies of the samples (crop, flip, jitter, mixup all change pixels) ...
    assert all(min(float((v - p).abs().mean()) for p in pool) > 1e-3 for v in a)
    # ... of this pool only: another pool with the same generator gives other views.
    other = torch.from_numpy(photo_batch[4:8])
    assert not torch.equal(augment(other, 6, torch.Generator().manual_seed(0)), a)
    assert augmentable([pool]) and not augmentable([torch.zeros(2, 16)])


def _kl(model: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = F.log_softmax(teacher(x), 1), F.log_softmax(model(x), 1)
    return float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))


@pytest.mark.slow
def test_budget_keeps_sensitive_layers_dense_and_recovery_trains_kept_weights(
    effnet_model: torch.nn.Module, photo_batch: np.ndarray
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(photo_batch)
        fit = x[:8]
        feeds = [[fit]]
        pruned = copy.deepcopy(effnet_model)
        budget = 0.05
        masks, decisions, choices = prune(pruned, effnet_model, plan_pruning(pruned), feeds, budget)
        dense = [d for d in decisions if d.reason and d.reason.startswith("kept dense")]
        # Some layers are too costly per weight and stay dense, the rest is 2:4; both are reported.
        assert dense and masks and len(dense) + len(masks) == 33 == len(choices)
        assert {d.module for d in dense} == {c.module for c in choices if not c.sparse}
        modules = dict(pruned.named_modules())
        originals = dict(effnet_model.named_modules())
        for d in dense:  # a kept-dense layer has its original weights back
            assert torch.equal(modules[d.module].weight, originals[d.module].weight)
        # The accepted layers' added KL stays within the budget on the fit samples.
        assert sum(c.added_kl for c in choices if c.sparse) <= budget + 1e-6
        assert _kl(pruned, effnet_model, fit) <= budget + 1e-4

        # Recovery: one step of the augmented block-feature distillation moves kept weights only.
        hooks = QuantHooks()
        for name, mask in masks.items():
            hooks.mask_weight(modules[name], mask)
        train = [{"images": photo_batch[i : i + 1]} for i in range(8)]
        recover = recovery(pruned, effnet_model, train, ["images"], masks, distillation_loss, 2, 0)
        blocks = {".".join(n.split(".")[:2]) for n in masks if n.startswith("_blocks.")}
        assert recover is not None and blocks and set(recover.points) == blocks  # MBConv blocks with 2:4
        before = {n: modules[n].weight.detach().clone() for n in masks}
        opt = torch.optim.Adam([p for p in pruned.parameters() if p.requires_grad], lr=1e-4)
        inputs, targets = next(iter(recover))
        loss = recover.loss([pruned(inputs)], targets)
        assert float(loss) > float(distillation_loss([pruned(inputs)], targets[:1]))  # features count
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.remove()
        recover.remove()
        for name, mask in masks.items():
            moved = modules[name].weight.detach() != before[name]
            assert moved.any() and not (moved & (mask == 0)).any(), name
    finally:
        torch.set_num_threads(threads)
