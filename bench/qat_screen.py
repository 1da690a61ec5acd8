"""Screen QAT loss/step variants on EfficientNet-Lite0 from one captured start (torch fake-quant evaluation).

`qat()` runs as bench_qat.py calls it up to the QAT trainer (export, calibration, learned-rounding start
folded, fake quantizers installed); the start is captured there and every variant trains from a copy of
it, so the variants differ only in the loss / steps / lr. Each evaluation scores the held-out crops and
the unseen crops (decisive and raw top-1, KL) and lists the missed crops with their photo (crop i comes
from photo i % 17). A screen, not the bench: the shipped Q/DQ graph is scored by bench_qat.py.

Run: python3 bench/qat_screen.py --variants kl,kl+margin:1,kl+topk:1,klT:2 [--steps 30] [--eval-every 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from calibrators import fidelity, near_ties  # noqa: E402
from trtbuild import examples  # noqa: E402
from trtbuild.qat import losses, margin_loss, pipeline  # noqa: E402
from trtbuild.qat.train import TrainConfig, Trainer  # noqa: E402

PHOTOS = 17


class Captured(Exception):
    def __init__(self, trainer: Trainer) -> None:
        super().__init__("captured")
        self.trainer = trainer


class CaptureTrainer(Trainer):
    def fit(self, checkpoint: Any = None, resume: bool = False) -> Any:
        raise Captured(self)


def build_loss(spec: str, kinds: Any, names: list[str]) -> Any:
    """'kl', 'klT:2', 'kl+margin:1', 'kl+topk:0.5', 'klT:2+margin:1'."""
    parts = spec.split("+")
    temperature = float(parts[0].split(":")[1]) if parts[0].startswith("klT:") else 1.0
    fn = losses.kind_loss(kinds, names, temperature)
    for extra in parts[1:]:
        term, weight = extra.split(":")
        fn = margin_loss.with_margin(fn, kinds, names, term, float(weight))
    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="kl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-6)
    p.add_argument("--train", type=int, default=128)
    p.add_argument("--holdout", type=int, default=128)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--budget", type=float, default=None, help="learned-rounding CPU s budget")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    every = examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout + args.test, seed=11))
    x, unseen = every[: args.train + args.holdout], every[args.train + args.holdout :]
    samples = [{"images": x[i : i + 1]} for i in range(len(x))]
    index_of = {x[i].tobytes(): i for i in range(len(x))}
    original = pipeline.Trainer
    pipeline.Trainer = CaptureTrainer  # type: ignore[misc]
    t0, c0 = time.perf_counter(), time.process_time()
    extra: dict[str, Any] = {}
    if args.budget is not None:
        extra["rounding_budget_s"] = args.budget
    try:
        pipeline.qat(
            examples.efficientnet_lite0(),
            ["images:1x3x224x224"],
            samples,
            "/tmp/qat-screen-unused",
            holdout=args.holdout,
            output_names=["logits"],
            min_fidelity="0.5",
            batch_size=8,
            dynamic_batch=True,
            steps=args.steps,
            **extra,
        )
        raise SystemExit("qat finished without reaching the QAT trainer")
    except Captured as c:
        base = c.trainer
    finally:
        pipeline.Trainer = original  # type: ignore[misc]
    print(
        f"start captured in {time.process_time() - c0:.0f} CPU s / {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    held_x = np.concatenate([b["images"] for b in base.held])
    held_idx = [index_of[h.tobytes()] for h in held_x]
    train_n = base.train_count
    train = [{"images": base.train_stack["images"][i : i + 1]} for i in range(train_n)]
    unseen_batches = [{"images": unseen[i : i + 16]} for i in range(0, len(unseen), 16)]
    ref_unseen = base._run(base.teacher, unseen_batches)
    from export.pipeline import export_model

    fp32 = Path("/tmp/qat-screen-fp32/effnet.onnx")
    if not fp32.is_file():
        export_model(
            examples.efficientnet_lite0(),
            ["images:1x3x224x224"],
            fp32,
            dynamic_batch=True,
            output_names=["logits"],
        )
    import onnx

    graph = onnx.load(str(fp32))
    kinds_unseen = near_ties.attach(
        fidelity.decide_kinds(graph, ref_unseen), graph, ref_unseen, unseen_batches
    )
    start_student = copy.deepcopy(base.student.state_dict())
    start_extra = [q.detach().clone() for q in base.extra]
    names = list(base.output_names)
    ref_held = base.reference["logits"]
    report: dict[str, Any] = {"held_idx_photos": [i % PHOTOS for i in held_idx], "variants": {}}

    def score(trainer: Trainer, step: int) -> dict[str, Any]:
        held = trainer._run(trainer.student, trainer.held)
        un = trainer._run(trainer.student, unseen_batches)
        rh = fidelity.compare(trainer.reference, held, kinds=trainer.kinds).outputs[0]
        ru = fidelity.compare(ref_unseen, un, kinds=kinds_unseen).outputs[0]
        miss_h = np.nonzero(held["logits"].argmax(1) != ref_held.argmax(1))[0]
        miss_u = np.nonzero(un["logits"].argmax(1) != ref_unseen["logits"].argmax(1))[0]
        tied_h = set(trainer.kinds["logits"].ties.tied) if trainer.kinds["logits"].ties else set()
        tied_u = set(kinds_unseen["logits"].ties.tied) if kinds_unseen["logits"].ties else set()
        return {
            "step": step,
            "held": [round(float(v or 0), 5) for v in (rh.top1_agreement, rh.raw_top1, rh.kl)],
            "unseen": [round(float(v or 0), 5) for v in (ru.top1_agreement, ru.raw_top1, ru.kl)],
            "held_miss_decisive_photos": sorted(int(held_idx[i] % PHOTOS) for i in miss_h if i not in tied_h),
            "held_miss_tied": len([i for i in miss_h if i in tied_h]),
            "unseen_miss_decisive_photos": sorted(
                int((train_n + args.holdout + i) % PHOTOS) for i in miss_u if i not in tied_u
            ),
            "unseen_miss_tied": len([i for i in miss_u if i in tied_u]),
        }

    for spec in args.variants.split(","):
        base.student.load_state_dict(start_student)
        with torch.no_grad():
            for q, v in zip(base.extra, start_extra, strict=True):
                q.copy_(v)
        fn = build_loss(spec.split("@")[0], base.kinds, names)
        lr = float(spec.split("@")[1]) if "@" in spec else args.lr
        cfg = TrainConfig(args.steps, 8, lr, lr, args.eval_every, 100, 10_000, 0, "constant")
        curve: list[dict[str, Any]] = []
        trainer = Trainer(
            base.student, base.teacher, base.extra, train, base.held, ["images"], names, base.kinds, cfg,
            torch.device("cpu"), fn,
        )  # fmt: skip
        curve.append(score(trainer, 0))
        print(spec, curve[-1], file=sys.stderr)

        def on_step(
            step: int,
            total: int,
            loss: float,
            evaluation: Any,
            t: Trainer = trainer,
            c: list = curve,
            v: str = spec,
        ) -> None:
            if evaluation is not None:
                c.append(score(t, step))
                print(v, c[-1], file=sys.stderr, flush=True)

        trainer.on_step = on_step
        c1 = time.process_time()
        result = trainer.fit()
        report["variants"][spec] = {
            "curve": curve,
            "best_step_by_held_kl": result.best_step,
            "cpu_s": round(time.process_time() - c1, 1),
        }
        if args.out:
            args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
