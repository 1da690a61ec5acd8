"""INT8 accuracy of weight rounding, side by side in one run (same model, calibration and held-out data,
same threads): EfficientNet-Lite0 from both torch exporters, 64 calibration / 128 held-out photo crops.

Rows: trtbuild (mse ranges) with round-to-nearest (with and without bias correction) and with learned
rounding (calibrators/adaround.py; bias correction only on layers it did not reach), each with every layer
INT8 and with only the stem conv and the classifier float (the issue's target), plus output-aware ranges
under learned rounding; with ``--peers``: Qualcomm AIMET QuantSim + AdaRound (aimet-onnx in `.venv-aimet`,
via bench/aimet_quantize.py, ``--aimet-iterations`` steps per layer), ONNX Runtime quantize_static
(Entropy, QDQ, per-channel) and NVIDIA ModelOpt 0.47 (entropy, `.venv-modelopt`). Every graph is judged
here with reference Q/DQ semantics (the model, not this CPU's int8 kernels): top-1 agreement with its 95%
Wilson interval (calibrators/gate_stats.py), the same on the decisive crops as the gate decides it (near-ties
set aside: FP32 top-2 margin within the FP16 graph's largest margin shift, calibrators/near_ties.py), mean
cosine, and the held-out crops whose top-1 differs with the FP32 model's top-2 logit margin on them (a small
margin: a coin flip, not a broken layer). Times: wall
and process CPU seconds (the machine is shared; CPU seconds are what free cores would need).

Rows of learned rounding are chosen with ``--learned`` (all, edges, qdrop: QDrop input mixing at ``--drop``,
calibrators/adaround_qdrop.py; old: the pre-2026-12-01 sample count; fisher: output-channel weights at
``--output-weight``, calibrators/adaround_fisher.py; bc: the learned integers with the analytic bias
correction added on every layer, to show why quantize() leaves it off there; split: the learned graph's
weight and activation quantization each alone, to show which error is left; block: block
reconstruction, calibrators/block_recon.py, on top of the edges row's learned rounding; not on the CLI,
see docs/int8-accuracy.md).

Run: python3 bench/bench_int8_accuracy.py [--holdout 192] [--learned edges,qdrop] [--budget 5000]
     [--peers --aimet-iterations 100 --aimet-samples 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import modelopt_quantize, ort_static  # noqa: E402

from calibrators import (  # noqa: E402
    act_step,
    adaround,
    block_recon,
    fidelity,
    gate_stats,
    near_ties,
    output_aware,
)
from calibrators import bias_correction as bcm  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect  # noqa: E402
from calibrators.near_ties import NearTies  # noqa: E402
from calibrators.qdq import GraphCache, QdqOptions, apply_qdq, plan_qdq, quantizable_activations  # noqa: E402
from calibrators.qdq_scales import _bias_correction  # noqa: E402
from calibrators.ranges import RangeSet  # noqa: E402
from trtbuild import examples  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)
console = Console(width=170)
Sample = dict[str, np.ndarray]
REPO = Path(__file__).resolve().parents[1]
AIMET_PYTHON = REPO / ".venv-aimet" / "bin" / "python"
CALIBRATION = 64
HOLDOUT = 128  # a 64-crop top-1 has a +-3 % interval: one crop is 1.6 %


def export(exporter: str, out: Path) -> Path:
    import torch

    model = examples.efficientnet_lite0()
    if exporter == "dynamo":
        from export.pipeline import export_model

        return export_model(
            model,
            ["images:1x3x224x224"],
            out / "effnet_dynamo.onnx",
            dynamic_batch=True,
            output_names=["logits"],
        ).onnx_path
    path = out / "effnet_torchscript.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def aimet_adaround(
    path: Path, calib: list[Sample], tmp: Path, iterations: int
) -> tuple[Any, float, float | None]:
    if not AIMET_PYTHON.exists():
        return "skipped: .venv-aimet not found (setup in tests/test_encodings_aimet.py)", 0.0, None
    data = tmp / f"{path.stem}.calib.npz"
    np.savez(data, images=np.concatenate([s["images"] for s in calib]))
    out = tmp / f"{path.stem}.aimet.onnx"
    script = REPO / "bench" / "aimet_quantize.py"
    cmd = [str(AIMET_PYTHON), str(script), str(path), str(data), str(out), "--iterations", str(iterations)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {done.returncode}): {last[:90]}", 0.0, None
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return onnx.load(str(out)), float(times["seconds"]), times.get("cpu_seconds")


def near_tie_rows(model: onnx.ModelProto, held: list[Sample], reference: dict[str, np.ndarray]) -> NearTies:
    """The held-out crops the gate sets aside as near-ties, found as quantize() finds them."""
    kinds = near_ties.attach(fidelity.decide_kinds(model, reference), model, reference, held, threads=2)
    ties = kinds["logits"].ties
    assert ties is not None, "the FP16 graph of EfficientNet-Lite0 runs here"
    return ties


def judge(
    qmodel: onnx.ModelProto, held: list[Sample], reference: dict[str, np.ndarray], ties: NearTies
) -> dict[str, Any]:
    """Top-1 agreement (with its 95 % interval), the same on the decisive crops (near-ties set aside, as
    the gate decides), mean cosine, and the disagreeing crops with the FP32 top-2 logit margin on each."""
    out = fidelity.run_batches(fidelity.session(qmodel, 2), held)
    a, b = reference["logits"], out["logits"]
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    agree = a.argmax(1) == b.argmax(1)
    top2 = np.sort(a, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    lo, hi = gate_stats.wilson_interval(float(agree.sum()), len(agree))
    decided = near_ties.decide(agree[:, None], ties)
    wrong = [int(i) for i in np.flatnonzero(~agree)]
    return {
        "top1": float(agree.mean()),
        "top1_interval": [lo, hi],
        "decisive_top1": decided.agreement,
        "decisive_interval": list(decided.interval),
        "decisive_samples": decided.samples,
        "near_ties": len(ties.tied),
        "tie_floor": ties.floor,
        "cosine": float(cos.mean()),
        "disagree": {i: round(float(margin[i]), 3) for i in wrong},
    }


def edge_layers(model: onnx.ModelProto) -> tuple[str, str]:
    """The stem conv (first Conv) and the classifier (last Gemm/MatMul): the layers the issue's target
    keeps float."""
    compute = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return compute[0], compute[-1]


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def trtbuild_rows(
    model: onnx.ModelProto, calib: list[Sample], args: argparse.Namespace
) -> list[tuple[str, Any, float, float | None]]:
    """Our rows: nearest and learned rounding, every layer INT8 and stem/classifier float, and output-aware
    ranges under learned rounding."""
    cache = GraphCache(model)
    collection, calib_s, _ = timed(
        lambda: collect(model, calib, tensors=quantizable_activations(model), show_progress=False, threads=2)
    )
    mse = compute_ranges(collection, "mse")
    edges = tuple((n, "bench: stem/classifier float") for n in edge_layers(model))
    config = adaround.AdaRoundConfig(budget_s=args.budget)
    rows: list[tuple[str, Any, float, float | None]] = []

    def learned_row(
        name: str,
        ranges: RangeSet,
        keep: tuple[tuple[str, str], ...],
        cfg: adaround.AdaRoundConfig = config,
        with_bc: bool = False,
        split: bool = False,
        block: bool = False,
    ) -> None:
        plan = plan_qdq(cache, ranges, QdqOptions(bias_correction=False, keep_float=keep))
        learned, wall, cpu = timed(lambda: adaround.learn_rounding(cache, plan, calib, cfg, threads=2))
        # Bias correction stays on only where learning ran out of time (quantize() does the same).
        options = QdqOptions(keep_float=keep, learned_rounding=learned.decided)
        rows.append((name, apply_qdq(cache, plan_qdq(cache, ranges, options)), calib_s + wall, cpu))
        console.print(
            f"  {name}: kept on {len(learned.weights)} of {len(learned.layers)} layers, "
            f"{len(learned.skipped)} out of time; {wall:.0f} s wall, {cpu:.0f} CPU s"
        )
        if block:
            # A second stage on this same layer-wise result: CPU s of both stages.
            recon, b_wall, b_cpu = timed(lambda: block_recon.reconstruct(cache, ranges, options, calib))
            steps = act_step.with_scales(ranges, recon.scales)
            blocked = apply_qdq(cache, plan_qdq(cache, steps, block_recon.options_after(options, recon)))
            rows.append((f"{name} + block recon.", blocked, calib_s + wall + b_wall, cpu + b_cpu))
            console.print(
                f"  + block reconstruction: {sum(b.kept for b in recon.blocks)} of {len(recon.blocks)} "
                f"blocks kept, {len(recon.scales)} steps, {len(recon.weights)} weights; {b_wall:.0f} s wall, "
                f"{b_cpu:.0f} CPU s"
            )
        if split:
            # Where the remaining error comes from: each half of the quantization alone.
            plan = plan_qdq(cache, ranges, options)
            rows.append(
                (f"{name}: its weights, float activations", _only(cache, plan, weights=True), 0, None)
            )
            nearest = plan_qdq(cache, ranges, QdqOptions(keep_float=keep))
            rows.append(("int8 activations, float weights", _only(cache, nearest, weights=False), 0, None))
        if with_bc:
            rows.append(
                (f"{name} + bias corr. on every layer", with_bias_correction(cache, ranges, options), 0, None)
            )

    wanted = set(args.learned.split(","))
    for keep, where in (((), "all INT8"), (edges, "stem+classifier float")):
        for bc in (True, False):
            plan = plan_qdq(cache, mse, QdqOptions(bias_correction=bc, keep_float=keep))
            name = f"nearest{' + bias corr.' if bc else ''}, {where}"
            rows.append((name, apply_qdq(cache, plan), calib_s, None))
        if ("all" if keep == () else "edges") in wanted:
            edge = keep != ()
            learned_row(
                f"learned, {where}",
                mse,
                keep,
                with_bc="bc" in wanted and edge,
                split="split" in wanted and edge,
                block="block" in wanted and edge,
            )
    qdrop = replace(config, drop=args.drop)
    if "qdrop" in wanted:
        learned_row(f"learned + QDrop {args.drop:g}, stem+classifier float", mse, edges, qdrop)
    if "fisher" in wanted:
        weighted = replace(config, output_weight=args.output_weight)
        name = f"learned + output weight {args.output_weight:g}, stem+classifier float"
        learned_row(name, mse, edges, weighted, with_bc="bc" in wanted)
    if "old" in wanted:
        # The default before 2026-12-01: half the crops and rows (the late 7x7 layers have 1152-1280
        # inputs but only 49 positions per crop, so 32 crops give them barely more rows than unknowns).
        fewer = replace(config, samples=32, rows=2048)
        learned_row(
            f"learned ({fewer.samples} crops, {fewer.rows} rows), stem+classifier float", mse, edges, fewer
        )
    if args.output_aware:
        plan = plan_qdq(cache, mse, QdqOptions(keep_float=edges))
        aware, wall, _ = timed(
            lambda: output_aware.refine(model, mse, plan, collection.stats, calib, threads=2).ranges
        )
        rows.append(
            (
                "output-aware + bias corr., stem+classifier float",
                apply_qdq(cache, plan_qdq(cache, aware, QdqOptions(keep_float=edges))),
                calib_s + wall,
                None,
            )
        )
        learned_row("output-aware + learned, stem+classifier float", aware, edges)
        if "qdrop" in wanted:
            learned_row(
                f"output-aware + learned + QDrop {args.drop:g}, stem+classifier float", aware, edges, qdrop
            )
    return rows


def with_bias_correction(cache: GraphCache, ranges: RangeSet, options: QdqOptions) -> onnx.ModelProto:
    """The learned integers with the analytic bias correction (E[(W_q - W) x] from the float channel means,
    as round-to-nearest gets it) on every layer, which plan_qdq leaves off for learned layers."""
    plan = plan_qdq(cache, ranges, options)
    means = bcm.means_from(ranges)
    for key, w in list(plan.weights.items()):
        rounded = plan.rounded_weights.get(key)
        scales = np.asarray(w.scales, np.float32)
        fix = rounded is not None and _bias_correction(
            cache.graph, key, w.consumers, w.axis, scales, means, w.weight_format, rounded
        )
        if fix:
            plan.weights[key] = replace(w, corrected_bias=fix[0], bias_shift=fix[1])
    return apply_qdq(cache, plan)


def _only(cache: GraphCache, plan: Any, weights: bool) -> onnx.ModelProto:
    """The plan's weight Q/DQ only (``weights``), or its activation Q/DQ only."""
    part = replace(plan, activations={}) if weights else replace(plan, weights={}, rounded_weights={})
    return apply_qdq(cache, part, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", type=int, default=HOLDOUT, help="held-out crops")
    parser.add_argument("--peers", action="store_true", help="also AIMET, ORT and ModelOpt rows")
    parser.add_argument("--aimet-iterations", type=int, default=10, help="AIMET AdaRound steps per layer")
    parser.add_argument("--aimet-samples", type=int, default=CALIBRATION, help="AIMET calibration crops")
    parser.add_argument("--only-peers", action="store_true", help="skip the trtbuild rows")
    parser.add_argument("--output-aware", action="store_true", help="also output-aware range rows")
    parser.add_argument("--budget", type=float, default=adaround.AdaRoundConfig.budget_s, help="learning s")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument(
        "--learned",
        default="all,edges,qdrop,old",
        help="learned-rounding rows: all (every layer INT8), edges (stem+classifier float), qdrop, old, "
        "fisher, bc, split, block",
    )
    parser.add_argument("--drop", type=float, default=0.5, help="QDrop: share of inputs fitted float")
    parser.add_argument("--output-weight", type=float, default=1.0, help="fisher rows: weight exponent")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_int8_accuracy_"))
    x = examples.normalize_imagenet(examples.photo_crops(CALIBRATION + args.holdout, seed=1))
    calib = [{"images": x[i : i + 8]} for i in range(0, CALIBRATION, 8)]
    held = [{"images": x[i : i + 16]} for i in range(CALIBRATION, CALIBRATION + args.holdout, 16)]
    table = Table(
        title=f"EfficientNet-Lite0 INT8 vs FP32, {CALIBRATION} calibration / {args.holdout} held-out crops"
    )
    for col in (
        "export",
        "quantizer",
        "top-1 agreement [95% interval]",
        "decisive top-1 [95% interval] (ties)",
        "cosine",
        "differ",
        "wall s",
        "CPU s",
    ):
        table.add_column(col)
    payload: list[dict[str, Any]] = []
    for exporter in args.exporters.split(","):
        path = export(exporter, tmp)
        model = onnx.load(str(path))
        reference = fidelity.run_batches(fidelity.session(model, 2), held)
        ties = near_tie_rows(model, held, reference)
        console.print(f"  {exporter}: {len(ties.tied)} near-tie crops ({ties.describe()})")
        rows = [] if args.only_peers else trtbuild_rows(model, calib, args)
        if args.peers:
            # AIMET's per-layer cost is mostly re-running the model for each layer's inputs: fewer crops
            # (--aimet-samples) are what makes it finish here at all.
            few = calib[: max(1, args.aimet_samples // 8)]
            aimet, aimet_s, aimet_cpu = aimet_adaround(path, few, tmp, args.aimet_iterations)
            name = f"AIMET QuantSim + AdaRound ({args.aimet_iterations} it., {8 * len(few)} crops)"
            rows.append((name, aimet, aimet_s, aimet_cpu))
            single = [{"images": s["images"][i : i + 1]} for s in calib for i in range(8)]
            ort_model, ort_s = ort_static(path, single, tmp, "Entropy")
            rows.append(("ORT quantize_static Entropy", ort_model, ort_s, None))
            mo, mo_s = modelopt_quantize(path, calib, tmp, "entropy")
            rows.append(("NVIDIA ModelOpt entropy", mo, mo_s, None))
        for name, qmodel, seconds, cpu_s in rows:
            if isinstance(qmodel, str):
                table.add_row(exporter, name, qmodel, "", "", "", "", "")
                continue
            r = judge(qmodel, held, reference, ties)
            lo, hi = r["top1_interval"]
            dlo, dhi = r["decisive_interval"]
            table.add_row(
                exporter,
                name,
                f"{r['top1']:.1%} [{lo:.1%}, {hi:.1%}]",
                f"{r['decisive_top1']:.1%} [{dlo:.1%}, {dhi:.1%}] ({r['near_ties']})",
                f"{r['cosine']:.4f}",
                str(len(r["disagree"])),
                f"{seconds:.1f}",
                "" if cpu_s is None else f"{cpu_s:.1f}",
            )
            payload.append({"export": exporter, "quantizer": name, "seconds": seconds, "cpu_s": cpu_s, **r})
            console.print(f"  {exporter} {name}: differ on crops (FP32 top-2 margin) {r['disagree']}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
