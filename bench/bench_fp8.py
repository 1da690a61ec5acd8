"""FP8 (E4M3) quantization, side by side in one run, on the same models, calibration and held-out data:

* trtbuild FP8 (TensorRT's FP8 placement, docs/fp8.md) with each range method on the FP8 grid;
* trtbuild INT8 (the default method, TensorRT graph);
* NVIDIA ModelOpt 0.47 ONNX PTQ ``quantize_mode="fp8"`` (max and entropy calibration, FP32 high precision),
  in its own venv via bench/modelopt_quantize.py (its calibration runs on ORT's CPU provider: no GPU needed).

Every graph is evaluated here, in the main environment, with reference Q/DQ semantics (exact FP8/INT8
rounding, float math: what TensorRT builds from the graph), on EfficientNet-Lite0, MiniLM-L6 and the
PP-OCRv4 DBNet detector (loaders shared with bench/bench_quantize.py).

Run: python3 bench/bench_fp8.py  (about 8-12 minutes on 2 cores)
"""

from __future__ import annotations

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

from calibrators import fidelity  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect  # noqa: E402
from calibrators.fp8 import FP8_OPSET  # noqa: E402
from calibrators.methods import DEFAULT_METHOD  # noqa: E402
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations  # noqa: E402
from calibrators.quantize import upgrade_opset  # noqa: E402

OURS_FP8 = f"trtbuild FP8 {DEFAULT_METHOD} (default)"
OURS_INT8 = f"trtbuild INT8 {DEFAULT_METHOD} (default)"
MODELOPT_FP8 = "NVIDIA ModelOpt FP8"


def ours(
    model: onnx.ModelProto, collection: object, method: str, precision: str
) -> tuple[onnx.ModelProto, int]:
    ranges = compute_ranges(collection, method, grid=precision)  # type: ignore[arg-type]
    plan = plan_qdq(model, ranges, QdqOptions(activation_type=precision))
    return apply_qdq(model, plan), len(plan.quantized_nodes)


def main() -> None:
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_fp8_"))
    table = Table(
        title="FP8 vs INT8 fidelity vs FP32 on held-out samples (same model, calibration and held-out data)",
        caption="every graph measured with reference Q/DQ semantics (exact rounding, float math)",
    )
    for col in ("model", "calib / held-out", "quantizer", "layers Q/DQ", "fidelity", "SQNR dB", "wall s"):
        table.add_column(col)
    summary: list[str] = []
    for label, build in (
        ("EfficientNet-Lite0", bq.effnet),
        ("MiniLM-L6 (sentence emb.)", bq.minilm),
        ("PP-OCRv4 det (DBNet)", bq.detector),
    ):
        bq.console.print(f"[bold]{label}[/bold] ...")
        path, calib, held = build(tmp)
        model = upgrade_opset(onnx.load(str(path)), FP8_OPSET)
        held_batches = bq.stack(held)
        reference = fidelity.run_batches(fidelity.session(model), held_batches)
        kinds = fidelity.decide_kinds(model, reference)
        start = time.perf_counter()
        collection = collect(model, calib, tensors=quantizable_activations(model), show_progress=False)
        collect_s = time.perf_counter() - start
        rows: dict[str, tuple[onnx.ModelProto | str, float, int | str]] = {}
        for precision, methods in (
            ("int8", (DEFAULT_METHOD,)),
            ("fp8", ("mse", "minmax", "entropy", "percentile")),
        ):
            for method in methods:
                start = time.perf_counter()
                qmodel, count = ours(model, collection, method, precision)
                name = (
                    OURS_FP8
                    if (precision, method) == ("fp8", DEFAULT_METHOD)
                    else OURS_INT8
                    if precision == "int8"
                    else f"trtbuild FP8 {method}"
                )
                rows[name] = (qmodel, collect_s + time.perf_counter() - start, count)
        for method in bq.MODELOPT_METHODS:
            qmodel_or_why, seconds = modelopt_fp8(path, calib, tmp, method)
            q_nodes = "-"
            if not isinstance(qmodel_or_why, str):
                q_nodes = f"{sum(n.op_type == 'QuantizeLinear' for n in qmodel_or_why.graph.node)} Q"
            rows[f"{MODELOPT_FP8} {method} (fp32 high prec.)"] = (qmodel_or_why, seconds, q_nodes)
        scores: dict[str, tuple[str, float]] = {}
        for name, (result, seconds, layers) in rows.items():
            if isinstance(result, str):
                table.add_row(
                    label, f"{len(calib)} / {len(held)}", name, str(layers), result, "-", f"{seconds:.1f}"
                )
                continue
            test = fidelity.run_batches(fidelity.session(result), held_batches)
            report = fidelity.compare(reference, test, kinds=kinds)
            scores[name] = bq.score(report)
            sqnr = f"{report.outputs[0].sqnr_db:.1f}"
            table.add_row(
                label,
                f"{len(calib)} / {len(held)}",
                name,
                str(layers),
                bq.metric(report),
                sqnr,
                f"{seconds:.1f}",
            )
        summary.append(summary_line(label, scores))
    bq.console.print(table)
    bq.console.print("[bold]Ours FP8 (default method) vs ours INT8 and the best ModelOpt FP8 row[/bold]")
    for line in summary:
        bq.console.print(line, soft_wrap=True)
    bq.console.print(f"total wall time {time.perf_counter() - started:.0f} s")


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


def summary_line(label: str, scores: dict[str, tuple[str, float]]) -> str:
    if OURS_FP8 not in scores:
        return f"{label}: ours FP8 failed"
    kind, value = scores[OURS_FP8]
    fmt = (lambda v: f"{v:.1%}") if kind == "top-1" else (lambda v: f"{v:.4f}")
    parts = [f"{label}: ours FP8 {kind} {fmt(value)}"]
    if OURS_INT8 in scores:
        parts.append(f"ours INT8 {fmt(scores[OURS_INT8][1])}")
    peers = {k: v for k, v in scores.items() if k.startswith(MODELOPT_FP8)}
    if peers:
        best = max(peers, key=lambda k: peers[k][1])
        parts.append(f"best ModelOpt FP8 ({best.removeprefix(MODELOPT_FP8 + ' ')}) {fmt(peers[best][1])}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
