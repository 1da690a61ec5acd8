"""Quantize an FP32 ONNX to INT8 Q/DQ with Qualcomm AIMET (aimet-onnx): QuantSim + AdaRound (a peer row in
bench/bench_int8_accuracy.py).

aimet-onnx pins torch versions that would replace ours, so it runs in `.venv-aimet` (setup in
tests/test_encodings_aimet.py) in a subprocess:

    .venv-aimet/bin/python bench/aimet_quantize.py MODEL.onnx CALIB.npz OUT.onnx --iterations 300

QuantSim: int8 weights and activations, per-channel weights (the v73 HTP config, per-channel like ours),
TF-enhanced (SQNR-searched) activation ranges; AdaRound on every supported layer, then encodings computed
with the rounded weights; exported as ONNX Q/DQ. Prints one JSON line:
{"seconds": ..., "cpu_seconds": ..., "aimet": version}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path, help=".npz with one array per model input (samples on axis 0)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--iterations", type=int, default=300, help="AdaRound steps per layer")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import aimet_onnx
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround

    config = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "htp_quantsim_config_v73.json"
    data = np.load(args.calib)
    count = len(next(iter(data.values())))
    batches = [{k: data[k][i : i + args.batch] for k in data} for i in range(0, count, args.batch)]
    model = onnx.load(str(args.model))
    start, cpu = time.perf_counter(), time.process_time()
    sim = QuantizationSimModel(
        model,
        param_type="int8",
        activation_type="int8",
        quant_scheme="tf_enhanced",
        config_file=str(config),
        providers=["CPUExecutionProvider"],
    )
    apply_adaround(sim, batches, num_iterations=args.iterations)
    sim.compute_encodings(batches)
    qdq = sim.to_onnx_qdq()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    onnx.save(qdq, str(args.out))
    print(
        json.dumps({"seconds": seconds, "cpu_seconds": cpu, "aimet": getattr(aimet_onnx, "__version__", "?")})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
