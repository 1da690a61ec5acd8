"""Where FP8 (E4M3) loses against INT8, per model and per layer, weights vs activations.

For each model (bench/fp8_models.py data, default pipelines, reference Q/DQ semantics):

* whole-model fidelity of INT8, FP8, FP8 weights only (activations float) and FP8 activations only
  (weights float), and the same two splits for INT8;
* each layer's SQNR "alone" (calibrators/layer_report.py: the layer fed FP32 inputs, its own Q/DQ only) in
  INT8 and FP8, and the FP8 one split into its weight-only and activation-only SQNR; the layers where FP8
  loses most are listed;
* with --fallback: FP8 auto-fallback (the most sensitive layers kept FP16) with the gate set to INT8's
  cosine on the same held-out data: how many layers and what share of the MACs FP16 takes to match INT8.

Run: python3 bench/bench_fp8_layers.py --models effnet --fallback  (1 thread; CPU seconds reported)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fp8_models as fm  # noqa: E402

from calibrators import fallback as fallback_search  # noqa: E402
from calibrators import fidelity, layer_report  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.qdq import QdqOptions, QdqPlan, apply_qdq  # noqa: E402

WORST = 8


def split(plan: QdqPlan, keep: str) -> QdqPlan:
    """The plan with only its weight Q/DQ ("weights") or only its activation Q/DQ ("activations")."""
    if keep == "weights":
        return dataclasses.replace(plan, activations={})
    return dataclasses.replace(plan, weights={})


def whole(bench: fm.BenchModel, qmodel: onnx.ModelProto, reference: dict[str, np.ndarray]) -> str:
    test = fidelity.run_batches(fidelity.session(qmodel, 1), bench.held_batches())
    o = fidelity.compare(reference, test, kinds=fidelity.decide_kinds(bench.model, reference)).outputs[0]
    top1 = f"top-1 {o.top1_agreement:.1%}, " if o.top1_agreement is not None else ""
    return f"{top1}cos {o.cosine:.4f}, 1-cos {1 - o.cosine:.2e}, SQNR {o.sqnr_db:.1f} dB"


def alone(model: onnx.ModelProto, plan: QdqPlan, bench: fm.BenchModel) -> dict[str, float]:
    qmodel = apply_qdq(model, plan)
    report = layer_report.analyze(model, qmodel, plan, bench.held_batches(), samples=8, threads=1)
    return {layer.node: layer.sqnr_alone_db for layer in report.layers}


def study(name: str, tmp: Path, with_fallback: bool) -> None:
    loader, n_calib, n_held = fm.MODELS[name]
    bench = loader(tmp, n_calib, n_held)
    print(f"\n== {bench.label}: {len(bench.calib)} calibration / {len(bench.held)} held-out ==", flush=True)
    reference = fidelity.run_batches(fidelity.session(bench.model, 1), bench.held_batches())
    graphs = {}
    for precision in ("int8", "fp8"):
        prepared = fm.prepare(bench, precision)
        qmodel, plan = fm.quantize_graph(prepared, precision)
        graphs[precision] = (prepared, plan)
        print(f"{precision} ({prepared.smooth_note}, {len(plan.quantized_nodes)} layers):", flush=True)
        print(f"  all Q/DQ          {whole(bench, qmodel, reference)}", flush=True)
        for keep in ("weights", "activations"):
            only = apply_qdq(prepared.model, split(plan, keep))
            print(f"  {keep:<11} only  {whole(bench, only, reference)}", flush=True)
    (p8, plan8), (pf, planf) = graphs["int8"], graphs["fp8"]
    s8 = alone(p8.model, plan8, bench)
    sf = alone(pf.model, planf, bench)
    sw = alone(pf.model, split(planf, "weights"), bench)
    sa = alone(pf.model, split(planf, "activations"), bench)
    both = [n for n in planf.quantized_nodes if n in s8 and n in sf]
    worse = [n for n in both if sf[n] < s8[n]]
    by_weights = [n for n in worse if sw.get(n, np.inf) < sa.get(n, np.inf)]
    gaps = np.array([s8[n] - sf[n] for n in both])
    print(
        f"per layer (SQNR alone, {len(both)} layers in both): FP8 below INT8 on {len(worse)}, by "
        f"{np.median(gaps):.1f} dB median (max {gaps.max():.1f}); of those, weight rounding dominates on "
        f"{len(by_weights)}, activation rounding on {len(worse) - len(by_weights)}"
    )
    print(f"  {'layer':<48} {'INT8':>6} {'FP8':>6} {'FP8 W':>6} {'FP8 A':>6}  dB (alone)")
    for n in sorted(both, key=lambda n: sf[n] - s8[n])[:WORST]:
        print(f"  {n[-48:]:<48} {s8[n]:6.1f} {sf[n]:6.1f} {sw.get(n, np.nan):6.1f} {sa.get(n, np.nan):6.1f}")
    if with_fallback:
        fallback_to_int8(bench, reference, pf, planf, plan8, p8)


def fallback_to_int8(
    bench: fm.BenchModel,
    reference: dict[str, np.ndarray],
    pf: fm.Prepared,
    planf: QdqPlan,
    plan8: QdqPlan,
    p8: fm.Prepared,
) -> None:
    """FP8 auto-fallback with the gate at INT8's measured cosine (and top-1 where it is a classifier)."""
    kinds = fidelity.decide_kinds(bench.model, reference)
    int8 = fidelity.run_batches(fidelity.session(apply_qdq(p8.model, plan8), 1), bench.held_batches())
    o = fidelity.compare(reference, int8, kinds=kinds).outputs[0]
    # per output, so a classifier is held to INT8's cosine too (by default it is judged by top-1 alone)
    gate = f"{o.name}:cosine={o.cosine:.4f}"
    start, cpu = time.perf_counter(), time.process_time()
    result = fallback_search.auto_fallback(
        pf.model,
        compute_ranges(pf.collection, "mse", grid="fp8"),
        QdqOptions(activation_type="fp8"),
        bench.held_batches(),
        fidelity.parse_min_fidelity(gate),
        reference=reference,
        kinds=kinds,
        max_float_compute=1.0,
    )
    f = result.final.outputs[0]
    top1 = f"top-1 {f.top1_agreement:.1%}, " if f.top1_agreement is not None else ""
    print(
        f"FP8 auto-fallback to INT8's fidelity ({gate}): {'passed' if result.passed else 'FAILED'} with "
        f"{len(result.kept_float)} layers FP16 ({result.float_compute:.1%} of the MACs), {top1}cos "
        f"{f.cosine:.4f}; FP8 layers left {len(result.plan.quantized_nodes)}; "
        f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU"
    )
    print(f"  kept FP16: {', '.join(result.kept_float)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="effnet,minilm,dbnet")
    parser.add_argument("--fallback", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_fp8_layers_"))
    start, cpu = time.perf_counter(), time.process_time()
    for name in args.models.split(","):
        study(name, tmp, args.fallback)
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
