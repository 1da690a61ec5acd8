"""INT4 weight-only with NVIDIA ModelOpt's ONNX PTQ (the peer in bench_int4.py), run in `.venv-modelopt`.

    .venv-modelopt/bin/python bench/modelopt_int4.py MODEL.onnx CALIB.npz OUT.onnx --method awq_clip

CALIB.npz holds one array per model input name, samples stacked on axis 0. Calibration runs on the CPU
provider (no GPU here); without cupy ModelOpt takes its documented numpy path. High precision stays FP32 so
the comparison measures the INT4 weights, not ORT's CPU FP16 handling. Prints one JSON line
({"seconds", "modelopt", "method"}), or one stderr line saying why it failed (exit 1).
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
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", choices=("awq_clip", "awq_lite", "rtn_dq"), default="awq_clip")
    args = parser.parse_args()
    sys.modules["tensorrt"] = None  # type: ignore[assignment]  # see modelopt_quantize.py
    import modelopt
    from modelopt.onnx.quantization import quantize

    with np.load(args.calib) as archive:
        calibration = {name: archive[name] for name in archive.files}
    partial = args.out.with_name(args.out.stem + ".partial.onnx")
    start = time.perf_counter()
    try:
        quantize(
            str(args.model),
            quantize_mode="int4",
            calibration_data=calibration,
            calibration_method=args.method,
            calibration_eps=["cpu"],
            high_precision_dtype="fp32",
            output_path=str(partial),
            log_level="ERROR",
        )
    except Exception as exc:
        partial.unlink(missing_ok=True)
        print(f"ModelOpt int4 failed: {type(exc).__name__}: {exc}".replace("\n", " ")[:400], file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    partial.replace(args.out)
    print(json.dumps({"seconds": seconds, "modelopt": modelopt.__version__, "method": args.method}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
