#!/usr/bin/env python3
"""The ORT-CPU graph's weight formats side by side on this CPU: fidelity as ORT's fused kernels compute it
and in reference semantics, and batch-1 latency against FP32 (EfficientNet-Lite0, real photos, same
ranges, one thread, sessions interleaved). docs/ort-cpu-int8.md quotes it.

    python3 bench/bench_ort_cpu_weights.py [--repeats 6] [--iters 10]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import console, effnet, latency_ms, stack  # noqa: E402
from rich.table import Table  # noqa: E402

from calibrators import fidelity, ort_cpu  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect  # noqa: E402
from calibrators.methods import DEFAULT_METHOD  # noqa: E402
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations  # noqa: E402
from calibrators.weights import WEIGHT_FORMATS  # noqa: E402
from trtbuild.core import cpu  # noqa: E402
from trtbuild.core import ort as ort_core  # noqa: E402


def main() -> None:
    import argparse

    import onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_cpu_weights_"))
    path, calib, held = effnet(tmp)
    model = onnx.load(str(path))
    batches = stack(held)
    reference = fidelity.run_batches(fidelity.session(model), batches)
    kinds = fidelity.decide_kinds(model, reference)
    ranges = compute_ranges(
        collect(model, calib, tensors=quantizable_activations(model), show_progress=False), DEFAULT_METHOD
    )
    formats = {fmt: {"weight_format": fmt} for fmt in WEIGHT_FORMATS}
    auto = ort_cpu.choose()
    if auto.depthwise != auto.weight_format:  # the per-layer choice `auto` makes on this CPU
        formats[f"{auto.weight_format} + {auto.depthwise} depthwise (auto)"] = auto.formats()
    graphs = {
        name: apply_qdq(model, plan_qdq(model, ranges, QdqOptions(activation_type="uint8", **fields)))
        for name, fields in formats.items()
    }
    timed = latency_ms({"fp32": path, **graphs}, held[0], repeats=args.repeats, iters=args.iters)
    table = Table(
        title=f"ORT-CPU INT8 graph (uint8 activations), EfficientNet-Lite0, {len(held)} held-out photos",
        caption=f"{cpu.detect().describe()}; latency: batch 1, 1 thread, min of {args.repeats}x{args.iters} "
        "interleaved runs",
    )
    for col in ("weights", "cos / SQNR (ORT kernels)", "cos / SQNR (reference)", "latency ms", "vs FP32"):
        table.add_column(col)
    table.add_row("FP32", "-", "-", f"{timed['fp32']:.2f}", "1.00x")
    for fmt, graph in graphs.items():
        cells = []
        for semantics in (ort_core.ORT_CPU, ort_core.REFERENCE):
            test = fidelity.run_batches(fidelity.session(graph, semantics=semantics), batches)
            out = fidelity.compare(reference, test, kinds=kinds).outputs[0]
            cells.append(f"{out.cosine:.4f} / {out.sqnr_db:.1f} dB")
        table.add_row(fmt, *cells, f"{timed[fmt]:.2f}", f"{timed['fp32'] / timed[fmt]:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
