"""`trtbuild quantize`: calibrate, place Q/DQ, gate on held-out fidelity, optionally keep layers float."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from calibrators import cache
from calibrators.adaround import ROUNDINGS
from calibrators.fallback_ranking import RANKINGS
from calibrators.fidelity import parse_min_fidelity
from calibrators.gate_stats import MAX_AUTO_HOLDOUT, MIN_CALIBRATION
from calibrators.int4 import ALGORITHMS as INT4_ALGORITHMS
from calibrators.int4 import DEFAULT_ALGORITHM as INT4_DEFAULT
from calibrators.int4 import DEFAULT_BLOCK_SIZE
from calibrators.layer_report import WORST
from calibrators.methods import METHODS
from calibrators.ort_cpu import WEIGHT_CHOICES
from calibrators.output_aware import METHOD as OUTPUT_AWARE
from calibrators.preprocess import Preprocess
from calibrators.qdq import ACTIVATION_TYPES
from calibrators.quantize import FidelityGateError, QuantizeResult, quantize
from calibrators.quantize_settings import FALLBACK_STRATEGIES, QuantizeSettings
from calibrators.smoothquant import MODES as SMOOTH_MODES
from trtbuild.cli.data_options import data_option, preprocess_options
from trtbuild.cli.quantize_options import refuse_ignored
from trtbuild.core import console
from trtbuild.core.cpu import CPU_KINDS
from trtbuild.core.errors import TrtbuildError

Q = QuantizeSettings  # the defaults of every quantize flag live in the settings object


class TieMargin(click.ParamType):
    """``auto`` (None: measured with the FP16 graph) or a margin >= 0 (0: raw top-1)."""

    name = "auto|MARGIN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or isinstance(value, float) or value == "auto":
            return None if value in (None, "auto") else value
        try:
            margin = float(value)
        except ValueError:
            self.fail(f"'{value}' is neither auto nor a number", param, ctx)
        if not margin >= 0:
            self.fail(f"{value} is negative: pass auto, 0 (raw top-1) or a margin > 0", param, ctx)
        return margin


def _float_table(result: QuantizeResult) -> Table:
    table = Table(title=f"Layers kept in float ({len(result.plan.excluded)})")
    table.add_column("node", overflow="fold")
    table.add_column("op")
    table.add_column("why", overflow="fold")
    for e in result.plan.excluded:
        table.add_row(e.node, e.op_type, e.reason)
    return table


def _worst_table(result: QuantizeResult) -> Table:
    """The layers whose own quantization hurts most (the page has every layer and their histograms)."""
    assert result.layer_report is not None
    report = result.layer_report
    table = Table(
        title=f"Worst {WORST} layers by SQNR alone ({len(report.layers)} quantized, {report.samples} "
        f"held-out samples, {report.seconds:.1f} s)"
    )
    for col in ("layer", "op", "SQNR alone dB", "cumulative dB", "input clipped"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right", overflow="fold")
    for la in report.worst(WORST):
        table.add_row(
            la.node,
            la.op_type,
            f"{la.sqnr_alone_db:.2f}",
            f"{la.sqnr_cumulative_db:.2f}",
            "-" if la.clipped is None else f"{la.clipped:.3%}",
        )
    return table


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@data_option
@click.option(
    "--precision",
    type=click.Choice(["int8", "fp8", "int8,fp8", "int4-weights", "int4-weights,int8"]),
    default="int8",
    show_default=True,
    help="int8: Q/DQ activations and weights. fp8: E4M3 Q/DQ (opset 19) for TensorRT on sm89+ GPUs "
    "(docs/fp8.md). int8,fp8: INT8, with FP8 on the layers whose INT8 error fails the gate (mixed per "
    "layer, chosen by the auto-fallback's sensitivity; TensorRT on sm89+). "
    "int4-weights: INT4 block-wise MatMul/Gemm weights only (W4A16), activations stay float "
    "(docs/int4-weight-only.md). int4-weights,int8: per weight layer INT4 weight-only or INT8 Q/DQ, "
    "as many INT4 as the gate allows, least noisy first (TensorRT 10+, sm80+).",
)
@click.option(
    "--block-size",
    type=int,
    default=DEFAULT_BLOCK_SIZE,
    show_default=True,
    help="int4-weights: weights per scale along the reduction axis; must divide every layer's K.",
)
@click.option(
    "--weight-budget",
    default=None,
    metavar="FRACTION",
    help="int4-weights: MatMul weight bytes allowed, as a fraction of FP32 (e.g. 1/7); the most sensitive "
    "layers get blocks finer than --block-size until it is spent (default: --block-size everywhere).",
)
@click.option(
    "--int4-algorithm",
    type=click.Choice(list(INT4_ALGORITHMS)),
    default=INT4_DEFAULT,
    show_default=True,
    help="int4-weights: awq-gptq (AWQ scales, GPTQ rounding, layers fitted in order to the FP32 output), "
    "awq (activation-aware scales + clip), gptq (Hessian error compensation), rtn.",
)
@click.option(
    "--method",
    type=click.Choice([*METHODS, OUTPUT_AWARE]),
    default=Q.method,
    show_default=True,
    help=f"Activation ranges: a histogram method, or {OUTPUT_AWARE} (each range chosen by the error at "
    "the outputs of the layers that read it; int8; docs/output-aware-ranges.md).",
)
@click.option(
    "--equalize-depthwise",
    is_flag=True,
    help="Equalize the input channels of depthwise convs whose channel ranges differ (a per-channel Mul "
    "before the conv, its weights scaled to match; exact in float). Helps LCNet/MobileNet-style models.",
)
@click.option(
    "--percentile",
    type=float,
    default=Q.percentile,
    show_default=True,
    help="Percentile of |x| for --method percentile.",
)
@click.option(
    "--samples", type=int, default=None, help="Calibrate on N samples (default: all but the held-out)."
)
@click.option(
    "--holdout",
    type=int,
    default=Q.holdout,
    help=f"Held-out samples for the fidelity gate (default: all but {MIN_CALIBRATION} samples, at least half "
    f"and at most {MAX_AUTO_HOLDOUT}; with --samples N, what N leaves; 32 for streamed data).",
)
@click.option(
    "--min-fidelity",
    multiple=True,
    help="Gate (repeatable): '99%', '0.99', 'top1=0.98,cosine=0.995', or per output "
    "'NAME:METRIC=VALUE[,...]' with metrics top1, cosine, sqnr (dB), kl, err (max error/range). "
    "Default: 99% top-1 for classification/probability outputs, cosine 0.99 for the others.",
)
@click.option(
    "--tie-margin",
    type=TieMargin(),
    default=Q.tie_margin,
    help="Top-1 near-ties: held-out samples whose FP32 top-2 margin is at most this are listed, not "
    "counted by top-1 (default auto: the largest margin shift the FP16 graph causes; 0: raw top-1).",
)
@click.option(
    "--output-kind",
    multiple=True,
    help="What an output is, NAME=classification|probability|regression|embedding|prob_map (repeatable); "
    "decides how the gate judges it (default: from the graph and the values, shown in the table).",
)
@click.option(
    "--max-float-compute",
    type=float,
    default=Q.max_float_compute,
    show_default=True,
    help="Auto-fallback stops rather than keep more than this share of the Conv/Gemm/MatMul compute float.",
)
@click.option(
    "--auto-fallback", is_flag=True, help="Keep the fewest most sensitive layers in float to meet the gate."
)
@click.option(
    "--fallback-strategy",
    type=click.Choice(FALLBACK_STRATEGIES),
    default=Q.fallback_strategy,
    show_default=True,
    help="How --auto-fallback ranks layers: drop_one (exact, one run per layer), local (one pass), auto.",
)
@click.option(
    "--fallback-rank",
    type=click.Choice(list(RANKINGS)),
    default=Q.fallback_rank,
    show_default=True,
    help="Order --auto-fallback keeps layers float in: cost (sensitivity gain per MAC: fewest MACs float) "
    "or sensitivity (gain alone).",
)
@click.option(
    "--report",
    "write_report",
    is_flag=True,
    help="Also write the per-layer accuracy report (SQNR alone and cumulative, worst layers' histograms): "
    "<model>.int8.report.html (self-contained) and its PNGs in <model>.int8.report/.",
)
@click.option("--exclude", multiple=True, help="Regex of node names to keep in float (repeatable).")
@click.option("--exclude-op-type", multiple=True, help="Op type to keep in float (repeatable).")
@click.option(
    "--activation-type",
    type=click.Choice(ACTIVATION_TYPES),
    default=Q.activation_type,
    show_default=True,
    help="int8: symmetric, for TensorRT. uint8: asymmetric, for ONNX Runtime CPU deployment.",
)
@click.option(
    "--ort-cpu",
    "ort_cpu_kind",
    type=click.Choice(["auto", *CPU_KINDS]),
    default=Q.ort_cpu_kind,
    show_default=True,
    help="uint8 only: the CPU the ORT graph will run on (auto: this one); decides the weight format.",
)
@click.option(
    "--ort-weights",
    type=click.Choice(list(WEIGHT_CHOICES)),
    default=Q.ort_weights,
    show_default=True,
    help="uint8 only: int8, int7 (ORT's reduce-range) or uint8 weights; auto avoids the u8 x s8 saturation "
    "of x86 CPUs without VNNI.",
)
@click.option(
    "--speed-check/--no-speed-check",
    default=Q.speed_check,
    show_default=True,
    help="uint8 only: time FP32 vs the ORT-CPU INT8 graph here (batch 1, --threads or 1 thread, a few "
    "seconds, alternating) and say when INT8 is not faster; recorded in the report as ort_cpu_speed.",
)
@click.option(
    "--bias-correction/--no-bias-correction",
    default=Q.bias_correction,
    show_default=True,
    help="Fold each layer's mean weight-rounding error into its float bias (helps depthwise CNNs).",
)
@click.option(
    "--rounding",
    type=click.Choice(list(ROUNDINGS)),
    default=Q.rounding,
    show_default=True,
    help="Weight rounding: nearest, or learned (AdaRound: each weight up or down to minimise its layer's "
    "output error on the calibration data; time-boxed by --rounding-budget, deterministic with --seed).",
)
@click.option(
    "--rounding-budget",
    type=click.FloatRange(min=0.0),
    default=Q.rounding_budget_s,
    show_default=True,
    help="CPU seconds learned rounding may take in all (the same work on a quiet or a busy machine); "
    "layers left keep round-to-nearest.",
)
@click.option(
    "--trt-version", default=Q.trt_version, show_default=True, help="Calibration cache header version."
)
@click.option(
    "--out-dir", type=click.Path(path_type=Path), default=None, help="Output folder (default: the model's)."
)
@click.option(
    "--smooth-quant",
    type=click.Choice(list(SMOOTH_MODES)),
    default=Q.smooth_quant,
    show_default=True,
    help="SmoothQuant: move MatMul/Gemm input outlier channels into the weights (auto: where there are "
    "outliers; docs/smoothquant.md).",
)
@click.option("--seed", type=int, default=Q.seed, show_default=True)
@click.option("--batch-size", type=int, default=Q.batch_size, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def quantize_command(
    model: Path,
    data_path: Path,
    precision: str,
    block_size: int,
    weight_budget: str | None,
    int4_algorithm: str,
    method: str,
    percentile: float,
    equalize_depthwise: bool,
    samples: int | None,
    holdout: int | None,
    min_fidelity: tuple[str, ...],
    tie_margin: float | None,
    output_kind: tuple[str, ...],
    max_float_compute: float,
    auto_fallback: bool,
    fallback_strategy: str,
    fallback_rank: str,
    write_report: bool,
    exclude: tuple[str, ...],
    exclude_op_type: tuple[str, ...],
    activation_type: str,
    ort_cpu_kind: str,
    ort_weights: str,
    speed_check: bool,
    bias_correction: bool,
    rounding: str,
    rounding_budget: float,
    trt_version: str,
    out_dir: Path | None,
    smooth_quant: str,
    seed: int,
    batch_size: int,
    threads: int | None,
    preprocess: Preprocess,
    as_json: bool,
) -> None:
    """Quantize MODEL.onnx to INT8 (or --precision fp8) Q/DQ with a held-out fidelity gate; writes the Q/DQ
    ONNX, the TensorRT calibration cache, the ranges JSON and the fidelity report (nothing if the gate
    fails)."""
    cache.header(trt_version)  # bad inputs fail before the data pass
    refuse_ignored(precision)
    if precision == "fp8":
        if activation_type != "int8":
            raise TrtbuildError(
                f"--precision fp8 with --activation-type {activation_type}: FP8 graphs are for TensorRT, "
                "uint8 ones for ONNX Runtime CPU",
                "drop --activation-type (FP8 activations and weights are both E4M3)",
            )
        activation_type = "fp8"
    mixed = precision == "int8,fp8"
    if mixed and activation_type != "int8":
        raise TrtbuildError(
            f"--precision int8,fp8 with --activation-type {activation_type}: mixed INT8/FP8 graphs are for "
            "TensorRT",
            "drop --activation-type",
        )
    threshold = parse_min_fidelity(list(min_fidelity) or None)
    if precision.startswith("int4-weights"):
        if auto_fallback or activation_type != "int8":
            raise TrtbuildError(
                f"--auto-fallback and --activation-type apply to int8, not {precision}",
                "drop them, or use --exclude to keep sensitive layers float",
            )
        budget = {"weight_budget": weight_budget} if weight_budget is not None else {}
        if budget and precision != "int4-weights":
            raise TrtbuildError(
                f"--weight-budget applies to --precision int4-weights, not {precision}",
                "drop --weight-budget, or use --precision int4-weights",
            )
        quantize_int4 = _quantize_int4 if precision == "int4-weights" else _quantize_int4_int8
        quantize_int4(
            model,
            data_path,
            out_dir or model.parent,
            algorithm=int4_algorithm,
            block_size=block_size,
            samples=samples,
            holdout=holdout,
            min_fidelity=threshold,
            output_kind=output_kind,
            exclude=exclude,
            preprocess=preprocess,
            batch_size=batch_size,
            threads=threads,
            seed=seed,
            tie_margin=tie_margin,
            as_json=as_json,
            **budget,
        )
        return
    settings = QuantizeSettings(
        method=method,
        percentile=percentile,
        equalize_depthwise=equalize_depthwise,
        samples=samples,
        holdout=holdout,
        min_fidelity=threshold,
        tie_margin=tie_margin,
        output_kind=output_kind,
        max_float_compute=max_float_compute,
        auto_fallback=auto_fallback or mixed,
        fallback_precision="fp8" if mixed else "float",
        fallback_strategy=fallback_strategy,
        fallback_rank=fallback_rank,
        write_report=write_report,
        exclude=exclude,
        exclude_op_types=exclude_op_type,
        trt_version=trt_version,
        activation_type=activation_type,
        ort_cpu_kind=ort_cpu_kind,
        ort_weights=ort_weights,
        speed_check=speed_check,
        bias_correction=bias_correction,
        rounding=rounding,
        rounding_budget_s=rounding_budget,
        smooth_quant=smooth_quant,
        preprocess=preprocess,
        batch_size=batch_size,
        threads=threads,
        seed=seed,
    )
    title = f"{precision.upper()} fidelity vs FP32 (held-out samples)"
    try:
        result = quantize(
            model,
            data_path,
            out_dir or model.parent,
            settings,
            show_progress=not as_json,
        )
    except FidelityGateError as exc:
        console.err.print(exc.report.table(title))
        if exc.fallback is not None:
            console.err.print(exc.fallback.table())
        raise
    if as_json:
        console.emit_json(result.to_json())
        return
    console.out.print(result.fidelity.table(title))
    if result.fallback is not None:
        console.out.print(result.fallback.table())
    if result.plan.excluded:
        console.out.print(_float_table(result))
    if result.layer_report is not None:
        console.out.print(_worst_table(result))
        worst = ", ".join(la.node for la in result.layer_report.worst(WORST))
        console.out.print(f"worst layers: {worst}", soft_wrap=True, highlight=False)
    fp8_layers = len(result.plan.fp8_nodes)
    split = (
        f"{len(result.plan.quantized_nodes) - fp8_layers} INT8 + {fp8_layers} FP8 "
        f"({result.fp8_compute:.1%} of the compute)"
        if fp8_layers
        else f"{precision.upper()} ({activation_type})"
    )
    console.out.print(
        f"{len(result.plan.quantized_nodes)} layers {split}, "
        f"{len(result.plan.excluded)} float ({result.float_compute:.1%} of the compute); "
        f"{result.calibration_samples} calibration / "
        f"{result.holdout_samples} held-out samples, method {method}"
    )
    if result.rounding is not None:
        r = result.rounding
        console.out.print(
            f"learned rounding: {len(r.weights)} of {len(r.layers) + len(r.skipped)} layers improved "
            f"in {r.seconds:.0f} s" + (f", {len(r.skipped)} out of time" if r.skipped else "")
        )
        if not r.end_to_end_kept:
            console.out.print(
                f"[yellow]kept round-to-nearest: it measured closer to FP32 on the held-out samples "
                f"(error {r.end_to_end['nearest']:.4g} vs learned {r.end_to_end['learned']:.4g})[/yellow]"
            )
    if result.smooth is not None and result.smooth.enabled:
        sm = result.smooth
        alphas = ", ".join(f"{g.alpha:g}" for g in sm.smoothed)
        console.out.print(
            f"SmoothQuant: {len(sm.smoothed)} of {len(sm.groups)} MatMul/Gemm inputs smoothed "
            f"(alpha {alphas}), {len(sm.skipped)} cannot be"
        )
    if result.ort_cpu_target is not None:
        target = result.ort_cpu_target
        console.out.print(f"ORT CPU graph: {target.weight_format} weights for {target.cpu.describe()}")
    if result.ort_cpu_speed is not None:
        console.out.print(result.ort_cpu_speed.summary(), highlight=False)
    for label, path in (
        ("onnx", result.onnx_path),
        ("cache", result.cache_path),
        ("ranges", result.ranges_path),
        ("report", result.report_path),
        ("layers", result.report_html_path),
    ):
        if path is not None:
            console.out.print(f"{label:7s}{path}")


def _quantize_int4(model: Path, data_path: Path, out_dir: Path, as_json: bool, **options: Any) -> None:
    from calibrators.int4.pipeline import Int4GateError, quantize_int4

    try:
        result = quantize_int4(model, data_path, out_dir, **options)
    except Int4GateError as exc:
        console.err.print(exc.report.table("INT4 weight-only fidelity vs FP32 (held-out samples)"))
        raise
    if as_json:
        console.emit_json(result.to_json())
        return
    console.out.print(result.fidelity.table("INT4 weight-only fidelity vs FP32 (held-out samples)"))
    ratio = result.int4_weight_bytes / max(1, result.fp32_weight_bytes)
    console.out.print(
        f"{len(result.layers)} MatMul/Gemm weights INT4 ({result.algorithm}, block {_blocks(result)}): "
        f"{result.fp32_weight_bytes / 2**20:.1f} MiB FP32 -> {result.int4_weight_bytes / 2**20:.1f} MiB "
        f"({ratio:.3f}x); {result.calibration_samples} calibration / {result.holdout_samples} held-out "
        "samples"
    )
    if result.kept_float:
        shown = "; ".join(f"{k['node']}: {k['reason']}" for k in result.kept_float[:3])
        more = f" (+{len(result.kept_float) - 3} more in the report)" if len(result.kept_float) > 3 else ""
        console.out.print(f"{len(result.kept_float)} MatMul/Gemm kept float: {shown}{more}")
    for label, path in (("onnx", result.onnx_path), ("report", result.report_path)):
        console.out.print(f"{label:7s}{path}")


def _blocks(result: Any) -> str:
    """The block size, or with --weight-budget how many layers got each size."""
    if not result.budget:
        return str(result.block_size)
    return ", ".join(f"{b} x{n}" for b, n in result.budget["layers_per_block"].items())


def _quantize_int4_int8(model: Path, data_path: Path, out_dir: Path, as_json: bool, **options: Any) -> None:
    from calibrators.int4.mixed import quantize_int4_int8
    from calibrators.int4.pipeline import Int4GateError

    title = "INT4/INT8 fidelity vs FP32 (held-out samples)"
    try:
        result = quantize_int4_int8(model, data_path, out_dir, **options)
    except Int4GateError as exc:
        console.err.print(exc.report.table(title))
        raise
    if as_json:
        console.emit_json(result.to_json())
        return
    console.out.print(result.fidelity.table(title))
    console.out.print(
        f"{len(result.int4_layers)} MatMul/Gemm weight layers INT4 weight-only, {len(result.int8_layers)} "
        f"INT8: weights {result.fp32_weight_bytes / 2**20:.1f} MiB FP32 -> {result.weight_bytes / 2**20:.1f} "
        f"MiB; {result.calibration_samples} calibration / {result.holdout_samples} held-out samples"
    )
    for label, path in (("onnx", result.onnx_path), ("report", result.report_path)):
        console.out.print(f"{label:7s}{path}")


COMMANDS: list[click.Command] = [quantize_command]
