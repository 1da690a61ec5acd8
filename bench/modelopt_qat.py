"""ModelOpt's PyTorch QAT on EfficientNet-Lite0, run from .venv-modelopt by bench/bench_qat.py.

The same photo crops, the same train/held-out split (calibrators.data's seeded permutation), the same
distillation loss (KL on the logits, or --loss mse), optimizer, batch size and number of steps as
`trtbuild qat`; ModelOpt's INT8 default config (per-channel int8 weights, per-tensor int8 activations,
max calibration) on its own placement.
Prints one JSON line: top-1 agreement with FP32 on the held-out crops before and after training, evaluated
in PyTorch with ModelOpt's fake quantization (ModelOpt's own deployment path is its ONNX export).

Run: .venv-modelopt/bin/python bench/modelopt_qat.py --steps 30 --train 128 --holdout 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import modelopt.torch.quantization as mtq

    from trtbuild import examples

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss", choices=("kl", "mse"), default="kl", help="as `trtbuild qat --loss`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.from_numpy(
        examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout, seed=11))
    )
    order = np.random.default_rng(0).permutation(len(x))  # CalibrationData.split(holdout, seed=0)
    held = x[np.sort(order[: args.holdout])]
    train = x[np.sort(order[args.holdout :])]
    teacher = examples.efficientnet_lite0().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        ref = teacher(held).argmax(1)
        targets = torch.cat([teacher(train[i : i + 8]) for i in range(0, len(train), 8)])

    def calibrate(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(train), 8):
                model(train[i : i + 8])

    def top1(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(held).argmax(1) == ref).float().mean())

    start = time.perf_counter()
    mtq.quantize(student, mtq.INT8_DEFAULT_CFG, forward_loop=calibrate)
    student.eval()
    before = top1(student)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        index = torch.randperm(len(train), generator=gen)[: args.batch_size]
        out, t = student(train[index]), targets[index]
        if args.loss == "kl":
            loss = torch.nn.functional.kl_div(
                out.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean"
            )
        else:
            loss = ((out - t) ** 2).mean() / (t**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = top1(student)
    print(
        json.dumps(
            {
                "modelopt_ptq_top1": before,
                "modelopt_qat_top1": after,
                "steps": args.steps,
                "seconds": time.perf_counter() - start,
            }
        )
    )


if __name__ == "__main__":
    main()
