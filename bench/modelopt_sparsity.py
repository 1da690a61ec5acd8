"""ModelOpt's PyTorch 2:4 sparsity (`modelopt.torch.sparsity`, magnitude or SparseGPT), run from
.venv-modelopt by bench/bench_sparsity_peer.py, on EfficientNet-Lite0 with the crops, split and fit samples
`trtbuild qat --sparsity 2:4` uses (bench/bench_qat.py --only-sparse): photo_crops(train + holdout + test,
seed 11), the first train + holdout split by calibrators.data's seeded permutation, ModelOpt calibrated on
the first --calib training crops (qat's re-fit uses the first 64).

Per mode: how many layers ModelOpt sparsified (it replaces modules by exact class: EfficientNet-Lite0's 49
convs are `Conv2dStaticSamePadding`, an nn.Conv2d subclass, so by default only the classifier is touched;
`--register-convs` registers the subclass with ModelOpt's own sparse conv, as bench/modelopt_qat.py does
for quantization), whether each mask is 2:4 the way TensorRT reads it (groups of 4 input channels, axis 1,
at every kernel position), held-out top-1 / KL of the FP32 2:4 model in PyTorch (ModelOpt's sparsify
only picks masks -- SparseGPT's weight updates choose them but are not kept -- and leaves the recovery to
sparsity-aware training in the user's loop: `--steps N` runs that loop, see fine_tune), then ModelOpt's
INT8 PTQ (INT8_DEFAULT_CFG, max calibration) on it, and the exported FP32 2:4 ONNX for the caller to
score with the gate's near-ties and quantize with ours. Prints one JSON line.

Run: .venv-modelopt/bin/python bench/modelopt_sparsity.py --mode sparsegpt --register-convs --out-dir /tmp/x
     [--steps 30 --lr 1e-4 --eval-every 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtbuild import examples  # noqa: E402
from trtbuild.core import metrics  # noqa: E402


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def trt_2to4(weight: torch.Tensor) -> bool:
    """At least 2 zeros in every group of 4 consecutive input channels (axis 1), per kernel position."""
    if weight.dim() < 2 or weight.shape[1] % 4:
        return False
    w = weight.detach().movedim(1, -1).reshape(-1, 4)
    return bool(((w == 0).sum(1) >= 2).all())


def register_sparse_convs(model: torch.nn.Module) -> list[str]:
    """Register nn.Conv2d subclasses with ModelOpt's sparse conv (it matches modules by exact class; the
    mode's config then needs a rule naming each, see main)."""
    from modelopt.torch.sparsity.weight_sparsity.module import SparseModule, SpDMRegistry

    classes = {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)} - {torch.nn.Conv2d}
    for cls in sorted(classes, key=lambda c: c.__name__):
        if cls not in SpDMRegistry:
            SpDMRegistry.register({cls: cls.__name__})(SparseModule)
    return sorted(c.__name__ for c in classes)


def fine_tune(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    train: torch.Tensor,
    held: torch.Tensor,
    ref: np.ndarray,
    args: argparse.Namespace,
) -> list[tuple[int, float]]:
    """ModelOpt's sparsity-aware training as its docs describe it: train the sparsified model (its sparse
    modules multiply the weights by their masks in forward, so pruned weights stay zero) with the caller's
    loop -- here qat's recovery set-up without our augmentation / block losses: KL to the teacher's
    logits on the fixed training crops, Adam, batch 8, BatchNorm frozen. The held-out KL every
    --eval-every steps picks the best state (step 0, the one-shot masks, included), as qat's early stop."""
    model.eval()  # BatchNorm statistics frozen, as in qat's recovery
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits_t = torch.cat([teacher(train[i : i + 16]) for i in range(0, len(train), 16)])
        targets = torch.log_softmax(logits_t, dim=1)

    def held_kl() -> float:
        with torch.no_grad():
            out = torch.cat([model(held[i : i + 16]) for i in range(0, len(held), 16)]).numpy()
        return metrics.kl_divergence(metrics.softmax(ref), metrics.softmax(out))

    history = [(0, held_kl())]
    best = (history[0][1], copy.deepcopy(model.state_dict()))
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train), (8,), generator=gen)
        out = torch.log_softmax(model(train[idx]), dim=1)
        loss = torch.nn.functional.kl_div(out, targets[idx], log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            history.append((step, held_kl()))
            if history[-1][1] < best[0]:
                best = (history[-1][1], copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[1])
    return [(s, round(k, 4)) for s, k in history]


def main() -> None:
    import modelopt.torch.quantization as mtq
    import modelopt.torch.sparsity as mts

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("sparse_magnitude", "sparsegpt"), default="sparsegpt")
    parser.add_argument("--register-convs", action="store_true", help="sparsify the Conv2d subclasses too")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--calib", type=int, default=64, help="training crops ModelOpt calibrates on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, required=True, help="where the FP32 2:4 ONNX is written")
    parser.add_argument("--steps", type=int, default=0, help="sparsity-aware fine-tuning steps [0: none]")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning Adam lr (qat's --sparse-lr)")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out check (best step kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    every = examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout + args.test, seed=11))
    x = torch.from_numpy(every[: args.train + args.holdout])
    order = np.random.default_rng(0).permutation(len(x))  # CalibrationData.split(holdout, seed=0)
    held, train = x[np.sort(order[: args.holdout])], x[order[args.holdout :]]
    calib = train[: args.calib]
    teacher = examples.efficientnet_lite0().eval()

    def logits(model: torch.nn.Module, data: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(data[i : i + 16]) for i in range(0, len(data), 16)]).numpy()

    ref = logits(teacher, held)

    def scores(model: torch.nn.Module) -> dict[str, float]:
        out = logits(model, held)
        return {
            "top1": float((ref.argmax(1) == out.argmax(1)).mean()),
            "kl": metrics.kl_divergence(metrics.softmax(ref), metrics.softmax(out)),
        }

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(calib), 16):
                model(calib[i : i + 16])

    model = copy.deepcopy(teacher)
    registered = register_sparse_convs(model) if args.register_convs else []
    c0, t0 = cpu_s(), time.perf_counter()
    config: dict[str, Any] = {"forward_loop": forward_loop}
    if args.mode == "sparsegpt":
        config["device"] = "cpu"
    # A registered class needs its own rule in the mode's config, or ModelOpt leaves it dense.
    mode: Any = [(args.mode, {name: {"*": {}} for name in registered})] if registered else args.mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mts.sparsify(model, mode, config=config)
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    sparsify_cpu, sparsify_s = cpu_s() - c0, time.perf_counter() - t0
    one_shot = scores(model.eval())
    c2 = cpu_s()
    history = fine_tune(model, teacher, train, held, ref, args) if args.steps else []
    tune_cpu = cpu_s() - c2
    model = mts.export(model)
    layers = {
        n: m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }
    zeroed = {n: w for n, w in layers.items() if float((w == 0).float().mean()) >= 0.49}
    fp32 = scores(model.eval())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / f"modelopt_{args.mode}.onnx"
    torch.onnx.export(
        model,
        (held[:1],),
        str(onnx_path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    c1 = cpu_s()
    quantized = copy.deepcopy(model)
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_conv import _QuantConv2d

    for cls in {type(m) for m in quantized.modules() if isinstance(m, torch.nn.Conv2d)} - {torch.nn.Conv2d}:
        if cls not in QuantModuleRegistry:
            QuantModuleRegistry.register({cls: cls.__name__})(_QuantConv2d)
    mtq.quantize(quantized, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
    int8 = scores(quantized.eval())
    print(
        json.dumps(
            {
                "mode": args.mode,
                "registered_conv_classes": registered,
                "sparsified_layers": len(zeroed),
                "sparsified_weights": int(sum(w.numel() for w in zeroed.values())),
                "trt_2to4_layers": sum(trt_2to4(w) for w in zeroed.values()),
                "not_trt_2to4": sorted(n for n, w in zeroed.items() if not trt_2to4(w)),
                "sparsified": sorted(zeroed),
                "skipped": skipped,
                "held_out": args.holdout,
                "calib": len(calib),
                "fp32_2to4_one_shot": one_shot,
                "steps": args.steps,
                "lr": args.lr,
                "fine_tune_history": history,
                "fine_tune_cpu_s": round(tune_cpu, 1),
                "fp32_2to4": fp32,
                "int8_2to4": int8,
                "sparsify_cpu_s": round(sparsify_cpu, 1),
                "sparsify_s": round(sparsify_s, 1),
                "int8_cpu_s": round(cpu_s() - c1, 1),
                "onnx": str(onnx_path),
            }
        )
    )


if __name__ == "__main__":
    main()
