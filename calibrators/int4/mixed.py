"""`quantize --precision int4-weights,int8`: each MatMul/Gemm weight layer is either INT4 weight-only
(W4A16) or INT8 Q/DQ (W8A8), in one graph; activation-by-activation MatMuls (attention) and every other
INT8 placement stay INT8.

TensorRT quantizes activations and weights for INT8 and FP8 and supports INT4 for weights only ("Working
with Quantized Types", TensorRT 10.x docs), so INT4 weights under INT8 activation Q/DQ on one MatMul
("W4A8") is not something it builds: the mix is a per-layer choice between the two patterns. Layers are
ranked by the relative output noise their INT4 weight adds on the calibration inputs (the fallback's
"local" sensitivity, calibrators/fallback.py, measured on the weight alone), least first; the graph keeps
the longest prefix of that order in INT4 that still passes the held-out gate (bisection, verified by real
runs), the rest of the weight layers INT8. Written as ``<model>.int4int8.onnx`` + ``.int4int8.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibrators import fidelity, gate_stats, near_ties, output_kinds
from calibrators.calibrate import compute_ranges
from calibrators.collect import DEFAULT_BATCH_SIZE, collect, load_model, tensors_to_collect
from calibrators.data import model_inputs, open_data
from calibrators.fidelity import FidelityReport, FidelityThreshold
from calibrators.fidelity_spec import check_outputs
from calibrators.int4 import pipeline, sequential
from calibrators.int4.blocks import DEFAULT_BLOCK_SIZE, BlockQuant
from calibrators.int4.graph import (
    WeightLayer,
    find_layers,
    hoist_constants,
    upgrade_opset,
    weight_kn,
    write_int4,
)
from calibrators.int4.segments import SegmentRunner
from calibrators.preprocess import Preprocess
from calibrators.qdq import QdqOptions, QdqPlan, apply_qdq, ensure_node_names, plan_qdq
from calibrators.qdq_scales import GraphCache
from calibrators.ranges import RangeSet
from trtbuild.core import ort as ort_core
from trtbuild.core import output_set
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)

PRECISION = "int4-weights,int8"
TAG = "int4int8"
INT4_REASON = "INT4 weight-only (--precision int4-weights,int8)"


class MixedGateError(pipeline.Int4GateError):
    """Not even the graph with every weight layer INT8 passes: no mix of INT4 and INT8 can."""

    def __init__(self, report: FidelityReport) -> None:
        self.report = report
        failing = "; ".join(
            f"{o.name} ({o.kind}): {', '.join(o.failures(report.threshold))}" for o in report.failing()
        )
        TrtbuildError.__init__(
            self,
            f"int4-weights,int8: even with every weight layer INT8 the fidelity is below the gate on "
            f"{report.samples} held-out samples ({report.semantics} semantics): {failing}; "
            "nothing was written",
            "use --precision int8 --auto-fallback (float layers where INT8 fails) or a lower --min-fidelity",
        )


@dataclass
class MixedResult:
    onnx_path: Path
    report_path: Path
    int4_layers: list[str]
    int8_layers: list[str]  # weight layers in INT8 (W8A8)
    noise: dict[str, float]  # relative output noise of each weight layer's INT4 weight (the ranking)
    fidelity: FidelityReport
    trials: list[dict[str, Any]]  # INT4 prefix length, passed, score
    fp32_weight_bytes: int
    weight_bytes: int  # INT4 layers packed + block scales, INT8 layers 1 byte + per-channel scales
    calibration_samples: int
    holdout_samples: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.onnx_path),
            "precision": PRECISION,
            "int4_layers": self.int4_layers,
            "int8_weight_layers": self.int8_layers,
            "counts": {"int4_weight_only": len(self.int4_layers), "int8": len(self.int8_layers)},
            "int4_noise": self.noise,
            "trials": self.trials,
            "matmul_weight_bytes": {"fp32": self.fp32_weight_bytes, "mixed": self.weight_bytes},
            "calibration_samples": self.calibration_samples,
            "holdout_samples": self.holdout_samples,
            "seconds": round(self.seconds, 2),
            "fidelity": self.fidelity.to_json(),
        }


def int4_noise(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    rows: Mapping[str, np.ndarray],
    quants: Mapping[str, BlockQuant],
    scales: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """|X W_int4 - X W|^2 / |X W|^2 per layer on its calibration inputs (AWQ's 1/s folded back)."""
    noise = {}
    for layer in layers:
        x = rows[layer.activation].astype(np.float64)
        w = weight_kn(model, layer).astype(np.float64)
        s = scales.get(layer.activation)
        q = quants[layer.node].dequantized() / (s[:, None] if s is not None else 1.0)
        ref = x @ w
        noise[layer.node] = float(np.sum((x @ q - ref) ** 2) / max(np.sum(ref**2), 1e-30))
    return noise


class _Builder:
    """The mixed graph for a set of INT4 layers: INT8 plan without them, then their INT4 weights."""

    def __init__(
        self,
        model: onnx.ModelProto,
        ranges: RangeSet,
        layers: Sequence[WeightLayer],
        quants: Mapping[str, BlockQuant],
        scales: Mapping[str, np.ndarray],
    ) -> None:
        self.cache = GraphCache(model)
        self.ranges, self.layers, self.quants, self.scales = ranges, layers, quants, scales

    def build(self, int4_nodes: Sequence[str]) -> tuple[QdqPlan, onnx.ModelProto]:
        keep = tuple((n, INT4_REASON) for n in int4_nodes)
        plan = plan_qdq(self.cache, self.ranges, QdqOptions(keep_float=keep))
        qmodel = apply_qdq(self.cache, plan, check=False)
        chosen = [layer for layer in self.layers if layer.node in set(int4_nodes)]
        if not chosen:
            return plan, qmodel
        used = {layer.activation for layer in chosen}
        qmodel, _ = write_int4(
            qmodel, chosen, self.quants, {a: s for a, s in self.scales.items() if a in used}
        )
        return plan, qmodel


def quantize_int4_int8(
    model_path: str | Path,
    data: Any,
    out_dir: str | Path,
    *,
    algorithm: str = pipeline.DEFAULT_ALGORITHM,
    block_size: int = DEFAULT_BLOCK_SIZE,
    samples: int | None = None,
    holdout: int | None = None,
    min_fidelity: str | float | Sequence[str] | FidelityThreshold | None = None,
    output_kind: Sequence[str] | Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    preprocess: Preprocess | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    seed: int = 0,
    tie_margin: float | None = near_ties.AUTO,
) -> MixedResult:
    """INT4 weight-only where the gate allows, INT8 Q/DQ elsewhere (see the module docstring). Raises
    :class:`calibrators.int4.pipeline.Int4GateError` when not even the all-INT8 graph passes."""
    pipeline.check_algorithm(algorithm)
    start = time.perf_counter()
    with output_set.writer_lock(out_dir):
        threshold = (
            min_fidelity
            if isinstance(min_fidelity, FidelityThreshold)
            else fidelity.parse_min_fidelity(min_fidelity)
        )
        kind_overrides = output_kinds.parse_output_kinds(output_kind)
        model = ensure_node_names(upgrade_opset(load_model(model_path)))
        hoist_constants(model)
        graph_outputs = [o.name for o in model.graph.output]
        check_outputs(threshold, graph_outputs)
        output_kinds.check_overrides(kind_overrides, graph_outputs)
        layers = find_layers(model, exclude)
        if not layers:
            raise TrtbuildError(
                f"{model_path} has no MatMul/Gemm with a constant 2-D weight for INT4",
                "use --precision int8 for this model",
            )
        pipeline.check_block_size(layers, block_size)
        reference_session = fidelity.float_session(model, threads)
        all_data = open_data(data, model_inputs(model), preprocess)
        if holdout is None:
            holdout = gate_stats.auto_holdout(all_data.known_length(), samples)
        calib, held = all_data.split(holdout, seed)
        calib = calib.sample(samples, seed)
        activations = list(dict.fromkeys(layer.activation for layer in layers))
        rows, calib_count = pipeline.collect_inputs(model, activations, calib, batch_size, threads, seed)
        if algorithm == "awq-gptq":
            quants, scales, _ = sequential.quantize_sequential(
                model,
                layers,
                rows,
                SegmentRunner(model, calib.batches(batch_size), threads, seed),
                block_size,
            )
        else:
            quants, scales, _ = pipeline.quantize_layers(model, layers, rows, algorithm, block_size)
        noise = int4_noise(model, layers, rows, quants, scales)
        del rows
        collection = collect(
            model,
            calib,
            tensors=tensors_to_collect(model),
            batch_size=batch_size,
            threads=threads,
            seed=seed,
            show_progress=False,
        )
        builder = _Builder(model, compute_ranges(collection), layers, quants, scales)
        held_batches = list(held.batches(batch_size))
        reference = fidelity.run_reference(reference_session, held_batches)
        kinds = fidelity.decide_kinds(model, reference, kind_overrides)
        # top-1 outputs: FP32 near-ties listed, not counted, as quantize's INT8 gate does (near_ties.py)
        kinds = near_ties.attach(kinds, model, reference, held_batches, tie_margin, threads)
        order = sorted(noise, key=noise.__getitem__)
        trials: list[dict[str, Any]] = []

        def verify(k: int) -> tuple[QdqPlan, onnx.ModelProto, FidelityReport]:
            plan, qmodel = builder.build(order[:k])
            test = fidelity.run_batches(fidelity.session(qmodel, threads, ort_core.REFERENCE), held_batches)
            report = fidelity.compare(reference, test, threshold, kinds, ort_core.REFERENCE)
            trials.append({"int4_layers": k, "passed": report.passed, "score": report.score()})
            return plan, qmodel, report

        best = verify(len(order))
        k = len(order)
        if not best[2].passed:
            low = verify(0)
            if not low[2].passed:
                raise MixedGateError(low[2])
            # the longest passing prefix: lo passes, hi fails
            lo, hi, best = 0, len(order), low
            while hi - lo > 1:
                mid = (lo + hi) // 2
                trial = verify(mid)
                if trial[2].passed:
                    lo, best = mid, trial
                else:
                    hi = mid
            k = lo
        plan, qmodel, report = best
        int4 = order[:k]
        int8_nodes = set(plan.quantized_nodes)
        int8 = [layer.node for layer in layers if layer.node not in set(int4) and layer.node in int8_nodes]
        stem = Path(model_path).name.removesuffix(".onnx")
        result = MixedResult(
            onnx_path=Path(out_dir) / f"{stem}.{TAG}.onnx",
            report_path=Path(out_dir) / f"{stem}.{TAG}.json",
            int4_layers=int4,
            int8_layers=int8,
            noise=noise,
            fidelity=report,
            trials=trials,
            fp32_weight_bytes=sum(layer.k * layer.n * 4 for layer in layers),
            weight_bytes=_weight_bytes(layers, set(int4), set(int8), quants),
            calibration_samples=calib_count,
            holdout_samples=sum(int(next(iter(b.values())).shape[0]) for b in held_batches),
            seconds=time.perf_counter() - start,
        )
        pipeline.write_set(
            qmodel, result.onnx_path, result.report_path, result.to_json(), PRECISION, block_size, algorithm
        )
        log.info("INT4/INT8: %d layers INT4 weight-only, %d INT8", len(int4), len(int8))
        return result


def _weight_bytes(
    layers: Sequence[WeightLayer], int4: set[str], int8: set[str], quants: Mapping[str, BlockQuant]
) -> int:
    total = 0
    for layer in layers:
        if layer.node in int4:
            total += (layer.k * layer.n + 1) // 2 + quants[layer.node].scales.size * 4
        elif layer.node in int8:
            total += layer.k * layer.n + layer.n * 4
        else:
            total += layer.k * layer.n * 4
    return total
