"""ModelOpt's 2:4 sparsity as a peer row for `trtbuild qat --sparsity 2:4` on EfficientNet-Lite0.

For each ModelOpt mode (bench/modelopt_sparsity.py, run from .venv-modelopt with the same crops, split and
calibration crops as bench/bench_qat.py --only-sparse): its FP32 2:4 ONNX scored here exactly as bench_qat
scores ours (held-out and unseen crops, decisive and raw top-1 with the gate's near-ties, KL, zlib -9 size),
ModelOpt's own INT8 PTQ in PyTorch (fake quant; raw top-1 and KL), and our `quantize` defaults on its
2:4 graph (2:4 + INT8 as a bundle ships it). CPU seconds of the ModelOpt subprocess are reported.

Run: python3 bench/bench_sparsity_peer.py [--modes sparse_magnitude,sparsegpt] [--holdout 64] [--test 64]
     [--no-register] (ModelOpt's default: only exact nn.Conv2d / nn.Linear, i.e. only the classifier here)
     [--steps 30 [--lr 1e-4]] (ModelOpt's sparsity-aware training after its masks: KL to the teacher on
     the training crops, its masks held; 0 = its one-shot masks alone)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_qat import _unseen_scorer, compressed_mib  # noqa: E402

from calibrators.quantize import quantize  # noqa: E402
from trtbuild import examples  # noqa: E402


def run_modelopt(args: argparse.Namespace, mode: str, out_dir: Path) -> dict[str, Any] | str:
    python = Path(__file__).resolve().parents[1] / ".venv-modelopt" / "bin" / "python"
    if not python.exists():
        return "skipped: no .venv-modelopt (setup in README)"
    cmd = [str(python), str(Path(__file__).with_name("modelopt_sparsity.py")), "--mode", mode]
    cmd += ["--train", str(args.train), "--holdout", str(args.holdout), "--test", str(args.test)]
    cmd += ["--threads", str(args.threads), "--out-dir", str(out_dir)]
    cmd += [] if args.no_register else ["--register-convs"]
    cmd += ["--steps", str(args.steps), "--lr", str(args.lr)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="sparse_magnitude,sparsegpt")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-register", action="store_true", help="ModelOpt's defaults (exact classes)")
    parser.add_argument("--steps", type=int, default=0, help="ModelOpt sparsity-aware training steps [0]")
    parser.add_argument("--lr", type=float, default=1e-4, help="its Adam lr (qat's --sparse-lr default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    every = examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout + args.test, seed=11))
    x, unseen = every[: args.train + args.holdout], every[args.train + args.holdout :]
    order = np.random.default_rng(0).permutation(len(x))  # CalibrationData.split(holdout, seed=0)
    held = x[np.sort(order[: args.holdout])]
    samples = [{"images": x[i : i + 1]} for i in range(len(x))]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sparsity-peer-"))
    from export.pipeline import export_model

    fp32 = tmp / "fp32" / "efficientnet_lite0.onnx"
    model = examples.efficientnet_lite0()
    export_model(model, ["images:1x3x224x224"], fp32, dynamic_batch=True, output_names=["logits"])
    on_held, on_unseen = _unseen_scorer(fp32, held, "held"), _unseen_scorer(fp32, unseen)
    fp32_mib = compressed_mib(fp32)

    def measured(path: Path) -> dict[str, Any]:
        size = compressed_mib(path)
        return {**on_held(path), **on_unseen(path), "size_mib": size, "x_smaller": round(fp32_mib / size, 2)}

    rows: list[dict[str, Any]] = [{"model": "FP32", **measured(fp32)}]
    for mode in [m for m in args.modes.split(",") if m]:
        peer = run_modelopt(args, mode, tmp / mode)
        if isinstance(peer, str):
            rows.append({"model": f"ModelOpt {mode}", "result": peer})
            continue
        onnx_path = Path(peer.pop("onnx"))
        trained = f"{args.steps} fine-tuning steps" if args.steps else "no training"
        rows.append({"model": f"ModelOpt {mode} 2:4 FP32 ({trained})", **peer, **measured(onnx_path)})
        start, cpu0 = time.perf_counter(), time.process_time()
        ptq = quantize(
            onnx_path, samples, tmp / f"{mode}-int8", holdout=args.holdout, min_fidelity="0.5",
            show_progress=False, threads=1,
        )  # fmt: skip
        rows.append(
            {
                "model": f"ModelOpt {mode} 2:4 + our INT8 PTQ (quantize defaults)",
                **measured(ptq.onnx_path),
                "cpu_s": round(time.process_time() - cpu0, 1),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-2:], default=str), file=sys.stderr, flush=True)
    report = {"held_out": args.holdout, "unseen": len(unseen), "train": args.train, "rows": rows}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
