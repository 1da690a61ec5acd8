"""Quantize an FP32 ONNX to INT8 Q/DQ with NVIDIA ModelOpt's ONNX PTQ (a peer in bench_quantize.py).

Runs under the separate venv `.venv-modelopt` (ModelOpt 0.47 pins onnx~=1.21 / onnxruntime~=1.24, which
must not enter the main environment), so the benchmark calls it in a subprocess:

    .venv-modelopt/bin/python bench/modelopt_quantize.py MODEL.onnx CALIB.npz OUT.onnx --method entropy

CALIB.npz holds one array per model input name, samples stacked on axis 0. ModelOpt splits it into
calibration steps by the model's batch dimension (dynamic dims count as 1). High precision stays FP32:
ModelOpt's default FP16 graph gave 0 % top-1 agreement on ONNX Runtime's CPU provider (measured once), which
would measure the CPU provider's FP16 handling rather than ModelOpt's INT8 ranges.
Venv setup (from the repo root; `.venv*/` is git-ignored). It reuses the system torch 2.13.0 CPU and numpy
through --system-site-packages (the constraints keep pip from touching them) and adds only its own onnx,
the CPU onnxruntime (calibration runs on the CPU provider; the -gpu wheel ModelOpt names is the same module,
~10x larger, and useless without a GPU) and the [onnx] extra's other imports; cupy is left out (GPU only):

    python3 -m venv --system-site-packages .venv-modelopt
    .venv-modelopt/bin/python -m pip install -c <(python3 -m pip freeze | grep -E '^(torch|numpy)==') \
        "onnx~=1.21.0" "onnxruntime~=1.24.2" "onnx-graphsurgeon>=0.6.1" ninja "nvidia-ml-py>=12" \
        "omegaconf>=2.3.0" "pulp<4.0" lief cppimport "setuptools>=80"
    .venv-modelopt/bin/python -m pip install --no-deps nvidia-modelopt==0.47.0

Prints one JSON line: {"seconds": wall time of quantize(), "modelopt": version, "onnx": ..., "ort": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="FP32 ONNX model")
    parser.add_argument("calib", type=Path, help=".npz with one array per model input (samples on axis 0)")
    parser.add_argument("out", type=Path, help="where to write ModelOpt's INT8 (or FP8) Q/DQ ONNX")
    parser.add_argument("--method", choices=("entropy", "max"), default="entropy")
    parser.add_argument("--mode", choices=("int8", "fp8"), default="int8", help="ModelOpt's quantize_mode")
    args = parser.parse_args()

    # `tensorrt-stubs` makes `import tensorrt` succeed as an empty namespace package; ModelOpt takes that
    # as a real TensorRT and calls trt.Logger. Hide it so ModelOpt takes its documented no-TensorRT path.
    sys.modules["tensorrt"] = None  # type: ignore[assignment]
    import modelopt
    import onnx
    import onnxruntime
    from modelopt.onnx.quantization import quantize

    with np.load(args.calib) as archive:
        calibration = {name: archive[name] for name in archive.files}
    graph = onnx.load(str(args.model), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = sorted(i.name for i in graph.input if i.name not in initializers)
    if sorted(calibration) != inputs:
        print(
            f"calibration arrays {sorted(calibration)} do not match the model inputs {inputs}",
            file=sys.stderr,
        )
        return 2
    # Write next to the target and rename, so a crash never leaves a half-written model at `out`.
    partial = args.out.with_name(args.out.stem + ".partial.onnx")
    start = time.perf_counter()
    try:
        quantize(
            str(args.model),
            quantize_mode=args.mode,
            calibration_data=calibration,
            calibration_method=args.method,
            calibration_eps=["cpu"],  # no GPU / TensorRT here; the CPU provider is what the other rows use
            high_precision_dtype="fp32",
            output_path=str(partial),
            log_level="ERROR",
        )
    except Exception as exc:  # the caller shows our last stderr line, so make it say what broke
        partial.unlink(missing_ok=True)
        print(f"ModelOpt quantize failed: {type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    partial.replace(args.out)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "modelopt": modelopt.__version__,
                "onnx": onnx.__version__,
                "ort": onnxruntime.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
