"""Auto-fallback rankings side by side, and the per-layer report's cost, on EfficientNet-Lite0 + photos:

* for the same ranges, held-out samples and gate: the share of Conv/Gemm/MatMul MACs left in float, the
  layers kept float and the fidelity reached, ranking by sensitivity alone vs by sensitivity per MAC
  (calibrators/fallback_ranking.py), both with the one-pass "local" sensitivity;
* the wall time of the per-layer report (calibrators/layer_report.py) on 8 held-out samples.

Run: python3 bench/bench_fallback.py [--holdout 16] [--json out.json]  (about 5-10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrators import fallback, fidelity, layer_report  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect, load_model, tensors_to_collect  # noqa: E402
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq  # noqa: E402
from trtbuild import examples  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import export_effnet  # noqa: E402  (the same model as the other benches)

GATES = ("logits:cosine=0.995", "logits:cosine=0.997")
console = Console(width=140)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    photos = examples.normalize_imagenet(examples.photo_crops(args.calibration + args.holdout, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(export_effnet(Path(tmp)))
    calib = [{"images": photos[i : i + 1]} for i in range(args.calibration)]
    held_x = photos[args.calibration :]
    held = [{"images": held_x[i : i + 8]} for i in range(0, len(held_x), 8)]
    collection = collect(model, calib, tensors=tensors_to_collect(model), show_progress=False)
    ranges = compute_ranges(collection, "entropy")
    reference = fidelity.run_batches(fidelity.session(model), held)
    rows: list[dict[str, Any]] = []
    for gate in GATES:
        threshold = fidelity.parse_min_fidelity([gate])
        for ranking in ("sensitivity", "cost"):  # same sensitivities: the order is the only difference
            start = time.perf_counter()
            result = fallback.auto_fallback(
                model,
                ranges,
                QdqOptions(),
                held,
                threshold,
                reference=reference,
                strategy="local",
                ranking=ranking,
            )
            rows.append(
                {
                    "gate": gate,
                    "ranking": ranking,
                    "passed": result.passed,
                    "float_layers": len(result.kept_float),
                    "float_compute": result.float_compute,
                    "cosine": result.final.outputs[0].cosine,
                    "verifications": len(result.trials),
                    "seconds": time.perf_counter() - start,
                }
            )
            console.print(rows[-1])
    plan = plan_qdq(model, ranges, QdqOptions())
    qmodel = apply_qdq(model, plan)
    report = layer_report.analyze(model, qmodel, plan, held, collection.stats)
    table = Table(
        title=f"Auto-fallback ranking, EfficientNet-Lite0, {len(held_x)} held-out photos (local sensitivity)"
    )
    for col in ("gate", "ranking", "passed", "float layers", "float MACs", "cosine", "verifications", "s"):
        table.add_column(col, justify="left" if col in ("gate", "ranking") else "right")
    for r in rows:
        table.add_row(
            r["gate"],
            r["ranking"],
            str(r["passed"]),
            str(r["float_layers"]),
            f"{r['float_compute']:.1%}",
            f"{r['cosine']:.5f}",
            str(r["verifications"]),
            f"{r['seconds']:.0f}",
        )
    console.print(table)
    worst = ", ".join(f"{la.node} {la.sqnr_alone_db:.1f} dB" for la in report.worst(3))
    console.print(
        f"per-layer report: {len(report.layers)} layers, {report.samples} samples, {report.seconds:.1f} s; "
        f"worst alone: {worst}"
    )
    if args.json:
        payload = {"rows": rows, "report_seconds": report.seconds, "report_layers": len(report.layers)}
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
