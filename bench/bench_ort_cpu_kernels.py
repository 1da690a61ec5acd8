#!/usr/bin/env python3
"""ONNX Runtime's CPU conv kernels one layer at a time: where an INT8 graph can gain on this CPU.

Each row is one conv shape of EfficientNet-Lite0 (depthwise k x k and 1x1), run as a chain of 4 identical
layers in one session at 1 thread; the time is ORT's profiler kernel time of the chain's later layers
(median, warm runs). Columns: FP32 (ORT turns it into its NCHWc conv), and the uint8-activation
QLinearConv ORT forms from a Q/DQ graph, with

* int8 weights, zero point 0, NHWC (what the ORT-CPU graph runs: MLAS's symmetric "ConvSym" kernels);
* the same in NCHW, ORT's layout pass off (ORT_ENABLE_EXTENDED: the kernel transposes in and out itself);
* uint8 weights, zero point 128 (the u8 x u8 kernels; ``--ort-weights uint8``);
* int8 weights with zero point 1 (off the symmetric path: MlasConvDepthwise / MlasGemm u8s8).

docs/ort-cpu-int8.md quotes it.

    python3 bench/bench_ort_cpu_kernels.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from trtbuild.core import cpu

CHAIN = 4
# (channels in, channels out, spatial size, kernel, stride) of EfficientNet-Lite0's layers.
DEPTHWISE = [(32, 112, 3), (144, 56, 3), (240, 28, 5), (480, 14, 3), (672, 14, 5), (1152, 7, 5)]
POINTWISE = [(16, 96, 112), (24, 144, 56), (144, 24, 56), (240, 40, 28), (112, 672, 14), (1152, 192, 7)]
VARIANTS = ("int8 NHWC", "int8 NCHW", "uint8 zp128", "int8 zp1")


def _chain(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: onnx.ValueInfoProto
) -> onnx.ModelProto:
    out = helper.make_tensor_value_info(nodes[-1].output[0], x.type.tensor_type.elem_type, None)
    graph = helper.make_graph(nodes, "chain", [x], [out], inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def float_chain(
    cin: int, cout: int, hw: int, k: int, rng: np.random.Generator
) -> tuple[onnx.ModelProto, dict]:
    group = cin if cin == cout and k > 1 else 1
    inits, nodes = [], []
    for j, (a, b) in enumerate(((cin, cout), (cout, cin))):
        inits += [
            numpy_helper.from_array(rng.standard_normal((b, a // group, k, k)).astype(np.float32), f"w{j}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{j}"),
        ]
    x = "x"
    for i in range(CHAIN):
        j = i % 2
        nodes.append(
            helper.make_node(
                "Conv", [x, f"w{j}", f"b{j}"], [f"y{i}"], name=f"conv{i}", group=group, pads=[k // 2] * 4
            )
        )
        x = f"y{i}"
    feed = {"x": rng.standard_normal((1, cin, hw, hw)).astype(np.float32)}
    return _chain(nodes, inits, helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])), feed


def int_chain(
    cin: int, cout: int, hw: int, k: int, variant: str, rng: np.random.Generator
) -> tuple[onnx.ModelProto, dict]:
    group = cin if cin == cout and k > 1 else 1
    nhwc = variant != "int8 NCHW"
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(100, np.uint8), "xz"),
    ]
    for j, (a, b) in enumerate(((cin, cout), (cout, cin))):
        w = rng.integers(-63, 64, (b, a // group, k, k))
        if variant == "uint8 zp128":
            stored, zero = (w + 128).astype(np.uint8), np.full(b, 128, np.uint8)
        elif variant == "int8 zp1":
            stored, zero = (w // 2 + 1).astype(np.int8), np.ones(b, np.int8)
        else:
            stored, zero = w.astype(np.int8), np.zeros(b, np.int8)
        inits += [
            numpy_helper.from_array(stored, f"w{j}"),
            numpy_helper.from_array(zero, f"wz{j}"),
            numpy_helper.from_array(np.full(b, 0.01, np.float32), f"ws{j}"),
            numpy_helper.from_array(rng.integers(-100, 100, b).astype(np.int32), f"b{j}"),
        ]
    nodes, x = [], "x"
    for i in range(CHAIN):
        j = i % 2
        inputs = [x, "xs", "xz", f"w{j}", f"ws{j}", f"wz{j}", "xs", "xz", f"b{j}"]
        attrs: dict = {"group": group, "kernel_shape": [k, k], "pads": [k // 2] * 4}
        if nhwc:
            attrs.update(domain="com.microsoft", channels_last=1)
        nodes.append(helper.make_node("QLinearConv", inputs, [f"y{i}"], name=f"conv{i}", **attrs))
        x = f"y{i}"
    shape = [1, hw, hw, cin] if nhwc else [1, cin, hw, hw]
    feed = {"x": rng.integers(0, 255, shape).astype(np.uint8)}
    return _chain(nodes, inits, helper.make_tensor_value_info("x", TensorProto.UINT8, shape)), feed


def kernel_us(model: onnx.ModelProto, feed: dict, runs: int, tmp: Path, nhwc_pass: bool = True) -> float:
    """Median profiler time of the chain's layers after the first (same shape as the first), in us."""
    options = ort.SessionOptions()
    if not nhwc_pass:  # keeps an NCHW QLinearConv as it is (the NHWC transformer runs at ENABLE_ALL)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / "kernels")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed)
    per: dict[str, list[float]] = {}
    for e in json.loads(Path(sess.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per.setdefault(e["name"], []).append(e["dur"])
    # the NCHWc rewrite renames FP32 nodes y<i>_nchwc; the chain alternates cin->cout and cout->cin
    later = [statistics.median(d[runs // 3 :]) for n, d in per.items() if re.match(r"(conv|y)2", n)]
    return later[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_cpu_kernels_"))
    start, start_cpu = time.perf_counter(), time.process_time()
    table = Table(
        title="ORT CPU conv kernels, batch 1, 1 thread: profiler us per layer (speed-up vs FP32)",
        caption=f"{cpu.detect().describe()}; onnxruntime {ort.__version__}; median of the warm runs of "
        f"{args.runs}",
    )
    for col in ("layer", "FP32", *VARIANTS):
        table.add_column(col)
    shapes = [(c, c, hw, k) for c, hw, k in DEPTHWISE] + [(a, b, hw, 1) for a, b, hw in POINTWISE]
    for cin, cout, hw, k in shapes:
        rng = np.random.default_rng(0)
        fp32 = kernel_us(*float_chain(cin, cout, hw, k, rng), args.runs, tmp)
        cells = [f"{fp32:.0f}"]
        for variant in VARIANTS:
            us = kernel_us(*int_chain(cin, cout, hw, k, variant, rng), args.runs, tmp, variant != "int8 NCHW")
            cells.append(f"{us:.0f} ({fp32 / us:.2f}x)")
        kind = f"depthwise {k}x{k}" if k > 1 else "1x1"
        table.add_row(f"{kind} {cin}->{cout} @{hw}x{hw}", *cells)
    console = Console(width=140)
    console.print(table)
    console.print(f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - start_cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
