"""The 2:4 layer budget's dense-weight cap (prune_select.py) on the real EfficientNet-Lite0: layers over
their KL share stay dense in forward order only while the cap allows; past it they are pruned and say so."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.prune import mask_2to4, plan_pruning
from trtbuild.qat.prune_select import OutputBudget
from trtbuild.qat.sparse_recipe import check_max_dense


def test_dense_cap_keeps_the_first_sensitive_layers_dense_then_prunes(
    effnet_model: torch.nn.Module, photo_batch: np.ndarray, one_thread: None
) -> None:
    model = copy.deepcopy(effnet_model).eval()
    eligible = [d for d in plan_pruning(model) if d.reason is None]
    first = eligible[:4]  # _blocks.0._project_conv, _blocks.1._expand_conv, ... (512-3456 weights each)
    cap = first[0].params + first[1].params
    feeds = [[torch.from_numpy(photo_batch[:4])]]
    # Budget 0: every layer that moves the output is over its share, so only the cap decides.
    budget = OutputBudget(model, effnet_model, feeds, 0.0, sum(d.params for d in eligible), max_dense=cap)
    modules = dict(model.named_modules())
    for d in first:
        weight = modules[d.module].weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(mask_2to4(weight))
        if not budget.accept(d.module, d.params):
            with torch.no_grad():  # as prune_fit does for a layer kept dense
                weight.copy_(original)
    choices = budget.choices
    assert [c.module for c in choices] == [d.module for d in first]
    assert all(c.added_kl > c.allowed_kl == 0.0 for c in choices), choices  # each was over its share
    assert [c.sparse for c in choices] == [False, False, True, True]
    assert [c.capped for c in choices] == [False, False, True, True]
    assert budget.dense == cap
    # The dense layers hold their original weights, the capped ones are 2:4.
    assert float((modules[first[0].module].weight == 0).float().mean()) < 0.1
    assert float((modules[first[2].module].weight == 0).float().mean()) >= 0.5


def test_dense_cap_needs_a_budget_and_a_count() -> None:
    check_max_dense(None, None)
    check_max_dense(0, 1.0)
    with pytest.raises(TrtbuildError, match="no budget was given"):
        check_max_dense(1000, None)
    with pytest.raises(TrtbuildError, match=">= 0"):
        check_max_dense(-1, 1.0)
