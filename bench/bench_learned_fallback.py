"""The demo's gate, round-to-nearest vs learned rounding + auto-fallback (calibrators/learned_fallback.py).

Setup of `trtbuild demo`: EfficientNet-Lite0 through the default (dynamo) export, 64 calibration / 200
held-out photos (seed 7, 256 px, resized and center-cropped to 224; --holdout), mse ranges, the default
99 % top-1 gate decided on the decisive photos (near-ties listed, calibrators/near_ties.py; --tie-margin),
auto-fallback. Per rounding: whether the gate passed, the layers kept float and their share of the
MACs, top-1 agreement and cosine on the held-out photos, the held-out photos whose top-1 differs with the
FP32 top-2 logit margin on each (a tiny margin decides a 32-photo gate by chance), and wall / process CPU
seconds of the whole `quantize()` (the machine is shared: CPU seconds are the measure).

Run: python3 bench/bench_learned_fallback.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrators import fidelity  # noqa: E402
from calibrators.collect import load_model  # noqa: E402
from calibrators.data import model_inputs, open_data  # noqa: E402
from calibrators.quantize import FidelityGateError, quantize  # noqa: E402
from calibrators.quantize_settings import QuantizeSettings  # noqa: E402
from trtbuild import demo, examples  # noqa: E402

console = Console(width=160)


def held_out_margins(model_path: Path, photos: Path, settings: QuantizeSettings) -> tuple[Any, np.ndarray]:
    """The held-out batches quantize() judges on and the FP32 top-2 logit margin of each photo."""
    model = load_model(model_path)
    data = open_data(photos, model_inputs(model), settings.preprocess)
    _, held = data.split(settings.holdout or demo.HOLDOUT_PHOTOS, settings.seed)
    batches = list(held.batches(settings.batch_size))
    logits = fidelity.run_batches(fidelity.session(model, settings.threads), batches)["logits"]
    top2 = np.sort(logits, axis=1)[:, -2:]
    return batches, top2[:, 1] - top2[:, 0]


def demo_setup(folder: Path, holdout: int) -> tuple[Path, Path]:
    """The demo's model (dynamo export, dynamic batch) and its seed-7 photos: calibration + ``holdout``."""
    from export.pipeline import export_model
    from export.settings import ExportSettings

    size = examples.EFFNET_SIZE
    model_path = export_model(
        "trtbuild.examples:efficientnet_lite0",
        [f"{examples.EFFNET_INPUT}:1x3x{size}x{size}"],
        folder / "efficientnet_lite0.onnx",
        ExportSettings(dynamic_batch=True, output_names=["logits"]),
    ).onnx_path
    count = demo.CALIBRATION_PHOTOS + holdout
    return model_path, examples.write_photo_folder(folder / "photos", count, size=demo.PHOTO_SIZE, seed=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--roundings", default="nearest,learned", help="rows; a '+eq' suffix adds --equalize-depthwise"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--holdout", type=int, default=demo.HOLDOUT_PHOTOS, help="held-out photos")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--tie-margin", default="auto", help="near-ties (calibrators/near_ties.py): auto, 0 (raw) or a margin"
    )
    parser.add_argument("--budget", type=float, default=1e4, help="learned rounding CPU seconds")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench_learned_fallback_"))
    model_path, photos = demo_setup(tmp, args.holdout)
    tie_margin = None if args.tie_margin == "auto" else float(args.tie_margin)
    base = QuantizeSettings(
        holdout=args.holdout, auto_fallback=True, threads=args.threads, tie_margin=tie_margin
    )
    held, margin = held_out_margins(model_path, photos, base)
    reference = fidelity.run_batches(fidelity.session(load_model(model_path), args.threads), held)["logits"]
    rows: list[dict[str, Any]] = []
    for row in args.roundings.split(","):
        rounding, _, extra = row.partition("+")
        settings = QuantizeSettings.from_overrides(
            base,
            {"rounding": rounding, "rounding_budget_s": args.budget, "equalize_depthwise": extra == "eq"},
        )
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            res = quantize(model_path, photos, tmp / row.replace("+", "_"), settings, show_progress=False)
        except FidelityGateError as exc:
            rows.append({"rounding": row, "passed": False, "error": str(exc)})
            continue
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out = fidelity.run_batches(fidelity.session(onnx.load(str(res.onnx_path)), args.threads), held)
        agree = reference.argmax(1) == out["logits"].argmax(1)
        fb = res.fallback
        rows.append(
            {
                "rounding": row,
                "learned_used": res.rounding is not None,
                "passed": res.passed,
                "float_layers": [] if fb is None else list(fb.kept_float),
                # The learned steps (learned_fallback.py): float set size, gate, fidelity of each.
                "learned_steps": [] if fb is None else [t for t in fb.trials if "learned_rounding" in t],
                "float_compute": res.float_compute,
                "summary": res.fidelity.summary(),
                "cosine": res.fidelity.outputs[0].cosine,
                "top1": res.fidelity.outputs[0].top1_agreement,
                "top1_interval": res.fidelity.outputs[0].top1_interval,
                "raw_top1": res.fidelity.outputs[0].raw_top1,
                "raw_top1_interval": res.fidelity.outputs[0].raw_top1_interval,
                "decisive": res.fidelity.outputs[0].decisive_samples,
                "near_ties": res.fidelity.outputs[0].near_ties,
                "differ": {int(i): round(float(margin[i]), 3) for i in np.flatnonzero(~agree)},
                "trials": [] if fb is None else fb.trials,
                "wall_s": wall,
                "cpu_s": cpu,
            }
        )
        console.print({k: v for k, v in rows[-1].items() if k != "trials"})
    smallest = ", ".join(f"{m:.3f}" for m in np.sort(margin)[:4])
    table = Table(
        title=f"Demo gate (99% top-1, {len(margin)} held-out photos; smallest FP32 top-2 margins {smallest})"
    )
    columns = ("rounding", "passed", "float layers", "float MACs", "top-1 decisive", "raw top-1", "cosine")
    for col in (*columns, "CPU s", "wall s"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["rounding"], "no", "", "", r["error"][:60], "", "", "", "")
            continue
        table.add_row(
            r["rounding"]
            + ("" if r["learned_used"] or r["rounding"].startswith("nearest") else " (nearest kept)"),
            str(r["passed"]),
            str(len(r["float_layers"])),
            f"{r['float_compute']:.1%}",
            _top1(r["top1"], r["top1_interval"], r["decisive"]),
            _top1(r["raw_top1"] if r["raw_top1"] is not None else r["top1"], r["raw_top1_interval"], None),
            f"{r['cosine']:.5f}",
            f"{r['cpu_s']:.0f}",
            f"{r['wall_s']:.0f}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")


def _top1(value: float, interval: Any, samples: int | None) -> str:
    shown = f"{value:.2%}" + ("" if interval is None else f" [{interval[0]:.1%}, {interval[1]:.1%}]")
    return shown + ("" if samples is None else f" on {samples}")


if __name__ == "__main__":
    main()
