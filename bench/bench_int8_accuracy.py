"""INT8 accuracy of weight rounding, side by side in one run (same model, calibration and held-out data,
same threads): EfficientNet-Lite0 from both torch exporters, 64 calibration / 64 held-out photo crops.

Rows: trtbuild (mse ranges) with round-to-nearest (with and without bias correction) and with learned
rounding (calibrators/adaround.py; bias correction only on layers it did not reach); Qualcomm AIMET
QuantSim + AdaRound (aimet-onnx in `.venv-aimet`, via bench/aimet_quantize.py); ONNX Runtime
quantize_static (Entropy, QDQ, per-channel); NVIDIA ModelOpt 0.47 (entropy, `.venv-modelopt`). Every
graph is judged here with reference Q/DQ semantics (the model, not this CPU's int8 kernels). Times: wall
seconds of each quantizer on this machine, and for learned rounding its process CPU seconds too (the
machine is shared; CPU seconds are what 2 free cores would need).

Run: python3 bench/bench_int8_accuracy.py [--aimet-iterations 300]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import modelopt_quantize, ort_static  # noqa: E402

from calibrators import adaround, fidelity  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect  # noqa: E402
from calibrators.qdq import GraphCache, QdqOptions, apply_qdq, plan_qdq, quantizable_activations  # noqa: E402
from trtbuild import examples  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)
console = Console(width=150)
Sample = dict[str, np.ndarray]
REPO = Path(__file__).resolve().parents[1]
AIMET_PYTHON = REPO / ".venv-aimet" / "bin" / "python"
SAMPLES = 64  # calibration and held-out, each


def export(exporter: str, out: Path) -> Path:
    import torch

    model = examples.efficientnet_lite0()
    if exporter == "dynamo":
        from export.pipeline import export_model

        return export_model(
            model,
            ["images:1x3x224x224"],
            out / "effnet_dynamo.onnx",
            dynamic_batch=True,
            output_names=["logits"],
        ).onnx_path
    path = out / "effnet_torchscript.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def aimet_adaround(path: Path, calib: list[Sample], tmp: Path, iterations: int) -> tuple[Any, float]:
    if not AIMET_PYTHON.exists():
        return "skipped: .venv-aimet not found (setup in tests/test_encodings_aimet.py)", 0.0
    data = tmp / f"{path.stem}.calib.npz"
    np.savez(data, images=np.concatenate([s["images"] for s in calib]))
    out = tmp / f"{path.stem}.aimet.onnx"
    script = REPO / "bench" / "aimet_quantize.py"
    cmd = [str(AIMET_PYTHON), str(script), str(path), str(data), str(out), "--iterations", str(iterations)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {done.returncode}): {last[:90]}", 0.0
    import json

    return onnx.load(str(out)), float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def judge(
    qmodel: onnx.ModelProto, held: list[Sample], reference: dict[str, np.ndarray]
) -> tuple[float, float]:
    out = fidelity.run_batches(fidelity.session(qmodel, 2), held)
    a, b = reference["logits"], out["logits"]
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.mean(a.argmax(1) == b.argmax(1))), float(np.mean(cos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aimet-iterations", type=int, default=300, help="AIMET AdaRound steps")
    parser.add_argument("--budget", type=float, default=adaround.AdaRoundConfig.budget_s, help="learning s")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_int8_accuracy_"))
    x = examples.normalize_imagenet(examples.photo_crops(2 * SAMPLES, seed=1))
    calib = [{"images": x[i : i + 8]} for i in range(0, SAMPLES, 8)]
    held = [{"images": x[i : i + 16]} for i in range(SAMPLES, 2 * SAMPLES, 16)]
    table = Table(title=f"EfficientNet-Lite0 INT8 vs FP32, {SAMPLES} calibration / {SAMPLES} held-out crops")
    for col in ("export", "quantizer", "top-1 agreement", "cosine", "wall s", "CPU s"):
        table.add_column(col)
    for exporter in args.exporters.split(","):
        path = export(exporter, tmp)
        model = onnx.load(str(path))
        cache = GraphCache(model)
        reference = fidelity.run_batches(fidelity.session(model, 2), held)
        start = time.perf_counter()
        collection = collect(
            model, calib, tensors=quantizable_activations(model), show_progress=False, threads=2
        )
        ranges = compute_ranges(collection, "mse")
        calib_s = time.perf_counter() - start
        rows: list[tuple[str, Any, float, float | None]] = []
        for bc in (True, False):
            plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=bc))
            rows.append(
                (f"trtbuild nearest{' + bias corr.' if bc else ''}", apply_qdq(cache, plan), calib_s, None)
            )
        plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False))
        wall, cpu = time.perf_counter(), time.process_time()
        learned = adaround.learn_rounding(
            cache, plan, calib, adaround.AdaRoundConfig(budget_s=args.budget), threads=2
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        # Bias correction stays on only where learning ran out of time (quantize() does the same).
        options = QdqOptions(bias_correction=True, learned_rounding=learned.decided)
        rows.append(
            ("trtbuild learned", apply_qdq(cache, plan_qdq(cache, ranges, options)), calib_s + wall, cpu)
        )
        sym = replace(adaround.AdaRoundConfig(budget_s=args.budget), asymmetric=False)
        learned_sym = adaround.learn_rounding(cache, plan, calib, sym, threads=2)
        options = QdqOptions(bias_correction=True, learned_rounding=learned_sym.decided)
        rows.append(
            ("trtbuild learned (W x_q target)", apply_qdq(cache, plan_qdq(cache, ranges, options)), 0.0, None)
        )
        aimet, aimet_s = aimet_adaround(path, calib, tmp, args.aimet_iterations)
        rows.append((f"AIMET QuantSim + AdaRound ({args.aimet_iterations} it.)", aimet, aimet_s, None))
        ort_model, ort_s = ort_static(
            path, [{"images": s["images"][i : i + 1]} for s in calib for i in range(8)], tmp, "Entropy"
        )
        rows.append(("ORT quantize_static Entropy", ort_model, ort_s, None))
        mo, mo_s = modelopt_quantize(path, calib, tmp, "entropy")
        rows.append(("NVIDIA ModelOpt entropy", mo, mo_s, None))
        for name, qmodel, seconds, cpu_s in rows:
            if isinstance(qmodel, str):
                table.add_row(exporter, name, qmodel, "", "", "")
                continue
            top1, cos = judge(qmodel, held, reference)
            table.add_row(
                exporter,
                name,
                f"{top1:.1%}",
                f"{cos:.4f}",
                f"{seconds:.1f}",
                "" if cpu_s is None else f"{cpu_s:.1f}",
            )
        console.print(
            f"{exporter}: learned rounding kept on {len(learned.weights)} of {len(learned.layers)} layers, "
            f"{len(learned.skipped)} out of time; {learned.seconds:.0f} s wall, {cpu:.0f} CPU s"
        )
    console.print(table)


if __name__ == "__main__":
    main()
