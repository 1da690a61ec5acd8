"""The demo's gate without auto-fallback: decisive and raw top-1 (near-ties, calibrators/near_ties.py) of
learned or nearest rounding with every layer INT8, or with the classifier float too.

Setup of `trtbuild demo`: EfficientNet-Lite0 (default dynamo export), 64 calibration / 200 held-out photo
crops (seed 7), mse ranges, one thread; the gate is set to 0 % so every graph is measured and written.
The numbers in docs/int8-accuracy.md ("The demo with 200 held-out photos") came from this code.

Run: python3 bench/bench_demo_gate.py [--rows learned,learned+head,nearest] [--holdout 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_learned_fallback import demo_setup  # noqa: E402

from calibrators.quantize import quantize  # noqa: E402
from calibrators.quantize_settings import QuantizeSettings  # noqa: E402
from trtbuild import demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="learned,learned+head,nearest")
    parser.add_argument("--holdout", type=int, default=demo.HOLDOUT_PHOTOS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_gate_"))
    model_path, photos = demo_setup(tmp, args.holdout)
    graph = onnx.load(str(model_path), load_external_data=False)
    head = [n.name for n in graph.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")][-1]
    for row in args.rows.split(","):
        rounding, _, extra = row.partition("+")
        settings = QuantizeSettings(
            holdout=args.holdout,
            threads=args.threads,
            rounding=rounding,
            rounding_budget_s=1e4,
            min_fidelity="0%",
            exclude=(f"^{head}$",) if extra == "head" else (),
        )
        wall, cpu = time.perf_counter(), time.process_time()
        res = quantize(model_path, photos, tmp / row.replace("+", "_"), settings, show_progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        o = res.fidelity.outputs[0]
        print(
            json.dumps(
                {
                    "row": row,
                    "float_compute": res.float_compute,
                    "float_layers": [e.node for e in res.plan.excluded],
                    "top1_decisive": o.top1_agreement,
                    "top1_interval": o.top1_interval,
                    "decisive": o.decisive_samples,
                    "raw_top1": o.raw_top1,
                    "raw_interval": o.raw_top1_interval,
                    "near_ties": o.near_ties,
                    "tie_rule": o.tie_rule,
                    "cosine": o.cosine,
                    "learned_kept": res.rounding is not None and res.rounding.end_to_end_kept,
                    "cpu_s": cpu,
                    "wall_s": wall,
                },
                default=str,
            )
        )


if __name__ == "__main__":
    main()
