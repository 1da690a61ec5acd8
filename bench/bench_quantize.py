"""INT8 quantization, side by side in one run, on the same models and data:

* fidelity vs FP32 on held-out samples (top-1 agreement for classifiers, cosine otherwise) of
  trtbuild (Q/DQ placement + our calibration) vs ONNX Runtime quantize_static (Entropy, QDQ, per-channel)
  vs NVIDIA ModelOpt 0.47 ONNX INT8 (entropy and max, FP32 high precision), which pins onnx~=1.21 /
  onnxruntime~=1.24 and so runs in its own venv `.venv-modelopt` via bench/modelopt_quantize.py in a
  subprocess (setup commands there; the rows say "skipped: <reason>" without it); every quantized
  model is evaluated here, in the main environment, on the same held-out data;
* ONNX Runtime CPU latency at batch 1 (1 thread): FP32 vs our INT8 (uint8 activations) vs ORT's QDQ output.

At the end, one line per model: ours (the default method) vs the best peer row.

Run: python3 bench/bench_quantize.py  (about 6-10 minutes on 2 cores)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "calibrators"))

from calibrators import fidelity, near_ties, ort_cpu, smoothquant  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect  # noqa: E402
from calibrators.methods import DEFAULT_METHOD  # noqa: E402
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations  # noqa: E402
from trtbuild import examples  # noqa: E402
from trtbuild.core import ort as ort_core  # noqa: E402

ort.set_default_logger_severity(3)
# quantize_static logs one root-logger warning per Conv bias on the detector; they bury the tables.
logging.getLogger().setLevel(logging.ERROR)
console = Console(width=140)
Sample = dict[str, np.ndarray]


def export_effnet(tmp: Path) -> Path:
    """EfficientNet-Lite0 through the TorchScript exporter, dynamic batch (the benches' common model)."""
    import torch

    path = tmp / "effnet.onnx"
    torch.onnx.export(
        examples.efficientnet_lite0(),
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def effnet(tmp: Path) -> tuple[Path, list[Sample], list[Sample]]:
    path = export_effnet(tmp)
    x = examples.normalize_imagenet(examples.photo_crops(64, seed=1))
    samples = [{"images": x[i : i + 1]} for i in range(len(x))]
    return path, samples[:32], samples[32:]


def minilm(tmp: Path) -> tuple[Path, list[Sample], list[Sample]]:
    from test_quantize_models import build_minilm_onnx  # the same export and sentences as the tests

    path, samples = build_minilm_onnx(tmp)
    return path, samples[:16], samples[16:]


def detector(tmp: Path) -> tuple[Path, list[Sample], list[Sample]]:
    from test_quantize_models import fetch_det_onnx, make_page_crops

    model = onnx.version_converter.convert_version(onnx.load(str(fetch_det_onnx())), 13)
    path = tmp / "det13.onnx"
    onnx.save(model, str(path))
    name = model.graph.input[0].name
    crops = make_page_crops()
    samples = [{name: crops[i : i + 1]} for i in range(len(crops))]
    return path, samples[:16], samples[16:]


def third_party(tmp: Path, member: str, width: int, calib: int) -> tuple[Path, list[Sample], list[Sample]]:
    """A PP-OCR ONNX file from the rapidocr wheel as a user has it (opset 11/12, unfused BatchNorm, Constant
    weights, exporter names), at opset 13 for per-channel Q/DQ, on text lines of the scanned page."""
    from test_quantize_models import fetch_rapidocr_onnx, make_text_lines

    model = onnx.version_converter.convert_version(onnx.load(str(fetch_rapidocr_onnx(member))), 13)
    path = tmp / f"{Path(member).stem}13.onnx"
    onnx.save(model, str(path))
    name = model.graph.input[0].name
    lines = make_text_lines(calib + 64, width=width)
    samples = [{name: lines[i : i + 1]} for i in range(len(lines))]
    return path, samples[:calib], samples[calib:]


def reader(tmp: Path) -> tuple[Path, list[Sample], list[Sample]]:
    from test_quantize_models import REC_MEMBER

    return third_party(tmp, REC_MEMBER, 320, 32)


def angle_classifier(tmp: Path) -> tuple[Path, list[Sample], list[Sample]]:
    return third_party(tmp, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", 192, 32)


def stack(samples: list[Sample]) -> list[Sample]:
    return [{k: np.concatenate([s[k] for s in samples]) for k in samples[0]}]


def ours(path: Path, calib: list[Sample], method: str, activation_type: str) -> tuple[onnx.ModelProto, float]:
    """Our graph as `trtbuild quantize` makes it by default (SmoothQuant auto before calibrating), without
    the gate: the bench judges every quantizer on the same held-out data itself."""
    model = onnx.load(str(path))
    start = time.perf_counter()
    tensors = quantizable_activations(model)
    model, smoothing = smoothquant.for_quantize(
        model,
        calib,
        "auto",
        set(tensors),
        activation_type=activation_type,
        ranges_given=False,
        threads=None,
        seed=0,
    )
    if smoothing.smoothed:  # a duplicated LayerNorm adds a tensor to quantize
        tensors = quantizable_activations(model)
    collection = collect(model, calib, tensors=tensors, show_progress=False)
    ranges = compute_ranges(collection, method)
    # uint8 (ORT CPU): the weight formats that are exact on this CPU's kernels (int7 where u8 x s8 saturates,
    # int8 for depthwise convs).
    formats = ort_cpu.choose().formats() if activation_type == "uint8" else {}
    options = QdqOptions(activation_type=activation_type, **formats)
    qmodel = apply_qdq(model, plan_qdq(model, ranges, options))
    return qmodel, time.perf_counter() - start


def ort_static(
    path: Path, calib: list[Sample], tmp: Path, method: str
) -> tuple[onnx.ModelProto | str, float]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> Sample | None:
            return next(self.it, None)

    out = tmp / f"{path.stem}.ort_{method}.onnx"
    start = time.perf_counter()
    try:
        quantize_static(
            str(path),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    except Exception as exc:  # ORT's entropy calibrator crashes on some models (MiniLM: range [-inf, inf])
        return f"crashed: {type(exc).__name__}: {str(exc)[:60]}", time.perf_counter() - start
    return onnx.load(str(out)), time.perf_counter() - start


REPO = Path(__file__).resolve().parents[1]
MODELOPT_PYTHON = REPO / ".venv-modelopt" / "bin" / "python"
MODELOPT_SCRIPT = REPO / "bench" / "modelopt_quantize.py"
MODELOPT_TIMEOUT_S = 300
MODELOPT_METHODS = ("entropy", "max")


def modelopt_quantize(
    path: Path, calib: list[Sample], tmp: Path, method: str
) -> tuple[onnx.ModelProto | str, float]:
    """ModelOpt's ONNX INT8 (FP32 high precision), in its own venv via a subprocess (modelopt_quantize.py)."""
    if not MODELOPT_PYTHON.exists():
        return (
            f"skipped: {MODELOPT_PYTHON.relative_to(REPO)} not found (nvidia-modelopt 0.47 pins onnx~=1.21, "
            "onnxruntime~=1.24, so it lives in its own venv; setup commands in bench/modelopt_quantize.py)",
            0.0,
        )
    data = tmp / f"{path.stem}.calib.npz"
    arrays: dict[str, Any] = stack(calib)[0]  # Any: numpy's stub types **kwds like allow_pickle
    np.savez(data, **arrays)
    out = tmp / f"{path.stem}.modelopt_{method}.onnx"
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [str(MODELOPT_PYTHON), str(MODELOPT_SCRIPT), str(path), str(data), str(out), "--method", method],
            capture_output=True,
            text=True,
            timeout=MODELOPT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"skipped: ModelOpt ran past {MODELOPT_TIMEOUT_S} s", time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {done.returncode}): {last[:90]}", time.perf_counter() - start
    # Time quantize() itself, as for the other rows, not the venv's interpreter start and imports.
    seconds = float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
    return onnx.load(str(out)), seconds


def latency_ms(
    models: dict[str, onnx.ModelProto | Path | str], feed: Sample, repeats: int = 5, iters: int = 10
) -> dict[str, float]:
    """Batch-1 latency, one thread, sessions interleaved so machine noise hits all alike; min over repeats."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sessions = {
        k: ort.InferenceSession(
            m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m),
            options,
            providers=["CPUExecutionProvider"],
        )
        for k, m in models.items()
    }
    best = {k: float("inf") for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            s.run(None, feed)
            start = time.perf_counter()
            for _ in range(iters):
                s.run(None, feed)
            best[k] = min(best[k], (time.perf_counter() - start) / iters * 1000)
    return best


def runtime_cosine(
    qmodel: onnx.ModelProto | str, batches: list[Sample], reference: dict[str, np.ndarray], kinds: Any
) -> float:
    """Mean cosine of the first output as ORT's fused CPU kernels compute it on this machine."""
    session = fidelity.session(qmodel, semantics=ort_core.ORT_CPU)
    return fidelity.compare(reference, fidelity.run_batches(session, batches), kinds=kinds).outputs[0].cosine


def metric(report: fidelity.FidelityReport) -> str:
    o = report.outputs[0]
    if o.top1_agreement is not None:
        raw = f" (raw {o.raw_top1:.1%}, {len(o.near_ties)} ties)" if o.raw_top1 is not None else ""
        return f"top-1 {o.top1_agreement:.1%}{raw} / cos {o.cosine:.4f}"
    return f"cos {o.cosine:.4f} / SQNR {o.sqnr_db:.1f} dB"


def score(report: fidelity.FidelityReport) -> tuple[str, float]:
    """The one number rows are ranked by: top-1 agreement for classifiers, cosine otherwise."""
    o = report.outputs[0]
    if o.top1_agreement is not None:
        return "top-1", o.top1_agreement
    return "cos", o.cosine


OURS_DEFAULT = f"trtbuild {DEFAULT_METHOD} (int8, TensorRT graph)"
OURS_UINT8 = f"trtbuild {DEFAULT_METHOD} (uint8, ORT CPU graph)"
PEER_PREFIXES = ("ORT ", "NVIDIA ModelOpt")


def ratio_line(label: str, scores: dict[str, tuple[str, float]]) -> str:
    """Ours (the default method) vs the best peer: the score ratio, and how much less error vs FP32."""
    peers = {k: v for k, v in scores.items() if k.startswith(PEER_PREFIXES)}
    if OURS_DEFAULT not in scores or not peers:
        return f"{label}: no ratio (ours or every peer failed)"
    kind, ours_value = scores[OURS_DEFAULT]
    best = max(peers, key=lambda k: peers[k][1])
    peer_value = peers[best][1]
    ours_err, peer_err = 1.0 - ours_value, 1.0 - peer_value
    fmt = (lambda v: f"{v:.1%}") if kind == "top-1" else (lambda v: f"{v:.4f}")
    less = f"{peer_err / ours_err:.2f}x" if ours_err > 0 else "inf x"
    return (
        f"{label}: ours ({DEFAULT_METHOD}, default) {kind} {fmt(ours_value)} vs best peer ({best}) "
        f"{fmt(peer_value)} -> {ours_value / peer_value:.3f}x; 1-{kind} {ours_err:.4f} vs {peer_err:.4f} "
        f"-> {less} less error"
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--models",
        default="effnet,minilm,det",
        help="comma-separated: effnet, minilm, det, and the third-party PP-OCR files rec (CTC reader), cls",
    )
    chosen = parser.parse_args().models.split(",")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    fid = Table(
        title="INT8 fidelity vs FP32 on held-out samples (same model, same calibration and held-out data)",
        caption="every graph measured with reference Q/DQ semantics (the model, not this CPU's kernels)",
    )
    for col in ("model", "calib / held-out", "quantizer", "fidelity", "quantize wall s"):
        fid.add_column(col)
    lat = Table(
        title="ONNX Runtime CPU latency, batch 1, 1 thread (min of 5x10 runs, interleaved)",
        caption=f"this CPU: {ort_cpu.choose().cpu.describe()}; ours uses {ort_cpu.choose().weight_format} "
        "weights here; cosine = as ORT's fused kernels really compute it on this CPU",
    )
    for col in (
        "model",
        "FP32 ms",
        "ours INT8 (uint8 act) ms",
        "ORT QDQ ms",
        "ours vs FP32",
        "ours vs ORT QDQ",
        "ours cos (ORT kernels)",
        "ORT QDQ cos (ORT kernels)",
    ):
        lat.add_column(col)
    ratios: list[str] = []
    for key, label, build in (
        ("effnet", "EfficientNet-Lite0", effnet),
        ("minilm", "MiniLM-L6 (sentence emb.)", minilm),
        ("det", "PP-OCRv4 det (DBNet)", detector),
        ("rec", "PP-OCRv4 rec (SVTR CTC reader)", reader),
        ("cls", "PP-OCR angle classifier", angle_classifier),
    ):
        if key not in chosen:
            continue
        console.print(f"[bold]{label}[/bold] ...")
        path, calib, held = build(tmp)
        model = onnx.load(str(path))
        held_batches = stack(held)
        reference = fidelity.run_batches(fidelity.session(model), held_batches)
        # top-1 decided as the gate decides it: FP32 near-ties (within the FP16 graph's noise) set aside
        kinds = near_ties.attach(fidelity.decide_kinds(model, reference), model, reference, held_batches)
        results: dict[str, tuple[onnx.ModelProto | str, float]] = {}
        for method in ("entropy", "percentile", "minmax", "mse"):
            results[f"trtbuild {method} (int8, TensorRT graph)"] = ours(path, calib, method, "int8")
        results[OURS_UINT8] = ours(path, calib, DEFAULT_METHOD, "uint8")
        results["ORT quantize_static Entropy QDQ per-channel"] = ort_static(path, calib, tmp, "Entropy")
        results["ORT quantize_static MinMax QDQ per-channel"] = ort_static(path, calib, tmp, "MinMax")
        for method in MODELOPT_METHODS:
            results[f"NVIDIA ModelOpt ONNX INT8 {method} (fp32 high prec.)"] = modelopt_quantize(
                path, calib, tmp, method
            )
        scores: dict[str, tuple[str, float]] = {}
        for name, (qmodel, seconds) in results.items():
            if isinstance(qmodel, str):
                fid.add_row(label, f"{len(calib)} / {len(held)}", name, qmodel, f"{seconds:.1f}")
                continue
            test = fidelity.run_batches(fidelity.session(qmodel), held_batches)
            report = fidelity.compare(reference, test, kinds=kinds)
            scores[name] = score(report)
            fid.add_row(label, f"{len(calib)} / {len(held)}", name, metric(report), f"{seconds:.1f}")
        ratios.append(ratio_line(label, scores))
        ort_q = results["ORT quantize_static MinMax QDQ per-channel"][0]
        if not isinstance(ort_q, str):
            timed = latency_ms(
                {"fp32": path, "ours": results[OURS_UINT8][0], "ort": ort_q},
                held[0],
            )
            lat.add_row(
                label,
                f"{timed['fp32']:.2f}",
                f"{timed['ours']:.2f}",
                f"{timed['ort']:.2f}",
                f"{timed['fp32'] / timed['ours']:.2f}x faster",
                f"{timed['ort'] / timed['ours']:.2f}x",
                *(
                    f"{runtime_cosine(q, held_batches, reference, kinds):.4f}"
                    for q in (results[OURS_UINT8][0], ort_q)
                ),
            )
    console.print(fid)
    console.print(lat)
    console.print("[bold]Fidelity, ours vs the best peer (same models, calibration and held-out data)[/bold]")
    for line in ratios:
        console.print(line, soft_wrap=True)
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
