"""2:4 pruning of EfficientNet-Lite0 step by step, side by side on the same photo crops and threads, in
PyTorch FP32 (no quantization): magnitude masks (what `trtbuild qat --sparsity 2:4` did before), magnitude
+ BatchNorm re-estimation, the data-aware re-fit (trtbuild/qat/prune_fit.py, what it does now), and the
re-fit after N steps of the same distillation recovery `qat` runs (masks held). Top-1 agreement and KL
against the unpruned FP32 model on held-out crops, plus weight bytes as TensorRT would store them.

Run: python3 bench/bench_sparsity_prune.py [--fit 64] [--train 128] [--holdout 64] [--steps 30]
     [--budget KL [--aug-steps N --aug-lr 1e-4]] [--skip-baseline]
     [--methods wanda,sparsegpt [--recon-steps N --recon-views 256 --recon-lr 1e-4 --recon-only]]
--methods adds one all-layer re-fit row per mask rule (Wanda, SparseGPT's OBS pass: prune_obs.py) and
--recon-steps the block-wise prune + reconstruction (block_recon.py) with that rule.
--budget adds the re-fit with `qat --sparse-budget` (prune_select.py: layers over their per-weight share of
the KL budget stay dense, listed in the report) and --aug-steps the recovery `qat --sparsity 2:4` runs now
(augmented views of the training crops, KL + block-feature loss; sparse_recover.py) on that model -- or,
without --budget, on the last --methods all-layer re-fit (held-out top-1 / KL every --aug-every steps: the
recovery curve, e.g. --methods sparsegpt --aug-steps 200 --aug-lr 1e-5).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtbuild import examples  # noqa: E402
from trtbuild.qat.augment import augment  # noqa: E402
from trtbuild.qat.block_recon import ReconConfig, prune_blockwise  # noqa: E402
from trtbuild.qat.fake_quant import QuantHooks  # noqa: E402
from trtbuild.qat.prune import mask_2to4, plan_pruning  # noqa: E402
from trtbuild.qat.prune_fit import prune_fitted, wanda_mask  # noqa: E402
from trtbuild.qat.prune_obs import sparsegpt_mask  # noqa: E402
from trtbuild.qat.sparse_recipe import prune as recipe_prune  # noqa: E402
from trtbuild.qat.sparse_recipe import recovery  # noqa: E402
from trtbuild.qat.train import distillation_loss  # noqa: E402


def cpu_s() -> float:
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
    )


def score(model: nn.Module, held: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        out = torch.cat([model(held[i : i + 16]) for i in range(0, len(held), 16)])
    p, q = torch.log_softmax(ref, 1), torch.log_softmax(out, 1)
    return {
        "top1": float((out.argmax(1) == ref.argmax(1)).float().mean()),
        "kl": float((p.exp() * (p - q)).sum(1).mean()),
    }


def magnitude(model: nn.Module) -> dict[str, torch.Tensor]:
    modules, masks = dict(model.named_modules()), {}
    with torch.no_grad():
        for d in plan_pruning(model):
            if d.reason is None:
                masks[d.module] = mask_2to4(modules[d.module].weight)
                modules[d.module].weight.mul_(masks[d.module])
    return masks


def batchnorm_reestimate(model: nn.Module, x: torch.Tensor) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(x), 16):
            model(x[i : i + 16])
    model.eval()


def recover(
    model: nn.Module,
    teacher: nn.Module,
    masks: dict[str, torch.Tensor],
    train: torch.Tensor,
    steps: int,
    lr: float,
) -> None:
    """The distillation `qat` runs after pruning (normalised MSE to the teacher, Adam, masks held)."""
    hooks, modules = QuantHooks(), dict(model.named_modules())
    for name, mask in masks.items():
        hooks.mask_weight(modules[name], mask)
    with torch.no_grad():
        targets = torch.cat([teacher(train[i : i + 16]) for i in range(0, len(train), 16)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randperm(len(train), generator=gen)[:8]
        loss = distillation_loss([model(train[index])], [targets[index]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    hooks.remove()
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)


def kl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """`qat`'s KL on classifier logits (losses.kind_loss at temperature 1)."""
    log_s, log_t = torch.log_softmax(student[0], 1), torch.log_softmax(teacher[0], 1)
    return torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def recover_augmented(
    model: nn.Module,
    teacher: nn.Module,
    masks: dict[str, torch.Tensor],
    train: torch.Tensor,
    steps: int,
    lr: float,
    on_eval: Any,
    every: int = 25,
) -> None:
    """What `qat --sparsity 2:4` runs now: KL on logits + block-output MSE on fresh augmented views of the
    training crops (trtbuild/qat/sparse_recover.py), Adam, masks held, BatchNorm frozen."""
    hooks, modules = QuantHooks(), dict(model.named_modules())
    for name, mask in masks.items():
        hooks.mask_weight(modules[name], mask)
    for p in model.parameters():
        p.requires_grad_(True)
    samples = [{"images": train[i : i + 1].numpy()} for i in range(len(train))]
    fd = recovery(model, teacher, samples, ["images"], masks, kl_loss, 8, 0)
    assert fd is not None
    opt = torch.optim.Adam(list(model.parameters()), lr=lr)
    batches = iter(fd)
    model.eval()
    for step in range(1, steps + 1):
        x, targets = next(batches)
        loss = fd.loss([model(x)], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            on_eval(step)
    hooks.remove()
    fd.remove()


def stored_mib(model: nn.Module, sparse: set[str], bytes_per_weight: float) -> float:
    """Conv/Linear weights as TensorRT stores them (an estimate from the weight counts, not an engine):
    dense at ``bytes_per_weight``; a 2:4 layer keeps half its values plus a 2-bit index per kept value.
    Biases and BatchNorm (folded into biases) at 4 bytes."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            n = module.weight.numel()
            total += n / 2 * (bytes_per_weight + 0.25) if name in sparse else n * bytes_per_weight
            total += 4 * module.out_channels if isinstance(module, nn.Conv2d) else 4 * module.out_features
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit", type=int, default=64, help="calibration crops for the re-fit")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="recovery steps after the re-fit")
    parser.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate (qat: 10x --lr)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aug-steps", type=int, default=0, help="augmented feature-distillation steps")
    parser.add_argument("--aug-lr", type=float, default=1e-4)
    parser.add_argument("--aug-every", type=int, default=25, help="held-out evaluation every N aug steps")
    parser.add_argument("--budget", type=float, default=None, help="also: re-fit with this KL budget")
    parser.add_argument("--skip-baseline", action="store_true", help="skip magnitude / old re-fit rows")
    parser.add_argument("--methods", default="", help="comma list of wanda,sparsegpt: all-layer re-fit rows")
    parser.add_argument("--recon-steps", type=int, default=0, help="block reconstruction steps per block")
    parser.add_argument("--recon-views", type=int, default=256, help="augmented views for reconstruction")
    parser.add_argument("--recon-lr", type=float, default=1e-4)
    parser.add_argument("--recon-only", action="store_true", help="--methods: skip the plain re-fit rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.from_numpy(
        examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout, seed=11))
    )
    train, held = x[: args.train], x[args.train :]
    teacher = examples.efficientnet_lite0().eval()
    with torch.no_grad():
        ref = torch.cat([teacher(held[i : i + 16]) for i in range(0, len(held), 16)])
    rows: list[dict[str, Any]] = []

    def row(label: str, model: nn.Module, wall: float, cpu: float) -> None:
        rows.append(
            {"model": label, **score(model, held, ref), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    row("FP32", teacher, 0, 0)
    feeds = [[train[i : i + 16]] for i in range(0, args.fit, 16)]
    masks = {d.module: torch.ones(1) for d in plan_pruning(teacher) if d.reason is None}
    if not args.skip_baseline:
        t, c = time.perf_counter(), cpu_s()
        plain = copy.deepcopy(teacher)
        masks = magnitude(plain)
        row("2:4 magnitude masks", plain, time.perf_counter() - t, cpu_s() - c)
        batchnorm_reestimate(plain, train)
        row("2:4 magnitude + BatchNorm re-estimated", plain, time.perf_counter() - t, cpu_s() - c)
        t, c = time.perf_counter(), cpu_s()
        fitted = copy.deepcopy(teacher)
        fit_masks = prune_fitted(fitted, teacher, plan_pruning(fitted), feeds)
        row(f"2:4 re-fitted on {args.fit} crops", fitted, time.perf_counter() - t, cpu_s() - c)
        if args.steps:
            t, c = time.perf_counter(), cpu_s()
            recover(fitted, teacher, fit_masks, train, args.steps, args.lr)
            row(f"2:4 re-fitted + {args.steps} recovery steps", fitted, time.perf_counter() - t, cpu_s() - c)
    choosers = {"wanda": wanda_mask, "sparsegpt": sparsegpt_mask}
    blocks: dict[str, Any] = {}
    pruned = None
    for method in [m for m in args.methods.split(",") if m]:
        if not args.recon_only:
            t, c = time.perf_counter(), cpu_s()
            pruned = copy.deepcopy(teacher)
            masks = prune_fitted(pruned, teacher, plan_pruning(pruned), feeds, choose=choosers[method])
            row(f"2:4 {method} masks + re-fit, all layers", pruned, time.perf_counter() - t, cpu_s() - c)
            refit, refit_masks = pruned, masks
        if args.recon_steps:
            t, c = time.perf_counter(), cpu_s()
            gen = torch.Generator().manual_seed(1)
            views = torch.cat([train, augment(train, args.recon_views - len(train), gen)])
            config = ReconConfig(steps=args.recon_steps, lr=args.recon_lr)
            recon = copy.deepcopy(teacher)
            masks, results = prune_blockwise(
                recon, teacher, plan_pruning(recon), feeds, views, config, choose=choosers[method]
            )
            label = f"2:4 {method} + block reconstruction ({args.recon_steps} steps, {len(views)} views)"
            row(label, recon, time.perf_counter() - t, cpu_s() - c)
            blocks[method] = [(r.block, round(r.before, 4), round(r.after, 4)) for r in results]
    if args.aug_steps and args.budget is None and pruned is not None:
        t, c = time.perf_counter(), cpu_s()
        label = f"2:4 all layers re-fitted + augmented recovery (lr {args.aug_lr})"

        def on_refit_eval(step: int) -> None:
            row(f"{label}, step {step}", refit, time.perf_counter() - t, cpu_s() - c)

        recover_augmented(
            refit, teacher, refit_masks, train, args.aug_steps, args.aug_lr, on_refit_eval, args.aug_every
        )
    chosen: dict[str, Any] = {}
    if args.budget is not None:
        t, c = time.perf_counter(), cpu_s()
        budgeted = copy.deepcopy(teacher)
        b_masks, decisions, _ = recipe_prune(budgeted, teacher, plan_pruning(budgeted), feeds, args.budget)
        dense = [d for d in decisions if d.reason and d.reason.startswith("kept dense")]
        chosen = {
            "budget": args.budget,
            "sparse_layers": len(b_masks),
            "dense_layers": [d.module for d in dense],
            "sparse_weights": sum(int(m.numel()) for m in b_masks.values()),
        }
        label = f"2:4 re-fitted, KL budget {args.budget} ({len(b_masks)} layers 2:4, {len(dense)} dense)"
        row(label, budgeted, time.perf_counter() - t, cpu_s() - c)
        masks = b_masks
        if args.aug_steps:
            t, c = time.perf_counter(), cpu_s()

            def on_eval(step: int) -> None:
                row(f"{label} + {step} augmented steps", budgeted, time.perf_counter() - t, cpu_s() - c)

            recover_augmented(
                budgeted, teacher, b_masks, train, args.aug_steps, args.aug_lr, on_eval, args.aug_every
            )
    sizes = {
        "FP32": stored_mib(teacher, set(), 4),
        "INT8": stored_mib(teacher, set(), 1),
        "2:4 FP32": stored_mib(teacher, set(masks), 4),
        "2:4 + INT8": stored_mib(teacher, set(masks), 1),
    }
    eligible = [d for d in plan_pruning(teacher) if d.reason is None]
    report = {
        "train": args.train,
        "holdout": args.holdout,
        "fit": args.fit,
        "rows": rows,
        "stored_weight_mib": {k: round(v, 2) for k, v in sizes.items()},
        "eligible_layers": len(eligible),
        "eligible_weights": sum(d.params for d in eligible),
        "total_weights": sum(d.params for d in plan_pruning(teacher)),
        "budget_choice": chosen,
        "block_reconstruction": blocks,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
