"""FP8 (E4M3) quantization, side by side in one run, on the same models, calibration and held-out data:

* trtbuild FP8 (TensorRT's FP8 placement, docs/fp8.md), the default pipeline (mse ranges on the FP8 grid,
  bias correction, the residual-skip rule) and the other range methods on the FP8 grid;
* trtbuild INT8, the default pipeline as `trtbuild quantize` runs it (SmoothQuant auto with its cross-fitted
  alpha, mse ranges, bias correction, TensorRT graph);
* NVIDIA ModelOpt 0.47 ONNX PTQ ``quantize_mode="fp8"`` (max and entropy calibration, FP32 high precision),
  in its own venv via bench/modelopt_quantize.py (its calibration runs on ORT's CPU provider: no GPU needed).

Every graph is evaluated here, in the main environment, with reference Q/DQ semantics (exact FP8/INT8
rounding, float math: what TensorRT builds from the graph), on EfficientNet-Lite0, MiniLM-L6 and the
PP-OCRv4 DBNet detector (data and pipelines: bench/fp8_models.py; 64 held-out samples each).

Run: python3 bench/bench_fp8.py [--models effnet,minilm,dbnet] [--modelopt max,entropy]
(`--models mpnet`: all-mpnet-base-v2 from its PyPI wheels, bench/mpnet_model.py; not in the default run)
(1 thread; about 20 minutes on 2 cores, most of it ModelOpt's DBNet rows)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "calibrators"))

import bench_quantize as bq  # noqa: E402
import fp8_models as fm  # noqa: E402

from calibrators import fidelity  # noqa: E402
from calibrators.methods import DEFAULT_METHOD  # noqa: E402

OURS_FP8 = f"trtbuild FP8 {DEFAULT_METHOD} (default)"
OURS_INT8 = f"trtbuild INT8 {DEFAULT_METHOD} (default pipeline)"
MODELOPT_FP8 = "NVIDIA ModelOpt FP8"
Row = tuple[onnx.ModelProto | str, float, float, int | str]  # graph or why not, wall s, CPU s, layers
FP8_METHODS = (DEFAULT_METHOD, "minmax", "entropy", "percentile")


def ours(bench: fm.BenchModel, learned: bool, fp8_methods: tuple[str, ...] = FP8_METHODS) -> dict[str, Row]:
    """Our rows: one calibration per precision (the INT8 one on the smoothed graph), then each method;
    ``learned``: also FP8 and INT8 with learned rounding (`--rounding learned`, 110 s budget each)."""
    rows: dict[str, Row] = {}
    for precision, methods in (
        ("int8", (DEFAULT_METHOD,)),
        ("fp8", fp8_methods),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        prepared = fm.prepare(bench, precision)
        prep_wall, prep_cpu = time.perf_counter() - wall, time.process_time() - cpu
        for method in methods:
            wall, cpu = time.perf_counter(), time.process_time()
            qmodel, plan = fm.quantize_graph(prepared, precision, method)
            name = (
                OURS_INT8
                if precision == "int8"
                else OURS_FP8
                if method == DEFAULT_METHOD
                else f"trtbuild FP8 {method}"
            )
            rows[name] = (
                qmodel,
                prep_wall + time.perf_counter() - wall,
                prep_cpu + time.process_time() - cpu,
                len(plan.quantized_nodes),
            )
        if learned:
            wall, cpu = time.perf_counter(), time.process_time()
            qmodel, plan = fm.learned_graph(prepared, bench, precision)
            rows[f"trtbuild {precision.upper()} {DEFAULT_METHOD} + learned rounding"] = (
                qmodel,
                prep_wall + time.perf_counter() - wall,
                prep_cpu + time.process_time() - cpu,
                len(plan.quantized_nodes),
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(fm.DEFAULT_MODELS), help=f"of {', '.join(fm.MODELS)}")
    parser.add_argument("--fp8-methods", default=",".join(FP8_METHODS), help="FP8 range methods (ours)")
    parser.add_argument("--modelopt", default=",".join(bq.MODELOPT_METHODS), help="'' to skip ModelOpt")
    parser.add_argument("--learned", action="store_true", help="add the learned-rounding rows (INT8, FP8)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started, started_cpu = time.perf_counter(), time.process_time()
    tmp = Path(tempfile.mkdtemp(prefix="bench_fp8_"))
    table = Table(
        title="FP8 vs INT8 fidelity vs FP32 on held-out samples (same model, calibration and held-out data)",
        caption="every graph measured with reference Q/DQ semantics (exact rounding, float math); 1 thread; "
        "ModelOpt's CPU seconds are its subprocess's wall",
    )
    columns = ("model", "calib / held-out", "quantizer", "layers", "fidelity", "SQNR dB", "wall s", "CPU s")
    for col in columns:
        table.add_column(col)
    summary: list[str] = []
    for key in args.models.split(","):
        loader, n_calib, n_held = fm.MODELS[key]
        bench = loader(tmp, n_calib, n_held)
        bq.console.print(f"[bold]{bench.label}[/bold] ...")
        held_batches = bench.held_batches()
        reference = fidelity.run_batches(fidelity.session(bench.model, 1), held_batches)
        kinds = fidelity.decide_kinds(bench.model, reference)
        rows = ours(bench, args.learned, tuple(filter(None, args.fp8_methods.split(","))))
        for method in filter(None, args.modelopt.split(",")):
            qmodel_or_why, seconds = modelopt_fp8(bench.path, bench.calib, tmp, method)
            q_nodes = "-"
            if not isinstance(qmodel_or_why, str):
                q_nodes = f"{sum(n.op_type == 'QuantizeLinear' for n in qmodel_or_why.graph.node)} Q"
            rows[f"{MODELOPT_FP8} {method} (fp32 high prec.)"] = (qmodel_or_why, seconds, seconds, q_nodes)
        scores: dict[str, tuple[str, float, float]] = {}
        split = f"{len(bench.calib)} / {len(bench.held)}"
        for name, (result, seconds, cpu, layers) in rows.items():
            if isinstance(result, str):
                table.add_row(bench.label, split, name, str(layers), result, "-", f"{seconds:.1f}", "-")
                continue
            test = fidelity.run_batches(fidelity.session(result, 1), held_batches)
            report = fidelity.compare(reference, test, kinds=kinds)
            cos = report.outputs[0].cosine
            scores[name] = (*bq.score(report), cos)
            table.add_row(
                bench.label,
                split,
                name,
                str(layers),
                f"{bq.metric(report)} (1-cos {1 - cos:.2e})",
                f"{report.outputs[0].sqnr_db:.1f}",
                f"{seconds:.1f}",
                f"{cpu:.1f}",
            )
        summary.append(summary_line(bench.label, scores))
    bq.console.print(table)
    bq.console.print("[bold]Ours FP8 (default method) vs ours INT8 and the best ModelOpt FP8 row[/bold]")
    for line in summary:
        bq.console.print(line, soft_wrap=True)
    bq.console.print(
        f"total {time.perf_counter() - started:.0f} s wall, {time.process_time() - started_cpu:.0f} s CPU "
        "(this process)"
    )


def modelopt_fp8(
    path: Path, calib: list[bq.Sample], tmp: Path, method: str
) -> tuple[onnx.ModelProto | str, float]:
    """ModelOpt's ONNX FP8 PTQ through bench/modelopt_quantize.py --mode fp8 (its own venv)."""
    import json
    import subprocess

    import numpy as np

    if not bq.MODELOPT_PYTHON.exists():
        return f"skipped: {bq.MODELOPT_PYTHON.relative_to(bq.REPO)} not found", 0.0
    data = tmp / f"{path.stem}.calib.npz"
    arrays = bq.stack(calib)[0]
    np.savez(data, **arrays)  # type: ignore[arg-type]
    out = tmp / f"{path.stem}.modelopt_fp8_{method}.onnx"
    start = time.perf_counter()
    command = [str(bq.MODELOPT_PYTHON), str(bq.MODELOPT_SCRIPT), str(path), str(data), str(out)]
    try:
        done = subprocess.run(
            [*command, "--method", method, "--mode", "fp8"],
            capture_output=True,
            text=True,
            timeout=bq.MODELOPT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"skipped: ModelOpt ran past {bq.MODELOPT_TIMEOUT_S} s", time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {done.returncode}): {last[:90]}", time.perf_counter() - start
    return onnx.load(str(out)), float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def summary_line(label: str, scores: dict[str, tuple[str, float, float]]) -> str:
    """Ours FP8 vs ours INT8 and the best ModelOpt row, by the model's metric (cosine shown always)."""
    if OURS_FP8 not in scores:
        return f"{label}: ours FP8 failed"

    def show(row: tuple[str, float, float]) -> str:
        kind, value, cos = row
        return f"top-1 {value:.1%} / cos {cos:.4f}" if kind == "top-1" else f"cos {cos:.4f}"

    parts = [f"{label}: ours FP8 {show(scores[OURS_FP8])}"]
    if OURS_INT8 in scores:
        parts.append(f"ours INT8 {show(scores[OURS_INT8])}")
    peers = {k: v for k, v in scores.items() if k.startswith(MODELOPT_FP8)}
    if peers:
        best = max(peers, key=lambda k: (peers[k][1], peers[k][2]))
        parts.append(f"best ModelOpt FP8 ({best.removeprefix(MODELOPT_FP8 + ' ')}) {show(peers[best])}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
