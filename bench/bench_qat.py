"""QAT and 2:4 sparsity on EfficientNet-Lite0 (INT8 QAT on MiniLM-L6 with `--model minilm`), side by side
in one run on the same photos and threads:
FP32 / our best PTQ INT8 (`quantize` defaults) / QAT INT8 / 2:4 FP32 (recovered) / 2:4 + INT8, with
top-1 agreement vs FP32 on the same held-out photo crops, the compressed size of each deployable file
(zlib -9 of the ONNX: what a tar.gz bundle carries -- not the packed 2:4 format TensorRT stores in an
engine; bench/bench_sparsity_prune.py estimates that one), eligible 2:4 layers and wall time.
The held-out crops also pick the best training step (early stopping), so they are not an unseen test set;
the next --test crops are (top-1 / KL on them, and FP32's top-1 minus top-2 probability on each miss).

Run: python3 bench/bench_qat.py [--steps 30] [--train 128] [--holdout 128] [--skip-sparse] [--out result.json]
     [--only-sparse] [--sparse-steps N] [--sparse-budget KL [--sparse-max-dense WEIGHTS]]
     (--only-sparse: FP32 / dense INT8 PTQ / 2:4 / 2:4 + INT8, every graph scored on the held-out and
     --test crops with decisive and raw top-1; qat's sparse options)
     [--test 128] [--eval-every 10] [--augment auto] [--schedule cosine]   (qat's QAT data / lr options)
     [--margin-term margin --margin-weight 1 --select top1-kl] [--select-on graph] [--skip-modelopt]
     (qat's top-1 options)
     python3 bench/bench_qat.py --model minilm --steps 200 --lr 1e-5 --train 128 --holdout 64
Every row reports KL (top-1 alone ties at 100 % on these crops) or, for MiniLM, mean / worst cosine.
QAT starts from learned-rounding PTQ (trtbuild/qat/ptq_start.py) and distills with KL on the logits; the
"seconds" of each row are wall seconds, "cpu_s" CPU seconds of this process (ModelOpt: of its subprocess).
ModelOpt's torch QAT (same crops, split, loss, optimizer and steps) runs from .venv-modelopt through
bench/modelopt_qat.py; its row says "skipped" without that venv. ModelOpt's sparsity: bench_sparsity_peer.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrators.quantize import quantize  # noqa: E402
from calibrators.sparsity import analyze  # noqa: E402
from trtbuild import examples  # noqa: E402
from trtbuild.qat import qat  # noqa: E402


def compressed_mib(path: Path) -> float:
    return len(zlib.compress(path.read_bytes(), 9)) / 2**20


def progress(stage: str, step: int, total: int, loss: float, evaluation: Any) -> None:
    if evaluation is not None:
        print(f"  {stage} {step}/{total} loss {loss:.4g} held-out {evaluation.summary}", file=sys.stderr)


def top1(report: Any) -> float:
    return float(report.outputs[0].top1_agreement)


def scores(report: Any) -> dict[str, Any]:
    """Top-1 (decided on the non-near-tie crops when the report set near-ties aside, as the gate does),
    raw top-1 on every crop, near-tie count and KL; or cosines for an embedding."""
    o = report.outputs[0]
    if o.top1_agreement is not None:
        raw = o.top1_agreement if o.raw_top1 is None else o.raw_top1
        return {"top1": o.top1_agreement, "raw_top1": raw, "near_ties": len(o.near_ties), "kl": o.kl}
    return {"cosine": o.cosine, "worst_cosine": o.min_cosine}


def modelopt_row(args: argparse.Namespace) -> dict[str, Any] | str:
    import subprocess

    python = Path(__file__).resolve().parents[1] / ".venv-modelopt" / "bin" / "python"
    if not python.exists():
        return "skipped: no .venv-modelopt (setup in README)"
    script = Path(__file__).with_name("modelopt_qat.py")
    cmd = [
        str(python),
        str(script),
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--train",
        str(args.train),
    ]
    cmd += ["--threads", str(args.threads), "--lr", str(args.lr)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run([*cmd, "--holdout", str(args.holdout)], capture_output=True, text=True)
    if run.returncode != 0:
        return f"failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=128)
    parser.add_argument("--model", choices=("efficientnet", "minilm"), default="efficientnet")
    parser.add_argument("--test", type=int, default=64, help="unseen crops / sentences")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--patience", type=int, default=10, help="qat's --patience (CLI default: 3)")
    parser.add_argument("--augment", choices=("auto", "off"), default="off", help="qat's --augment")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="constant", help="qat's")
    parser.add_argument("--margin-term", choices=("none", "margin", "topk"), default=None, help="qat's")
    parser.add_argument("--margin-weight", type=float, default=None, help="qat's --margin-weight")
    parser.add_argument("--select", choices=("kl", "top1-kl"), default=None, help="qat's --select")
    parser.add_argument("--select-on", choices=("student", "graph"), default=None, help="qat's")
    parser.add_argument("--skip-modelopt", action="store_true", help="no ModelOpt QAT row")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for ours and ModelOpt alike")
    parser.add_argument("--lr", type=float, default=2e-6, help="weight learning rate, ours and ModelOpt's")
    parser.add_argument("--skip-sparse", action="store_true", help="only the INT8 rows (and ModelOpt)")
    parser.add_argument("--only-sparse", action="store_true", help="FP32 + the 2:4 rows only (no QAT/PTQ)")
    parser.add_argument("--sparse-steps", type=int, default=None, help="2:4 recovery steps [--steps]")
    parser.add_argument("--sparse-budget", type=float, default=None, help="qat's sparse_budget [none]")
    parser.add_argument("--sparse-max-dense", type=int, default=None, help="qat's sparse_max_dense [none]")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.model == "minilm":
        return minilm(args)
    # The first train + holdout crops as before; the next --test crops (other crops of the same photos)
    # neither train nor pick the step: an unseen test split.
    every = examples.normalize_imagenet(examples.photo_crops(args.train + args.holdout + args.test, seed=11))
    x, unseen = every[: args.train + args.holdout], every[args.train + args.holdout :]
    samples = [{"images": x[i : i + 1]} for i in range(len(x))]
    tmp = Path(tempfile.mkdtemp(prefix="bench-qat-"))
    common: dict[str, Any] = {
        "inputs": ["images:1x3x224x224"],
        "data": samples,
        "holdout": args.holdout,
        "output_names": ["logits"],
        "min_fidelity": "0.5",
        "eval_every": args.eval_every,
        "batch_size": 8,
        "dynamic_batch": True,
        "steps": args.steps,
        "lr": args.lr,
        "patience": args.patience,
        "on_step": progress,
        "augment": args.augment,
        "schedule": args.schedule,
    }
    for option in ("margin_term", "margin_weight", "select", "select_on"):  # qat's defaults unless given
        if getattr(args, option) is not None:
            common[option] = getattr(args, option)
    if args.only_sparse:
        _only_sparse(args, common, tmp, unseen)
        return
    start, cpu0 = time.perf_counter(), time.process_time()
    q = qat(examples.efficientnet_lite0(), out_dir=tmp / "qat", **common)
    qat_s, qat_cpu = time.perf_counter() - start, time.process_time() - cpu0
    print(f"QAT done in {qat_s:.0f}s", file=sys.stderr)
    # Our best PTQ: `quantize` with its defaults (MSE ranges, bias correction) on the original FP32 export
    # (the teacher), on the same samples, split and seed -> the same held-out crops.
    fp32 = tmp / "fp32" / "efficientnet_lite0.onnx"
    from export.pipeline import export_model

    export_model(
        examples.efficientnet_lite0(),
        ["images:1x3x224x224"],
        fp32,
        dynamic_batch=True,
        output_names=["logits"],
    )
    start, cpu0 = time.perf_counter(), time.process_time()
    ptq = quantize(
        fp32, samples, tmp / "ptq", holdout=args.holdout, min_fidelity="0.5", show_progress=False, threads=1
    )
    ptq_s, ptq_cpu = time.perf_counter() - start, time.process_time() - cpu0
    on_unseen = _unseen_scorer(fp32, unseen)
    rows = [
        {"model": "FP32", "top1": 1.0, "size_mib": compressed_mib(fp32), "seconds": None},
        {
            "model": "INT8 PTQ (quantize defaults)",
            "top1": top1(ptq.fidelity),
            **scores(ptq.fidelity),
            **on_unseen(ptq.onnx_path),
            "size_mib": compressed_mib(ptq.onnx_path),
            "seconds": ptq_s,
            "cpu_s": ptq_cpu,
        },
        {
            "model": "INT8 PTQ, learned rounding (QAT's start)",
            "top1": top1(q.ptq),
            **scores(q.ptq),
            "size_mib": None,
            "seconds": None,
        },
        {
            "model": f"INT8 QAT ({args.steps} steps)",
            "top1": top1(q.qat),
            **scores(q.qat),
            **on_unseen(q.quantized.onnx_path),
            "size_mib": compressed_mib(q.quantized.onnx_path),
            "seconds": qat_s,
            "cpu_s": qat_cpu,
        },
    ]
    report: dict[str, Any] = {
        "modelopt": "skipped (--skip-modelopt)" if args.skip_modelopt else modelopt_row(args),
        "held_out": args.holdout,
        "train": args.train,
        "unseen": len(unseen),
        "margin": {
            k: common[k] for k in ("margin_term", "margin_weight", "select", "select_on") if k in common
        },
        "steps": args.steps,
        "augment": args.augment,
        "schedule": args.schedule,
        "rows": rows,
        "qat_history": [(e.step, e.summary) for e in q.training["qat"].history],
        "best_step": q.training["qat"].best_step,
        "out": str(tmp),
    }
    print(json.dumps(report, indent=2, default=str), file=sys.stderr)
    if not args.skip_sparse:
        start, cpu0 = time.perf_counter(), time.process_time()
        s = qat(examples.efficientnet_lite0(), out_dir=tmp / "sparse", **_sparse_options(args), **common)
        sparse_s, sparse_cpu = time.perf_counter() - start, time.process_time() - cpu0
        report.update(_sparse(s, sparse_s, sparse_cpu, rows))
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _unseen_scorer(fp32: Path, unseen: np.ndarray, prefix: str = "unseen") -> Any:
    """Top-1 / KL of a graph vs FP32 on the unseen crops (empty with --test 0), keys ``<prefix>_...``."""
    from calibrators import fidelity, near_ties

    batches = [{"images": unseen[i : i + 16]} for i in range(0, len(unseen), 16)]
    reference = fidelity.run_batches(fidelity.session(str(fp32)), batches) if batches else {}
    kinds = {}
    if batches:
        fp32_graph = onnx.load(str(fp32))
        decided = fidelity.decide_kinds(fp32_graph, reference)
        kinds = near_ties.attach(decided, fp32_graph, reference, batches)

    def on_unseen(path: Path) -> dict[str, Any]:
        if not batches:
            return {}
        out = fidelity.run_batches(fidelity.session(str(path)), batches)
        found = {f"{prefix}_{k}": v for k, v in scores(fidelity.compare(reference, out, kinds=kinds)).items()}
        # FP32's top-1 minus top-2 softmax probability on each crop INT8 labels differently: near-ties?
        ref, test = next(iter(reference.values())), next(iter(out.values()))
        prob = np.exp(ref - ref.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        top2 = np.sort(prob, axis=1)[:, -2:]
        missed = ref.argmax(1) != test.argmax(1)
        return {
            **found,
            f"{prefix}_miss_fp32_margins": [round(float(m), 3) for m in (top2[:, 1] - top2[:, 0])[missed]],
        }

    return on_unseen


def _sparse_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sparsity": "2:4",
        "sparse_steps": args.sparse_steps,
        "sparse_budget": args.sparse_budget,
        "sparse_max_dense": args.sparse_max_dense,
    }


def _only_sparse(args: argparse.Namespace, common: dict[str, Any], tmp: Path, unseen: np.ndarray) -> None:
    """FP32 / dense INT8 PTQ (`quantize` defaults) / 2:4 FP32 / 2:4 + INT8 (`qat --sparsity 2:4`): the
    issue's table. Every graph is scored on the same held-out crops (qat's seeded split) and the unseen
    ones, decisive and raw top-1 as the gate judges them, with its zlib -9 size."""
    from export.pipeline import export_model

    fp32 = tmp / "fp32" / "efficientnet_lite0.onnx"
    export_model(
        examples.efficientnet_lite0(),
        ["images:1x3x224x224"],
        fp32,
        dynamic_batch=True,
        output_names=["logits"],
    )
    samples = common["data"]
    order = np.random.default_rng(0).permutation(len(samples))  # CalibrationData.split(holdout, seed=0)
    held = np.concatenate([samples[i]["images"] for i in np.sort(order[: args.holdout])])
    on_held, on_unseen = _unseen_scorer(fp32, held, "held"), _unseen_scorer(fp32, unseen)

    def measured(path: Path) -> dict[str, Any]:
        raw = path.stat().st_size / 2**20
        return {**on_held(path), **on_unseen(path), "size_mib": compressed_mib(path), "raw_mib": raw}

    rows: list[dict[str, Any]] = [{"model": "FP32", **measured(fp32)}]
    start, cpu0 = time.perf_counter(), time.process_time()
    ptq = quantize(
        fp32, samples, tmp / "ptq", holdout=args.holdout, min_fidelity="0.5", show_progress=False, threads=1
    )
    ptq_cpu, ptq_s = time.process_time() - cpu0, time.perf_counter() - start
    rows.append({"model": "INT8 PTQ (quantize defaults)", **measured(ptq.onnx_path), "cpu_s": ptq_cpu})
    rows[-1]["seconds"] = ptq_s
    start, cpu0 = time.perf_counter(), time.process_time()
    s = qat(examples.efficientnet_lite0(), out_dir=tmp / "sparse", **_sparse_options(args), **common)
    sparse_s, sparse_cpu = time.perf_counter() - start, time.process_time() - cpu0
    report: dict[str, Any] = {
        "held_out": args.holdout,
        "train": args.train,
        "unseen": len(unseen),
        "steps": args.steps,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "rows": rows,
    }
    report.update(_sparse(s, sparse_s, sparse_cpu, rows))
    rows[-3].update(measured(s.onnx_path))  # 2:4 FP32 (recovered) as exported
    rows[-1].update(measured(s.quantized.onnx_path))  # 2:4 + INT8
    fp32_mib = rows[0]["size_mib"]
    for row in rows:
        if row.get("size_mib"):
            row["x_smaller"] = round(fp32_mib / row["size_mib"], 2)
    report["sparse_options"] = _sparse_options(args)
    report["qat_sparsity"] = s.to_json()["sparsity"]
    report["out"] = str(tmp)
    print(json.dumps(report, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def minilm(args: argparse.Namespace) -> None:
    """MiniLM-L6: `quantize` defaults (SmoothQuant auto, mse) vs `qat` from that PTQ (--start nearest: bias
    correction does not touch MatMul layers, so nearest *is* the default PTQ) vs ModelOpt's QAT."""
    from calibrators import fidelity
    from export.pipeline import export_model

    inputs = ["input_ids:1x32:int64", "attention_mask:1x32:int64"]
    every = examples.sentences(args.train + args.holdout + args.test)
    # --test sentences neither train nor pick the training step (the held-out ones do): an unseen test set.
    samples, unseen = every[: args.train + args.holdout], every[args.train + args.holdout :]
    tmp = Path(tempfile.mkdtemp(prefix="bench-qat-minilm-"))
    start, cpu0 = time.perf_counter(), time.process_time()
    q = qat(
        examples.minilm_l6(),
        inputs,
        samples,
        tmp / "qat",
        holdout=args.holdout,
        output_names=["embedding"],
        min_fidelity="0.9",
        eval_every=20,
        batch_size=8,
        dynamic_batch=True,
        steps=args.steps,
        lr=args.lr,
        step_lr=args.lr,
        patience=10,
        start="nearest",
        on_step=progress,
    )
    qat_s, qat_cpu = time.perf_counter() - start, time.process_time() - cpu0
    fp32 = tmp / "fp32" / "minilm.onnx"
    export_model(examples.minilm_l6(), inputs, fp32, dynamic_batch=True, output_names=["embedding"])
    start, cpu0 = time.perf_counter(), time.process_time()
    ptq = quantize(
        fp32, samples, tmp / "ptq", holdout=args.holdout, min_fidelity="0.9", show_progress=False, threads=1
    )
    ptq_s, ptq_cpu = time.perf_counter() - start, time.process_time() - cpu0
    batches = [
        {k: np.concatenate([s[k] for s in unseen[i : i + 16]]) for k in unseen[0]}
        for i in range(0, len(unseen), 16)
    ]

    def on_unseen(path: Path) -> dict[str, Any]:
        out = fidelity.run_batches(fidelity.session(str(path)), batches)
        return {f"unseen_{k}": v for k, v in scores(fidelity.compare(reference, out)).items()}

    reference = fidelity.run_batches(fidelity.session(str(fp32)), batches)
    rows = [
        {
            "model": "INT8 PTQ (quantize defaults)",
            **scores(ptq.fidelity),
            **on_unseen(ptq.onnx_path),
            "seconds": ptq_s,
            "cpu_s": ptq_cpu,
        },
        {"model": "INT8 PTQ inside qat (its start)", **scores(q.ptq)},
        {
            "model": f"INT8 QAT ({args.steps} steps)",
            **scores(q.qat),
            **on_unseen(q.quantized.onnx_path),
            "seconds": qat_s,
            "cpu_s": qat_cpu,
        },
    ]
    report = {
        "model": "minilm",
        "modelopt": modelopt_row(args),
        "held_out": args.holdout,
        "unseen": len(unseen),
        "train": args.train,
        "steps": args.steps,
        "lr": args.lr,
        "rows": rows,
        "qat_history": [(e.step, e.summary) for e in q.training["qat"].history],
        "best_step": q.training["qat"].best_step,
        "out": str(tmp),
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _sparse(s: Any, sparse_s: float, sparse_cpu: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The 2:4 rows (after the prune, after FP32 recovery, 2:4 + INT8 before and after QAT)."""
    sp = analyze(onnx.load(str(s.onnx_path))).to_json()
    sparse_fp32 = s.training["sparse"].history
    best = next(e for e in sparse_fp32 if e.step == s.training["sparse"].best_step)
    rows += [
        {
            "model": "2:4 FP32 after the re-fit prune (before recovery)",
            "top1": sparse_fp32[0].summary,
            "size_mib": None,
            "seconds": None,
        },
        {
            "model": f"2:4 FP32 (recovered; best held-out step {best.step})",
            "top1": best.summary,
            "size_mib": compressed_mib(s.onnx_path),
            "seconds": None,
        },
        {"model": "2:4 + INT8 PTQ (before QAT)", "top1": top1(s.ptq), "size_mib": None, "seconds": None},
        {
            "model": "2:4 + INT8 QAT",
            "top1": top1(s.qat),
            "kl": s.qat.outputs[0].kl,
            "size_mib": compressed_mib(s.quantized.onnx_path),
            "seconds": sparse_s,
            "cpu_s": sparse_cpu,
        },
    ]
    return {
        "eligible": {
            k: sp[k] for k in ("eligible_layers", "weighted_layers", "eligible_weights", "total_weights")
        },
        "sparse_fp32_history": [(e.step, e.summary) for e in sparse_fp32],
        "sparse_qat_history": [(e.step, e.summary) for e in s.training["qat"].history],
    }


if __name__ == "__main__":
    main()
