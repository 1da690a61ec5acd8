#!/usr/bin/env python3
"""The ORT-CPU INT8 graph against FP32 and ONNX Runtime's own quantizer, on the three bench models:

* which integer kernels ORT forms at its default optimisation level (QLinearConv, QLinearAdd, QGemm,
  MatMulIntegerToFloat, ...), how many convs/matmuls are left in float, how many activation Q/DQ nodes
  and unfused Q -> DQ pairs are left (pure overhead), from each session's optimized graph;
* batch-1 latency at 1 and 2 threads, FP32 / ours / ORT's graph interleaved round by round so the shared
  machine's noise hits all three alike: the median of the per-round ratios, and median ms;
* fidelity vs FP32 as ORT's kernels really compute it on this CPU (held-out samples);
* where the time goes (ORT's profiler, 1 thread): depthwise convs, the other convs/matmuls, the rest.

ORT's graph: quantize_static, QDQ, per-channel, uint8 activations, int8 weights with reduce_range on CPUs
whose u8 x s8 kernels saturate (as ORT's documentation advises; ours picks int7 there too), MinMax.
docs/ort-cpu-int8.md and README.md quote it.

    python3 bench/bench_ort_cpu_fusion.py [--repeats 9] [--iters 5] [--models effnet,minilm,det]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from bench_quantize import Sample, console, detector, effnet, minilm, ours, stack  # noqa: E402
from rich.table import Table  # noqa: E402

from calibrators import fidelity, ort_cpu, ort_speed  # noqa: E402
from calibrators.methods import DEFAULT_METHOD  # noqa: E402
from trtbuild.core import ort as ort_core  # noqa: E402

INTEGER_KERNELS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearSoftmax",
)
FLOAT_COMPUTE = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ConvTranspose")
Model = onnx.ModelProto | Path


def ort_quantized(path: Path, calib: list[Sample], tmp: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> Sample | None:
            return next(self.it, None)

    out = tmp / f"{path.stem}.ort_qdq.onnx"
    quantize_static(
        str(path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=ort_cpu.choose().cpu.u8s8_saturates,
    )
    return out


def session(model: Model, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def fusion(model: Model, tmp: Path, name: str) -> dict[str, object]:
    """Counts over the graph ORT really runs (default optimisation level)."""
    out = tmp / f"{name}.optimized.onnx"
    session(model, 1, out)
    graph = onnx.load(str(out)).graph
    ops = Counter(n.op_type for n in graph.node)
    inits = {i.name for i in graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node.op_type)
    qdq = [
        n
        for n in graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits
    ]
    pairs = [
        n for n in qdq if n.op_type == "QuantizeLinear" and "DequantizeLinear" in readers.get(n.output[0], [])
    ]
    return {
        "integer kernels": ", ".join(f"{k} {ops[k]}" for k in INTEGER_KERNELS if ops[k]),
        "float conv/matmul": sum(ops[k] for k in FLOAT_COMPUTE),
        "activation Q/DQ": len(qdq),
        "unfused Q->DQ": len(pairs),
        "Pad": ops["Pad"],
    }


def kernel_split(models: dict[str, Model], feed: Sample, tmp: Path, runs: int = 30) -> dict[str, dict]:
    """Median ms per run by kind, from ORT's profiler at 1 thread, the sessions run in turn (so load from
    other jobs hits all alike): which kernels the INT8 graphs gain on."""
    import json

    sessions = {}
    for key, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp / f"profile_{len(sessions)}")
        options.optimized_model_filepath = str(tmp / f"profiled_{len(sessions)}.onnx")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        sessions[key] = (ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]), options)
    for _ in range(runs):
        for sess, _options in sessions.values():
            sess.run(None, feed)
    splits = {}
    for key, (sess, options) in sessions.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        nodes = {n.name: n for n in onnx.load(options.optimized_model_filepath).graph.node}
        per_node: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_node.setdefault(e["name"].removesuffix("_kernel_time"), []).append(e["dur"] / 1000)
        split = {"depthwise conv": 0.0, "other conv/matmul": 0.0, "rest": 0.0}
        for name, durations in per_node.items():
            node = nodes.get(name)
            op = node.op_type if node is not None else ""
            group = next((a.i for a in node.attribute if a.name == "group"), 1) if node is not None else 1
            kind = "rest"
            if op in (*FLOAT_COMPUTE, *INTEGER_KERNELS[:4]):
                kind = "depthwise conv" if group > 1 else "other conv/matmul"
            split[kind] += statistics.median(durations[len(durations) // 3 :])  # warm runs only
        splits[key] = split
    return splits


def interleaved(models: dict[str, Model], feed: Sample, threads: int, repeats: int, iters: int) -> dict:
    """Per round, each session runs ``iters`` times back to back; ratios are taken within a round. Wall
    time and this process's CPU time (all its threads: ORT's pool too) per run: on a machine shared with
    other jobs the CPU time is what the kernels cost, the wall time also counts waiting for a core. The
    loop is quantize's speed check's (calibrators/ort_speed.py)."""
    sessions = {k: session(m, threads) for k, m in models.items()}
    for s in sessions.values():
        s.run(None, feed)
    timed = ort_speed.time_rounds(
        {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, repeats, iters
    )

    def ratios(per: dict[str, list[float]]) -> dict[str, float]:
        return {
            k: statistics.median(f / t for f, t in zip(per["FP32"], v, strict=True)) for k, v in per.items()
        }

    return {
        "ms": timed.median_ms(),
        "vs_fp32": ratios(timed.wall_ms),
        "cpu_ms": {k: statistics.median(v) for k, v in timed.cpu_ms.items()},
        "cpu_vs_fp32": ratios(timed.cpu_ms),
    }


def cosine(model: Model, batches: list[Sample], reference: dict[str, np.ndarray], kinds: object) -> str:
    graph = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    test = fidelity.run_batches(fidelity.session(graph, semantics=ort_core.ORT_CPU), batches)
    out = fidelity.compare(reference, test, kinds=kinds).outputs[0]  # type: ignore[arg-type]
    top1 = "" if out.top1_agreement is None else f", top-1 {out.top1_agreement:.1%}"
    return f"cos {out.cosine:.4f}{top1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--models", default="effnet,minilm,det")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_cpu_fusion_"))
    builders: dict[str, tuple[str, Callable[[Path], tuple[Path, list[Sample], list[Sample]]]]] = {
        "effnet": ("EfficientNet-Lite0", effnet),
        "minilm": ("MiniLM-L6 (sentence emb.)", minilm),
        "det": ("PP-OCRv4 det (DBNet)", detector),
    }
    target = ort_cpu.choose()
    fused = Table(title="What ORT runs (default optimisation level): ours vs ORT quantize_static")
    speed = Table(
        title="Batch-1 latency, FP32 / ours / ORT's uint8 QDQ graph interleaved "
        f"(median of {args.repeats} rounds x {args.iters} runs; speed-up = median per-round ratio)",
        caption=f"{target.cpu.describe()}; ours uses {target.weight_format} weights, {target.depthwise} "
        f"for depthwise convs ({DEFAULT_METHOD} ranges); fidelity as ORT's kernels compute it here; load "
        f"average {os.getloadavg()[0]:.1f} at the start",
    )
    for col in (
        "model",
        "graph",
        "integer kernels",
        "float conv/matmul",
        "activation Q/DQ",
        "unfused Q->DQ",
        "Pad",
    ):
        fused.add_column(col)
    where = Table(title="Where the time goes: ORT profiler, batch 1, 1 thread, median ms per run")
    for col in ("model", "graph", "depthwise conv", "other conv/matmul", "rest"):
        where.add_column(col)
    for col in (
        "model",
        "graph",
        "1 thread ms (CPU ms)",
        "vs FP32 (CPU)",
        "2 threads ms (CPU ms)",
        "vs FP32 (CPU)",
        "fidelity (ORT kernels)",
    ):
        speed.add_column(col)
    unknown = sorted(set(args.models.split(",")) - set(builders))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(builders)}")
    for key in args.models.split(","):
        label, build = builders[key]
        console.print(f"[bold]{label}[/bold] ...")
        path, calib, held = build(tmp)
        model = onnx.load(str(path))
        graphs: dict[str, Model] = {
            "FP32": path,
            "ours (uint8)": ours(path, calib, DEFAULT_METHOD, "uint8")[0],
            "ORT quantize_static": ort_quantized(path, calib, tmp),
        }
        batches = stack(held)
        reference = fidelity.run_batches(fidelity.session(model), batches)
        kinds = fidelity.decide_kinds(model, reference)
        timed = {t: interleaved(graphs, held[0], t, args.repeats, args.iters) for t in (1, 2)}
        splits = kernel_split(graphs, held[0], tmp)
        for name, graph in graphs.items():
            where.add_row(label, name, *(f"{v:.2f}" for v in splits[name].values()))
            if name != "FP32":
                counts = fusion(graph, tmp, f"{key}.{name.split()[0]}")
                fused.add_row(label, name, *(str(v) for v in counts.values()))
            speed.add_row(
                label,
                name,
                *(
                    cell
                    for t in (1, 2)
                    for cell in (
                        f"{timed[t]['ms'][name]:.2f} ({timed[t]['cpu_ms'][name]:.2f})",
                        f"{timed[t]['vs_fp32'][name]:.2f}x ({timed[t]['cpu_vs_fp32'][name]:.2f}x)",
                    )
                ),
                "-" if name == "FP32" else cosine(graph, batches, reference, kinds),
            )
    console.print(fused)
    console.print(speed)
    console.print(where)


if __name__ == "__main__":
    main()
