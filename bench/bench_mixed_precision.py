"""Mixed INT8/FP8 per layer (`quantize --precision int8,fp8`) against INT8 with float fallback and
all-FP8, side by side on the same calibration and held-out data, every graph in reference semantics.

    python3 bench/bench_mixed_precision.py [--models minilm,detector] [--gate cosine=0.995]

For each model: all-INT8, all-FP8, INT8 + auto-fallback to float, INT8 + auto-fallback to FP8 (mixed);
the fidelity each reaches, how many layers and what share of the Conv/Gemm/MatMul MACs are float / FP8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).parent),
    str(Path(__file__).parents[1] / "tests"),
    str(Path(__file__).parents[1] / "tests" / "calibrators"),
]

from bench_quantize import detector, effnet, minilm  # noqa: E402

from calibrators.quantize import FidelityGateError, quantize  # noqa: E402

MODELS = {"effnet": effnet, "minilm": minilm, "detector": detector}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--gate", default="cosine=0.995")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        tmp = Path(tempfile.mkdtemp())
        path, calib, held = MODELS[name](tmp)
        data = calib + held
        common = {"holdout": len(held), "show_progress": False, "threads": args.threads}
        runs = {
            "INT8": {"min_fidelity": 0},
            "FP8": {"min_fidelity": 0, "activation_type": "fp8"},
            "INT8 + float fallback": {"min_fidelity": args.gate, "auto_fallback": True},
            "INT8 + FP8 fallback (int8,fp8)": {
                "min_fidelity": args.gate,
                "auto_fallback": True,
                "fallback_precision": "fp8",
            },
        }
        for label, options in runs.items():
            start, cpu = time.perf_counter(), time.process_time()
            try:
                r = quantize(path, data, tmp / label.replace(" ", "_"), **common, **options)
                fp8 = "all" if options.get("activation_type") == "fp8" else str(len(r.plan.fp8_nodes))
                row = (
                    f"| {name} | {label} | {r.fidelity.summary()} | {len(r.plan.excluded)} / "
                    f"{r.float_compute:.1%} | {fp8} / {r.fp8_compute:.1%} |"
                )
            except FidelityGateError as exc:
                row = f"| {name} | {label} | failed: {str(exc)[:160]} | - | - |"
            row += f" {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU |"
            print(row, flush=True)
            rows.append(row)
    print(f"\ngate {args.gate}; held-out samples as bench_quantize.py splits them")
    print("| model | graph | fidelity (held-out) | float layers / MACs | FP8 layers / MACs | time |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
