"""Calibration speed and memory: trtbuild (entropy) vs ONNX Runtime's entropy calibrator, side by side.

Same model (EfficientNet-Lite0, FP32 ONNX), same real photos decoded by the same code, same batch size and
thread count. What is timed for ONNX Runtime is its calibration part only, what `quantize_static` runs
before it writes Q/DQ: `create_calibrator(..., CalibrationMethod.Entropy)` + `collect_data()` +
`compute_data()`, calibrating the tensors of Conv/ConvTranspose/Gemm/MatMul (fewer tensors than
quantize_static's default, which favours ONNX Runtime). Ours: `collect()` + `compute_ranges("entropy")`.
Each run is a fresh subprocess, so peak RSS (ru_maxrss) is per run; speed runs are repeated, interleaved,
and the best of each is compared (the machine is shared).

    python3 bench/bench_calibration.py [--samples 64] [--large 512] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run_ours(model: str, data: str, samples: int, batch_size: int, threads: int) -> dict[str, Any]:
    from calibrators.calibrate import collect, compute_ranges

    start = time.perf_counter()
    collection = collect(
        model, data, batch_size=batch_size, threads=threads, samples=samples, show_progress=False
    )
    ranges = compute_ranges(collection, "entropy")
    seconds = time.perf_counter() - start
    minmax = compute_ranges(collection, "minmax")
    return {
        "seconds": seconds,
        "tensors": len(ranges),
        "amax": {n: r.amax for n, r in ranges.items()},
        "minmax": {n: r.amax for n, r in minmax.items()},
    }


def _run_ort(model: str, data: str, samples: int, batch_size: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    from calibrators.data import model_inputs, open_data

    calibration = open_data(data, model_inputs(model)).sample(samples)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = calibration.batches(batch_size)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            model,
            ["Conv", "ConvTranspose", "Gemm", "MatMul"],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
        )
        options = ort.SessionOptions()  # same settings ORT uses, with our thread count
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = threads
        calibrator.infer_session = ort.InferenceSession(
            calibrator.augmented_model_path, options, providers=["CPUExecutionProvider"]
        )
        calibrator.collect_data(Reader())
        result = calibrator.compute_data()
    seconds = time.perf_counter() - start
    amax = {}
    for name, value in result.data.items():
        lo, hi = value.range_value
        amax[name] = float(max(abs(float(lo)), abs(float(hi))))
    return {"seconds": seconds, "tensors": len(amax), "amax": amax}


def _child(args: argparse.Namespace) -> None:
    run = _run_ours if args.child == "ours" else _run_ort
    result = run(args.model, args.data, args.samples, args.batch_size, args.threads)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _spawn(kind: str, model: Path, data: Path, samples: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        str(model),
        "--data",
        str(data),
        "--samples",
        str(samples),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _prepare(folder: Path, count: int) -> Path:
    import torch

    from trtbuild import examples

    model_path = folder / "efficientnet_lite0.onnx"
    torch.onnx.export(
        examples.efficientnet_lite0(),
        (torch.zeros(1, 3, 224, 224),),
        str(model_path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    examples.write_photo_folder(folder / "photos", count)
    return model_path


def _short(name: str, width: int = 44) -> str:
    return name if len(name) <= width else name[: width // 2 - 2] + "…" + name[-(width // 2 + 1) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="samples for the speed comparison")
    parser.add_argument("--large", type=int, default=512, help="samples for the memory-flatness run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs per speed measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ort-large", action="store_true", help="also run ORT at --large samples (~35 GB RSS at 512)"
    )
    parser.add_argument("--child", choices=["ours", "ort"])
    parser.add_argument("--model")
    parser.add_argument("--data")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = _prepare(folder, max(args.samples, args.large))
        data = folder / "photos"
        # Interleaved repeats, best time of each: the machine is shared, so load varies run to run.
        ours_runs, ort_runs = [], []
        for _ in range(args.repeat):
            ours_runs.append(_spawn("ours", model, data, args.samples, args))
            ort_runs.append(_spawn("ort", model, data, args.samples, args))
        ours = min(ours_runs, key=lambda r: r["seconds"])
        ort_small = min(ort_runs, key=lambda r: r["seconds"])
        print(
            "  all runs (s): trtbuild "
            + ", ".join(f"{r['seconds']:.2f}" for r in ours_runs)
            + "; ORT "
            + ", ".join(f"{r['seconds']:.2f}" for r in ort_runs)
        )
        ours_large = _spawn("ours", model, data, args.large, args)
        ort_large = None if not args.ort_large else _spawn("ort", model, data, args.large, args)

    print(
        f"EfficientNet-Lite0, real photos, batch {args.batch_size}, {args.threads} threads, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'run':<42}{'seconds':>10}{'peak RSS MB':>14}{'tensors':>9}")
    rows = [
        (f"trtbuild entropy, {args.samples} samples", ours),
        (f"ORT Entropy calibrator, {args.samples} samples", ort_small),
        (f"trtbuild entropy, {args.large} samples", ours_large),
    ]
    if ort_large:
        rows.append((f"ORT Entropy calibrator, {args.large} samples", ort_large))
    for label, result in rows:
        print(f"{label:<42}{result['seconds']:>10.2f}{result['peak_rss_mb']:>14.0f}{result['tensors']:>9}")
    print()
    print("ratios")
    print(
        f"  speed, ORT / trtbuild at {args.samples} samples:          "
        f"{ort_small['seconds'] / ours['seconds']:.2f}x"
        "  (goal >= 3x)"
    )
    if ort_large:
        print(
            f"  speed, ORT / trtbuild at {args.large} samples:         "
            f"{ort_large['seconds'] / ours_large['seconds']:.2f}x"
        )
    print(
        f"  trtbuild peak memory, {args.large} / {args.samples} samples:      "
        f"{ours_large['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x  (goal <= 1.3x)"
    )
    if ort_large:
        print(
            f"  ORT peak memory, {args.large} / {args.samples} samples:           "
            f"{ort_large['peak_rss_mb'] / ort_small['peak_rss_mb']:.2f}x"
        )
    print(
        f"  peak memory, ORT / trtbuild at {args.samples} samples:    "
        f"{ort_small['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x"
    )
    print()
    print(f"amax on a few tensors ({args.samples} samples): ORT's entropy defaults vs ours")
    print(f"  {'tensor':<44}{'ORT entropy':>12}{'ours minmax':>12}{'ours entropy':>13}")
    shared = [n for n in ours["amax"] if n in ort_small["amax"]]
    widest = sorted(shared, key=lambda n: -ours["minmax"][n])[:4]
    for name in [*[n for n in shared if n not in widest][:4], *widest]:  # first 4 in graph order, 4 widest
        print(
            f"  {_short(name):<44}{ort_small['amax'][name]:>12.4f}{ours['minmax'][name]:>12.4f}"
            f"{ours['amax'][name]:>13.4f}"
        )
    same = sum(
        abs(ort_small["amax"][n] - ours["minmax"][n]) <= 1e-3 * max(ours["minmax"][n], 1e-6) for n in shared
    )
    print(f"  ORT entropy equals min/max on {same} of {len(shared)} shared tensors")
    clipped = sum(ours["amax"][n] < 0.95 * ours["minmax"][n] for n in ours["amax"])
    print(f"  our entropy clips below 95 % of min/max on {clipped} of {len(ours['amax'])} tensors")


if __name__ == "__main__":
    main()
