"""Top-level INT8 quantization: calibrate once, place Q/DQ, check held-out fidelity, fall back if asked.

Every artifact comes from ONE RangeSet: the Q/DQ ONNX, the legacy TensorRT calibration cache, the ranges
JSON and the fidelity report (with the Q/DQ plan and any fallback decisions). Nothing is written unless the
fidelity gate passes, so a failed run leaves no half-finished output folder behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibrators import (
    adaround,
    dw_equalize,
    fidelity,
    fp8,
    gate_stats,
    layer_cost,
    layer_report,
    learned_fallback,
    near_ties,
    ort_cpu,
    ort_speed,
    ort_variant,
    output_aware,
    output_kinds,
    qdq_mixed,
    report_html,
    rounding_grid,
    smoothquant,
)
from calibrators import bias_correction as bc
from calibrators import fallback as fallback_search
from calibrators.cache import write_cache
from calibrators.calibrate import compute_ranges
from calibrators.collect import collect, load_model, tensors_to_collect
from calibrators.data import model_inputs, open_data
from calibrators.fallback import FallbackResult
from calibrators.fidelity import FidelityReport, FidelityThreshold
from calibrators.fidelity_spec import check_outputs
from calibrators.preprocess import META_KEY
from calibrators.qdq import QdqOptions, QdqPlan, apply_qdq, plan_qdq
from calibrators.quantize_settings import QuantizeSettings
from calibrators.ranges import RangeSet
from calibrators.weights import FP8
from trtbuild.core import atomic, console, onnx_file, output_set
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)


class FidelityGateError(TrtbuildError):
    """The INT8 model is below the fidelity threshold (and auto-fallback was off or could not reach it)."""

    def __init__(
        self,
        report: FidelityReport,
        fallback: FallbackResult | None = None,
        precision: str = "INT8",
        depthwise: int = 0,
    ) -> None:
        self.report = report
        self.fallback = fallback
        # ``depthwise``: depthwise convs left unequalized. Their per-channel input ranges are the usual loss
        # on third-party CNNs (PP-OCR's reader: cosine 0.9696 -> 0.9839 with --equalize-depthwise).
        equalize = f"--equalize-depthwise ({depthwise} depthwise convs), " if depthwise else ""
        if fallback is not None and fallback.stopped:
            hint = f"; try {equalize.removesuffix(', ')}" if equalize else ""
            super().__init__(f"auto-fallback stopped: {fallback.stopped}; nothing was written{hint}")
            return
        fix = (
            f"even auto-fallback could not reach it: {equalize}lower --min-fidelity or check the data"
            if fallback is not None
            else f"re-run with {equalize}--auto-fallback, another --method, or a lower --min-fidelity"
        )
        failing = "; ".join(
            f"{o.name} ({o.kind}): {', '.join(o.failures(report.threshold))}" for o in report.failing()
        )
        super().__init__(
            f"{precision} fidelity below the gate on {report.samples} held-out samples ({report.semantics} "
            f"semantics): {failing}; nothing was written",
            fix,
        )


@dataclass
class QuantizeResult:
    onnx_path: Path
    cache_path: Path | None  # None for FP8: TensorRT's legacy calibration cache is INT8-only
    ranges_path: Path
    report_path: Path
    ranges: RangeSet
    plan: QdqPlan
    fidelity: FidelityReport
    fallback: FallbackResult | None
    calibration_samples: int
    holdout_samples: int
    ort_cpu_target: ort_cpu.OrtCpuTarget | None = None  # uint8 graphs: the CPU and weight format chosen
    float_compute: float = 0.0  # share of the Conv/Gemm/MatMul MACs left in float
    fp8_compute: float = 0.0  # share of those MACs in FP8 (FP8 graphs, mixed INT8/FP8 ones)
    layer_report: layer_report.LayerReport | None = None  # --report: per-layer SQNR
    report_html_path: Path | None = None  # --report: the self-contained page (PNGs in report_png_dir)
    report_png_dir: Path | None = None
    rounding: adaround.LearnedRounding | None = None  # --rounding learned: what was learned, per layer
    settings: QuantizeSettings | None = None  # the choices of the run, recorded in the report
    smooth: smoothquant.SmoothReport | None = None  # --smooth-quant: the decision and smoothed groups
    float_model: onnx.ModelProto | None = None  # the (smoothed) float graph the ranges belong to
    ort_cpu_speed: ort_speed.SpeedResult | None = None  # uint8 graphs: FP32 vs INT8 latency here

    @property
    def passed(self) -> bool:
        return self.fidelity.passed

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.onnx_path),
            "cache": None if self.cache_path is None else str(self.cache_path),
            "ranges": str(self.ranges_path),
            "report": str(self.report_path),
            "method": self.ranges.method,
            "activation_type": self.plan.activation_type,
            "target": "tensorrt" if self.ort_cpu_target is None else ort_core.ORT_CPU,
            "ort_cpu": None if self.ort_cpu_target is None else self.ort_cpu_target.to_json(),
            "ort_cpu_speed": None if self.ort_cpu_speed is None else self.ort_cpu_speed.to_json(),
            "calibration_samples": self.calibration_samples,
            "holdout_samples": self.holdout_samples,
            "float_compute": self.float_compute,
            "fp8_compute": self.fp8_compute,
            "fp8_layers": list(self.plan.fp8_nodes),
            "quantized_layers": len(self.plan.quantized_nodes),
            "qdq_tensors": len(self.plan.activations),
            "float_layers": [
                {"node": e.node, "op_type": e.op_type, "reason": e.reason} for e in self.plan.excluded
            ],
            "fidelity": self.fidelity.to_json(),
            "fallback": None if self.fallback is None else self.fallback.to_json(),
            "layer_report": None
            if self.layer_report is None
            else {
                "html": str(self.report_html_path),
                "png_dir": str(self.report_png_dir),
                **self.layer_report.to_json(),
            },
            "rounding": "learned"
            if self.rounding is not None and self.rounding.end_to_end_kept
            else "nearest",
            "learned_rounding": None if self.rounding is None else self.rounding.to_json(),
            "settings": None if self.settings is None else self.settings.to_json(),
            "smooth_quant": None if self.smooth is None else self.smooth.to_json(),
        }


def quantize(
    model_path: str | Path,
    data: Any,
    out_dir: str | Path,
    settings: QuantizeSettings | None = None,
    *,
    ranges: RangeSet | None = None,
    show_progress: bool = True,
    **overrides: Any,
) -> QuantizeResult:
    """Calibrate ``model_path`` on ``data`` (minus the held-out samples), write the INT8 artifacts into
    ``out_dir`` if the held-out fidelity meets the gate; raise :class:`FidelityGateError` if not.

    ``data``: anything :func:`calibrators.data.open_data` takes (image folder, .npy/.npz, list, callable).
    ``settings``: every choice of the run (calibrators/quantize_settings.py, with its defaults);
    ``overrides``: settings fields changed for this call, e.g. ``quantize(m, d, out, method="entropy")``.
    What the main choices mean:
    ``exclude``: regexes of node names to keep float; ``exclude_op_types``: op types to keep float.
    ``min_fidelity``: the gate (calibrators/fidelity_spec.py: '99%', 'top1=..,cosine=..', per-output
    'NAME:METRIC=VALUE', or several of them); ``output_kind``: 'NAME=KIND' overrides of what each output is
    (calibrators/output_kinds.py), which decides how it is judged.
    ``max_float_compute``: auto-fallback never keeps more than this share of the compute in float.
    ``fallback_strategy``: how auto-fallback measures sensitivity: "auto", "drop_one" (exact) or "local".
    ``fallback_rank``: the order it keeps layers float in: "cost" (sensitivity gain per MAC, fewest MACs
    float) or "sensitivity" (gain alone).
    ``holdout``: held-out samples for the gate; None sizes it to the data (gate_stats.auto_holdout).
    ``write_report``: also write the per-layer accuracy report (calibrators/layer_report.py) as
    ``<model>.int8.report.html`` with its PNGs in ``<model>.int8.report/``.
    ``bias_correction``: fold each quantized layer's mean weight-rounding error into its float bias.
    ``rounding``: "nearest", or "learned" (calibrators/adaround.py: each int8 or fp8 weight rounded up or
    down on its grid to minimise its layer's output error on the calibration data, within
    ``rounding_budget_s`` seconds, deterministic for ``seed``).
    ``activation_type``: int8 writes the TensorRT graph, judged by its reference Q/DQ semantics; fp8 the
    TensorRT FP8 (E4M3) graph at opset 19, judged the same way (docs/fp8.md); uint8
    writes a graph for ONNX Runtime's CPU kernels on ``ort_cpu_kind`` (``auto``: this machine), with the
    weight format that does not saturate there (``ort_weights``, calibrators/ort_cpu.py), judged by what
    ORT really runs.
    ``method``: a range method of calibrators/methods.py, or "output-aware" (calibrators/output_aware.py:
    mse ranges, each then set to the candidate with the least error at its consumer layers' outputs; int8).
    ``equalize_depthwise``: equalize the input channels of depthwise convs whose channel ranges differ
    (calibrators/dw_equalize.py; a per-channel Mul before the conv, its weights scaled to match).
    ``ranges``: use these activation ranges instead of calibrating (e.g. the ones QAT learned); the data
    then only supplies the held-out samples of the gate.
    ``smooth_quant``: "auto", "on" or "off": SmoothQuant on MatMul/Gemm activation inputs with outlier
    channels before calibrating (calibrators/smoothquant.py; auto: where some channel's max is
    OUTLIER_RATIO x the median's).
    """
    s = QuantizeSettings.from_overrides(settings, overrides)
    with output_set.writer_lock(out_dir):  # one writer per folder, taken before any work
        threshold = (
            s.min_fidelity
            if isinstance(s.min_fidelity, FidelityThreshold)
            else fidelity.parse_min_fidelity(s.min_fidelity)
        )
        target = ort_cpu.choose(s.ort_cpu_kind, s.ort_weights) if s.activation_type == "uint8" else None
        options = QdqOptions(
            activation_type=s.activation_type,
            exclude_nodes=tuple(s.exclude),
            exclude_op_types=tuple(s.exclude_op_types),
            bias_correction=s.bias_correction,
            weight_format=target.weight_format if target else "int8",
            depthwise_weight_format=target.depthwise if target else None,
        )
        semantics = fidelity.semantics_for_activations(s.activation_type)
        if target is not None and not target.cpu.detected:
            # Another CPU's kernels cannot be run here: judge the graph by its exact Q/DQ semantics instead.
            semantics = ort_core.REFERENCE
        kind_overrides = output_kinds.parse_output_kinds(s.output_kind)
        # FP8 Q/DQ needs opset 19 (float8 zero points); integer Q/DQ per channel needs 13.
        mixed = s.fallback_precision == FP8  # INT8 with FP8 layers where the gate needs them
        opset = fp8.FP8_OPSET if s.activation_type == FP8 or mixed else 13
        loaded = load_model(model_path)
        if _integer_ops(loaded.graph) and not tensors_to_collect(loaded, s.exclude, s.exclude_op_types):
            raise _nothing_to_quantize(model_path, loaded)  # before converting what will not be used
        model = upgrade_opset(loaded, opset)
        fp32_model = model  # what the user runs today: the speed check's baseline (before smoothing)
        graph_outputs = [o.name for o in model.graph.output]
        # bad names (and part names no Concat span makes) fail before the data pass
        parts = output_kinds.possible_parts(model, threshold.named_outputs())
        check_outputs(threshold, graph_outputs, possible_parts=parts)
        output_kinds.check_overrides(kind_overrides, graph_outputs)
        # The quantized activations plus the network inputs (TensorRT's own caches list them).
        tensors = tensors_to_collect(model, s.exclude, s.exclude_op_types)
        if not tensors:
            raise _nothing_to_quantize(model_path, model)
        all_data = open_data(data, model_inputs(model), s.preprocess)
        holdout = s.holdout
        if holdout is None:
            holdout = gate_stats.auto_holdout(all_data.known_length(), s.samples)
        calib, held = all_data.split(holdout, s.seed)
        calib = calib.sample(s.samples, s.seed)
        model, smoothing = smoothquant.for_quantize(
            model,
            calib.batches(s.batch_size),
            s.smooth_quant,
            set(tensors),
            activation_type=s.activation_type,
            ranges_given=ranges is not None,
            threads=s.threads,
            seed=s.seed,
        )
        if smoothing.smoothed:  # a duplicated LayerNorm adds a tensor to quantize
            tensors = tensors_to_collect(model, s.exclude, s.exclude_op_types)
        if s.equalize_depthwise:
            measured = calib.at_most(dw_equalize.SAMPLES, s.seed).batches(s.batch_size)
            model, _ = dw_equalize.equalize_depthwise(model, measured, s.threads)
            tensors = tensors_to_collect(model, s.exclude, s.exclude_op_types)
        calibrated = 0
        stats: dict[str, Any] = {}  # histograms for the report's range plots (none with given ranges)
        fp8_ranges = ranges if mixed else None  # given ranges serve both grids
        if ranges is None:
            collection = collect(
                model,
                calib,
                tensors=tensors,
                batch_size=s.batch_size,
                threads=s.threads,
                seed=s.seed,
                show_progress=show_progress,
            )
            aware = s.method == output_aware.METHOD
            base = output_aware.BASE_METHOD if aware else s.method
            ranges = compute_ranges(
                collection, base, percentile=s.percentile, grid=FP8 if s.activation_type == FP8 else "int8"
            )
            if mixed:
                fp8_ranges = compute_ranges(collection, base, percentile=s.percentile, grid=FP8)
            if aware:
                ranges = _output_aware(
                    model,
                    ranges,
                    options,
                    collection.stats,
                    calib,
                    s.seed,
                    s.batch_size,
                    s.threads,
                    show_progress,
                )
            calibrated = collection.samples
            stats = collection.stats
        ranges.meta.update(
            {"holdout": holdout, "activation_type": s.activation_type, "preprocess": all_data.preprocessing()}
        )

        held_batches = list(held.batches(s.batch_size))
        held_count = sum(int(next(iter(b.values())).shape[0]) for b in held_batches)
        small = gate_stats.small_sample_warning(held_count)
        if small:
            log.warning(small)
        reference = fidelity.run_reference(fidelity.session(model, s.threads), held_batches)
        plan = plan_qdq(model, ranges, options)
        if options.bias_correction:
            # The mean shift of rounding each layer's input, at the scales just planned (bias_correction.py)
            shifts = bc.activation_shifts(model, plan, calib.batches(s.batch_size), s.threads)
            if shifts:
                ranges.meta[bc.INPUT_SHIFTS_KEY] = shifts
                plan = plan_qdq(model, ranges, options)
        learned: adaround.LearnedRounding | None = None
        if s.rounding == "learned" and options.weight_format in rounding_grid.GRIDS:
            config = adaround.AdaRoundConfig(budget_s=s.rounding_budget_s, seed=s.seed)
            # Learned on the graph without bias correction (a nearest-rounding shift would be wrong for
            # the learned layers upstream); the final plan corrects only the layers the learning did not reach
            # (out of time): the ones it reached were learned against uncorrected inputs, to the float output.
            uncorrected = plan_qdq(model, ranges, replace(options, bias_correction=False))
            learned = _learn(model, uncorrected, calib, config, s.batch_size, s.threads, show_progress)
            options = replace(options, learned_rounding=learned.decided)
            plan = plan_qdq(model, ranges, options)
        qmodel = apply_qdq(model, plan)
        test = fidelity.run_batches(fidelity.session(qmodel, s.threads, semantics), held_batches)
        kinds = fidelity.decide_kinds(model, reference, kind_overrides)
        # held-out samples whose FP32 top-1 is within FP16 noise are not counted by top-1 (near_ties.py)
        kinds = near_ties.attach(kinds, model, reference, held_batches, s.tie_margin, s.threads)
        report = fidelity.compare(reference, test, threshold, kinds, semantics)
        if learned is not None:
            nearest = _nearest_if_better(
                model, ranges, options, learned, report, held_batches, reference, kinds, s.threads
            )
            if nearest is not None:
                options = replace(options, learned_rounding=None)
                plan, qmodel, report = nearest
        plain = _without_input_shifts_if_better(
            model, ranges, options, report, held_batches, reference, kinds, s.threads
        )
        if plain is not None:
            plan, qmodel, report = plain
        fallback: FallbackResult | None = None
        if (
            not report.passed
            and s.auto_fallback
            and learned is not None
            and learned.end_to_end_kept
            and not mixed
        ):
            # Fallback on a learned graph undoes what the learning compensated: decide the float layers
            # with round-to-nearest, then learn for that graph (calibrators/learned_fallback.py; float
            # fallback only: the FP8 layers of a mixed plan are not re-planned there).
            refit = learned_fallback.learned_fallback(
                model,
                ranges,
                replace(options, learned_rounding=None),
                list(calib.sample(config.samples, config.seed).batches(s.batch_size)),
                held_batches,
                threshold,
                config,
                reference=reference,
                kinds=kinds,
                semantics=semantics,
                threads=s.threads,
                fallback_args={
                    "strategy": s.fallback_strategy,
                    "max_float_compute": s.max_float_compute,
                    "ranking": s.fallback_rank,
                },
            )
            fallback, learned = refit.fallback, refit.rounding
            plan, qmodel, report = fallback.plan, fallback.model, fallback.final
        elif not report.passed and s.auto_fallback:
            fallback = fallback_search.auto_fallback(
                model,
                ranges,
                options,
                held_batches,
                threshold,
                reference=reference,
                strategy=s.fallback_strategy,
                semantics=semantics,
                kinds=kinds,
                max_float_compute=s.max_float_compute,
                ranking=s.fallback_rank,
                fp8_ranges=fp8_ranges,
            )
            plan, qmodel, report = fallback.plan, fallback.model, fallback.final
        if not report.passed or (fallback is not None and not fallback.passed):
            precision = "FP8" if s.activation_type == FP8 else "INT8/FP8" if mixed else "INT8"
            unequalized = 0 if s.equalize_depthwise else dw_equalize.count_depthwise(model)
            raise FidelityGateError(report, fallback, precision, unequalized)
        # MACs per layer, measured once (the fallback already has them)
        macs = fallback.layer_macs if fallback is not None else layer_cost.layer_macs(model, held_batches[0])
        share = (
            fallback.float_compute
            if fallback is not None
            else layer_cost.float_share(macs, plan.quantized_nodes)
        )
        layers = (
            layer_report.analyze(model, qmodel, plan, held_batches, stats, threads=s.threads)
            if s.write_report
            else None
        )
        stem = Path(model_path).stem
        # <model>.int8.onnx / <model>.fp8.onnx / <model>.int8fp8.onnx (mixed, when FP8 layers were needed)
        tag = "fp8" if s.activation_type == FP8 else "int8fp8" if plan.fp8_nodes else "int8"
        result = QuantizeResult(
            onnx_path=Path(out_dir) / f"{stem}.{tag}.onnx",
            cache_path=None if s.activation_type == FP8 else _cache_path(Path(out_dir), stem),
            ranges_path=Path(out_dir) / f"{stem}.ranges.json",
            report_path=Path(out_dir) / f"{stem}.fidelity.json",
            ranges=ranges,
            plan=plan,
            fidelity=report,
            fallback=fallback,
            calibration_samples=calibrated,
            holdout_samples=held_count,
            ort_cpu_target=target,
            float_compute=share,
            fp8_compute=1.0 - share if s.activation_type == FP8 else qdq_mixed.fp8_share(plan, macs),
            layer_report=layers,
            report_html_path=Path(out_dir) / f"{stem}.{tag}.report.html" if layers else None,
            report_png_dir=Path(out_dir) / f"{stem}.{tag}.report" if layers else None,
            rounding=learned,
            settings=s,
            smooth=smoothing,
            # the graph the ranges belong to when SmoothQuant or equalization rewrote it
            float_model=model if smoothing.smoothed or s.equalize_depthwise else None,
            ort_cpu_speed=_speed_check(fp32_model, qmodel, held, target, s),
        )
        ort_core.set_metadata(qmodel, target.metadata() if target else ort_cpu.tensorrt_metadata())
        ort_core.set_metadata(qmodel, preprocess_metadata(ranges))
        _write(result, qmodel, s.trt_version)
        return result


def _speed_check(
    fp32: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    held: Any,
    target: ort_cpu.OrtCpuTarget | None,
    s: QuantizeSettings,
) -> ort_speed.SpeedResult | None:
    """FP32 vs the ORT-CPU graph at batch 1 on the first held-out sample (None for TensorRT graphs, which
    are not meant to run fast on a CPU); the one-line verdict when INT8 is not faster here."""
    if target is None:
        return None
    if not s.speed_check:
        return ort_speed.SpeedSkipped("--no-speed-check")
    result = ort_speed.check(fp32, qmodel, next(iter(held.batches(1))), target.cpu, s.threads)
    verdict = result.verdict() if isinstance(result, ort_speed.SpeedCheck) else None
    if verdict:
        log.warning(verdict)
    else:
        log.info(result.summary())
    return result


def _judged_like(
    like: FidelityReport,
    model: onnx.ModelProto,
    plan: QdqPlan,
    held_batches: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    kinds: Mapping[str, Any],
    threads: int | None,
) -> tuple[onnx.ModelProto, FidelityReport]:
    """``plan``'s graph, judged on the held-out samples the way ``like`` was (threshold, semantics)."""
    qmodel = apply_qdq(model, plan)
    test = fidelity.run_batches(fidelity.session(qmodel, threads, like.semantics), held_batches)
    return qmodel, fidelity.compare(reference, test, like.threshold, kinds, like.semantics)


def _closer(candidate: FidelityReport, current: FidelityReport) -> bool:
    """The candidate graph is closer to FP32 and passes the gate wherever the current one does."""
    return candidate.score() < current.score() and (candidate.passed or not current.passed)


def _without_input_shifts_if_better(
    model: onnx.ModelProto,
    ranges: RangeSet,
    options: QdqOptions,
    report: FidelityReport,
    held_batches: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    kinds: Mapping[str, Any],
    threads: int | None = None,
) -> tuple[QdqPlan, onnx.ModelProto, FidelityReport] | None:
    """The graph whose bias correction leaves out the input-rounding term, when it is closer to FP32 on the
    held-out samples (then ``ranges`` drops the term too, so fallback and the saved ranges agree). The term
    uses float means: where upstream error dominates, the real inputs' means drift from them, and the
    PP-OCRv4 detector measured worse with it (cosine 0.962 -> 0.955) while YOLOv8n's scores gained
    0.950 -> 0.978 (docs/int8-accuracy.md). So, like learned rounding, it is kept only end to end."""
    if bc.INPUT_SHIFTS_KEY not in ranges.meta:
        return None
    without = RangeSet(method=ranges.method, ranges=ranges.ranges, meta=dict(ranges.meta))
    del without.meta[bc.INPUT_SHIFTS_KEY]
    plan = plan_qdq(model, without, options)
    qmodel, plain = _judged_like(report, model, plan, held_batches, reference, kinds, threads)
    if _closer(plain, report):
        del ranges.meta[bc.INPUT_SHIFTS_KEY]
        log.info(
            "bias correction without the input-rounding term measured closer to FP32 on %d held-out samples "
            "(error %.4g vs %.4g); kept without it",
            plain.samples,
            plain.score(),
            report.score(),
        )
        return plan, qmodel, plain
    return None


def _nearest_if_better(
    model: onnx.ModelProto,
    ranges: RangeSet,
    options: QdqOptions,
    learned: adaround.LearnedRounding,
    learned_report: FidelityReport,
    held_batches: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    kinds: Mapping[str, Any],
    threads: int | None,
) -> tuple[QdqPlan, onnx.ModelProto, FidelityReport] | None:
    """The round-to-nearest graph (with bias correction) when it is closer to FP32 on the held-out samples
    than the learned one. Each layer's learned rounding beats nearest on its own held-out rows, yet the
    whole graph can end worse: on MiniLM-L6 (64 calibration sentences) learned measured cosine 0.9912
    against nearest's 0.9976. So the final choice is made end to end, on the gate's own data and metric."""
    plan = plan_qdq(model, ranges, replace(options, learned_rounding=None))
    qmodel, report = _judged_like(learned_report, model, plan, held_batches, reference, kinds, threads)
    learned.end_to_end = {"learned": learned_report.score(), "nearest": report.score()}
    if _closer(report, learned_report):
        learned.end_to_end_kept = False
        log.warning(
            "learned rounding measured worse than round-to-nearest on %d held-out samples (error %.4g vs "
            "%.4g); kept round-to-nearest",
            report.samples,
            learned_report.score(),
            report.score(),
        )
        return plan, qmodel, report
    return None


def _learn(
    model: onnx.ModelProto,
    plan: QdqPlan,
    calib: Any,
    config: adaround.AdaRoundConfig,
    batch_size: int,
    threads: int | None,
    show_progress: bool,
) -> adaround.LearnedRounding:
    """Learned rounding on the calibration samples, with a progress bar per layer."""
    with console.progress(transient=True) as bar:
        task = bar.add_task("learning weight rounding", total=None)

        def advance(done: int, total: int) -> None:
            if show_progress:
                bar.update(task, completed=done, total=total)

        return adaround.learn_rounding(
            model,
            plan,
            calib.sample(config.samples, config.seed).batches(batch_size),
            config,
            threads,
            advance,
        )


def _output_aware(
    model: onnx.ModelProto,
    ranges: RangeSet,
    options: QdqOptions,
    stats: Mapping[str, Any],
    calib: Any,
    seed: int,
    batch_size: int,
    threads: int | None,
    show_progress: bool,
) -> RangeSet:
    """The base ranges refined by the error at each activation's consumer layers (with a progress bar)."""
    with console.progress(transient=True) as bar:
        task = bar.add_task("output-aware ranges", total=None)
        result = output_aware.refine(
            model,
            ranges,
            plan_qdq(model, ranges, options),
            stats,
            calib.at_most(output_aware.DEFAULT_SAMPLES, seed).batches(batch_size),
            seed=seed,
            threads=threads,
            progress=(lambda done, total: bar.update(task, completed=done, total=total))
            if show_progress
            else None,
        )
    log.info(result.summary())
    return result.ranges


def upgrade_opset(model: onnx.ModelProto, target: int = 13) -> onnx.ModelProto:
    """Per-channel Q/DQ needs opset 13 (FP8 Q/DQ 19): convert older models (e.g. Paddle exports at 12)."""
    opset = onnx_file.opset_of(model)
    if opset >= target:
        return model
    converted = onnx_file.convert_opset(model, target)
    if target < fp8.FP8_OPSET:  # FP8 always needs the upgrade: nothing to warn about
        log.warning(f"converted the model from opset {opset} to {target} for per-channel Q/DQ")
    return converted


def _cache_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}.calib.cache"


def _write(result: QuantizeResult, qmodel: onnx.ModelProto, trt_version: str) -> None:
    """All artifacts, each atomically. The report is the set's manifest: removed first and written last
    with every member's sha256 (trtbuild/core/output_set.py), so a run killed half-way leaves no report
    describing a mixed set, and `output_set.verify` tells a stale member from a current one."""
    result.report_path.unlink(missing_ok=True)
    atomic.write_bytes(result.onnx_path, qmodel.SerializeToString())
    members = {"onnx": result.onnx_path, "ranges": result.ranges_path}
    if result.cache_path is not None:
        write_cache(result.ranges, result.cache_path, trt_version)
        members["cache"] = result.cache_path
    else:  # FP8 has no implicit calibration; an earlier INT8 run's cache would not match these ranges
        stem = result.report_path.name.removesuffix(".fidelity.json")
        _cache_path(result.report_path.parent, stem).unlink(missing_ok=True)
    result.ranges.save(result.ranges_path)
    if result.layer_report is not None and result.report_html_path and result.report_png_dir:
        rendered = report_html.render(
            result.layer_report,
            f"Per-layer accuracy: {result.onnx_path.name}",
            {
                "gate": f"{'passed' if result.passed else 'failed'} on {result.fidelity.samples} held-out "
                f"samples: {result.fidelity.summary()}",
                "float compute": f"{result.float_compute:.1%} of the Conv/Gemm/MatMul MACs kept float",
                **({"near-ties": "; ".join(ties)} if (ties := result.fidelity.near_tie_lines()) else {}),
            },
        )
        with atomic.atomic_dir(result.report_png_dir) as folder:
            for name, data in rendered.pngs.items():
                (folder / name).write_bytes(data)
        atomic.write_text(result.report_html_path, rendered.html)
        members["report_html"] = result.report_html_path
    else:  # a page from an earlier run would describe another model
        stale = result.onnx_path.with_name(result.onnx_path.stem + ".report")
        stale.with_name(stale.name + ".html").unlink(missing_ok=True)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
    report = {
        **result.to_json(),
        output_set.MANIFEST_KEY: output_set.manifest_entries(members),
        "plan": result.plan.to_json(),
    }
    atomic.write_text(result.report_path, json.dumps(report, indent=2, default=str) + "\n")


def write_variant(
    model_path: str | Path,
    result: QuantizeResult,
    out_path: str | Path,
    ort_cpu_kind: str = "auto",
    ort_weights: str = "auto",
    data: str | Path | None = None,
) -> tuple[Path, ort_cpu.OrtCpuTarget]:
    """The same model quantized from the same ranges with uint8 activations for ONNX Runtime CPU deployment
    next to the int8 TensorRT graph, keeping the layers the gate kept in float, with the weight format that
    is exact on ``ort_cpu_kind`` (recorded in the graph's metadata and returned). ``data``: quantize's
    data; where quantize learned its rounding, the variant learns its own (calibrators/ort_variant.py)."""
    # The ranges belong to the smoothed graph when SmoothQuant ran.
    model = result.float_model or upgrade_opset(load_model(model_path))
    target = ort_cpu.choose(ort_cpu_kind, ort_weights)
    kept_float = tuple((e.node, e.reason) for e in result.plan.excluded)
    options = QdqOptions(activation_type="uint8", keep_float=kept_float, **target.formats())
    learned = ort_variant.learn_variant_rounding(
        model, result.ranges, options, result.settings, result.holdout_samples, data
    )
    if learned is not None:
        options = replace(options, learned_rounding=learned.decided)
    variant = apply_qdq(model, plan_qdq(model, result.ranges, options))
    ort_core.set_metadata(variant, {**target.metadata(), **preprocess_metadata(result.ranges)})
    return atomic.write_bytes(out_path, variant.SerializeToString()), target


def preprocess_metadata(ranges: RangeSet) -> dict[str, str]:
    """The calibration images' preprocessing as ONNX metadata (empty for array data): the deployment configs
    that feed the engine pixels take it from the graph (trtbuild/ship/calibration_preprocess.py)."""
    record = ranges.meta.get("preprocess")
    return {} if record is None else {META_KEY: json.dumps(record, sort_keys=True)}


def _nothing_to_quantize(model_path: str | Path, model: onnx.ModelProto) -> TrtbuildError:
    """The error for a graph without quantizable ops; names control flow when the layers sit inside
    If/Loop/Scan subgraphs (Silero VAD's convs and LSTM are all in an If's branches), which Q/DQ
    placement does not enter."""
    inside = _ops_in_subgraphs(model.graph)
    if inside:
        return TrtbuildError(
            f"{model_path} has no quantizable ops in its main graph: its {inside} Conv/ConvTranspose/Gemm/"
            "MatMul layers are inside If/Loop/Scan subgraphs (control flow), which trtbuild does not "
            "quantize",
            "export a graph without control flow (e.g. one branch: trace with the flag fixed), or deploy it "
            "at fp16 (`trtbuild plan --precision fp16`)",
        )
    quantized = _integer_ops(model.graph)
    if quantized:
        return TrtbuildError(
            f"{model_path} is already quantized ({quantized}): no float Conv/ConvTranspose/Gemm/MatMul is "
            "left to quantize",
            "quantize the float model it was made from (or deploy this one as it is)",
        )
    return TrtbuildError(
        f"{model_path} has no quantizable ops (Conv/ConvTranspose/Gemm/MatMul with float inputs) "
        "left to quantize",
        "check the model and the --exclude/--exclude-op-type options",
    )


# Ops only a quantized graph has: Q/DQ pairs, ORT's dynamic quantization, integer and QLinear kernels
_INTEGER_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
)


def _integer_ops(graph: onnx.GraphProto) -> str:
    """``22 DynamicQuantizeLinear, 21 ConvInteger``: the quantized ops of ``graph``, most first."""
    counts = Counter(n.op_type for n in graph.node if n.op_type in _INTEGER_OPS)
    return ", ".join(f"{c} {op}" for op, c in counts.most_common())


def _ops_in_subgraphs(graph: onnx.GraphProto, nested: bool = False) -> int:
    """How many Conv/ConvTranspose/Gemm/MatMul nodes live in subgraphs of ``graph`` (any depth)."""
    count = 0
    for node in graph.node:
        if nested and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            count += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                count += _ops_in_subgraphs(sub, nested=True)
    return count
