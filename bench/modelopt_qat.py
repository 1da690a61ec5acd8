"""ModelOpt's PyTorch QAT, run from .venv-modelopt by bench/bench_qat.py, on EfficientNet-Lite0 (photo
crops) or MiniLM-L6 (stdlib sentences, `--model minilm`).

The same samples, the same train/held-out split (calibrators.data's seeded permutation), the same
distillation loss (KL on the logits, or --loss mse; normalised MSE on MiniLM's embedding, what
`trtbuild qat` uses for non-logit outputs), optimizer, batch size and number of steps as `trtbuild qat`;
ModelOpt's INT8 default config (per-channel int8 weights, per-tensor int8 activations, max calibration)
on its own placement. Prints one JSON line with the held-out scores against FP32 before and after
training, evaluated in PyTorch with ModelOpt's fake quantization (its deployment path is its ONNX
export): top-1 agreement and KL(FP32 || INT8) of the softmax for EfficientNet (the fidelity gate's
metrics, trtbuild.core.metrics), mean / worst cosine for MiniLM.

Run: .venv-modelopt/bin/python bench/modelopt_qat.py --steps 30 --train 128 --holdout 128
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtbuild import examples  # noqa: E402
from trtbuild.core import metrics  # noqa: E402

Batch = list[torch.Tensor]


def _efficientnet(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Any]]:
    x = torch.from_numpy(
        examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout, seed=11))
    )
    return examples.efficientnet_lite0().eval(), [x[i : i + 1] for i in range(len(x))]


def _minilm(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Any]]:
    data = examples.sentences(args.train + args.holdout)
    return (
        examples.minilm_l6(),
        [[torch.from_numpy(s["input_ids"]), torch.from_numpy(s["attention_mask"])] for s in data],
    )


def _stack(samples: list[Any], index: np.ndarray) -> Batch:
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return [torch.cat([samples[i] for i in index])]
    return [torch.cat([samples[i][k] for i in index]) for k in range(len(first))]


def _register_conv_subclasses(model: torch.nn.Module) -> list[str]:
    """ModelOpt replaces modules by exact class: a Conv2d subclass (EfficientNet-Lite0's
    Conv2dStaticSamePadding, all 49 of its convs) is left unquantized unless registered, and before this the
    "ModelOpt QAT" rows measured a model with only its classifier quantized (3 of 103 quantizers enabled)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_conv import _QuantConv2d

    classes = {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)} - {torch.nn.Conv2d}
    for cls in sorted(classes, key=lambda c: c.__name__):
        if cls not in QuantModuleRegistry:
            QuantModuleRegistry.register({cls: cls.__name__})(_QuantConv2d)
    return sorted(c.__name__ for c in classes)


def _enabled_quantizers(model: torch.nn.Module) -> int:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return sum(1 for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled)


def _scores(model_kind: str, ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    if model_kind == "efficientnet":
        return {
            "top1": float((ref.argmax(1) == out.argmax(1)).mean()),
            "kl": metrics.kl_divergence(metrics.softmax(ref), metrics.softmax(out)),
        }
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    return {"cosine": float(cos.mean()), "worst_cosine": float(cos.min())}


def main() -> None:
    import modelopt.torch.quantization as mtq

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("efficientnet", "minilm"), default="efficientnet")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss", choices=("kl", "mse"), default="kl", help="as `trtbuild qat --loss`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load: Callable[[argparse.Namespace], tuple[torch.nn.Module, list[Any]]] = (
        _efficientnet if args.model == "efficientnet" else _minilm
    )
    teacher, samples = load(args)
    order = np.random.default_rng(0).permutation(len(samples))  # CalibrationData.split(holdout, seed=0)
    held_idx, train_idx = np.sort(order[: args.holdout]), np.sort(order[args.holdout :])
    held = [_stack(samples, held_idx[i : i + 8]) for i in range(0, len(held_idx), 8)]
    train = [samples[i] for i in train_idx]
    student = copy.deepcopy(teacher)

    def run(model: torch.nn.Module, batches: list[Batch]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(*b) for b in batches])

    train_batches = [_stack(train, np.arange(i, min(i + 8, len(train)))) for i in range(0, len(train), 8)]
    ref = run(teacher, held).numpy()
    targets = run(teacher, train_batches)

    def calibrate(model: torch.nn.Module) -> None:
        run(model, train_batches)

    start = time.perf_counter()
    quantized_convs = _register_conv_subclasses(student)
    mtq.quantize(student, mtq.INT8_DEFAULT_CFG, forward_loop=calibrate)
    enabled = _enabled_quantizers(student)
    student.eval()
    before = _scores(args.model, ref, run(student, held).numpy())
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        index = torch.randperm(len(train), generator=gen)[: args.batch_size].numpy()
        out, t = student(*_stack(train, index)), targets[index]
        if args.model == "efficientnet" and args.loss == "kl":
            loss = torch.nn.functional.kl_div(
                out.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean"
            )
        else:
            loss = ((out - t) ** 2).mean() / (t**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _scores(args.model, ref, run(student, held).numpy())
    print(
        json.dumps(
            {
                "model": args.model,
                "held_out": len(held_idx),
                "modelopt_ptq": before,
                "modelopt_qat": after,
                "enabled_quantizers": enabled,
                "registered_conv_classes": quantized_convs,
                "steps": args.steps,
                "seconds": time.perf_counter() - start,
            }
        )
    )


if __name__ == "__main__":
    main()
