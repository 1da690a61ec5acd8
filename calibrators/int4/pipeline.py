"""`quantize --precision int4-weights`: INT4 weight-only MatMul/Gemm, gated on held-out fidelity.

One pass over the calibration data records each layer's real inputs (rows capped), the weights are
quantized by RTN, AWQ (default) or GPTQ, the graph is written in TensorRT's weight-only pattern
(calibrators/int4/graph.py), and it is judged against FP32 on held-out samples in reference semantics
(exact dequantization, float math) with the same gate as INT8. The ONNX and its report are written as one
output set (trtbuild/core/output_set.py) only if the gate passes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibrators import fidelity, gate_stats, near_ties, output_kinds
from calibrators.collect import DEFAULT_BATCH_SIZE, instrument, load_model
from calibrators.data import CalibrationData, first_samples, model_inputs, open_data
from calibrators.fidelity import FidelityReport, FidelityThreshold
from calibrators.fidelity_spec import check_outputs
from calibrators.int4 import awq, budget, gptq, output_noise, sequential
from calibrators.int4.blocks import DEFAULT_BLOCK_SIZE, BlockQuant, quantize_blocks
from calibrators.int4.graph import (
    WeightLayer,
    find_layers,
    hoist_constants,
    kept_float,
    weight_kn,
    write_int4,
)
from calibrators.int4.rows import real_token_rows, sample_rows
from calibrators.int4.segments import SegmentRunner
from calibrators.preprocess import Preprocess
from calibrators.qdq import ensure_node_names
from trtbuild.core import atomic, output_set
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)

ALGORITHMS = ("awq-gptq", "awq", "gptq", "rtn")
DEFAULT_ALGORITHM = "awq-gptq"  # best on held-out sentences (bench/bench_int4.py, docs/int4-weight-only.md)
DEFAULT_HOLDOUT: int | None = None  # auto: sized to the data, as INT8 (calibrators/gate_stats.py)
PRECISION = "int4-weights"


class Int4GateError(TrtbuildError):
    """The INT4 weight-only model is below the fidelity threshold; nothing was written."""

    def __init__(self, report: FidelityReport, algorithm: str) -> None:
        self.report = report
        failing = "; ".join(
            f"{o.name} ({o.kind}): {', '.join(o.failures(report.threshold))}" for o in report.failing()
        )
        super().__init__(
            f"INT4 weight-only ({algorithm}) fidelity below the gate on {report.samples} held-out samples "
            f"({report.semantics} semantics): {failing}; nothing was written",
            "try --int4-algorithm awq or gptq, a smaller --block-size, --exclude for sensitive layers, "
            "or a lower --min-fidelity",
        )


@dataclass(frozen=True)
class LayerReport:
    node: str
    op_type: str
    k: int
    n: int
    fp32_bytes: int
    int4_bytes: int  # packed codes + FP32 block scales
    alpha: float | None = None  # AWQ
    error_rtn: float | None = None  # group output error on calibration rows, RTN
    error: float | None = None  # and with the chosen algorithm
    input_scale: str | None = None  # where AWQ's 1/s went: layernorm | mul
    block: int | None = None  # this layer's block size


@dataclass
class Int4Result:
    onnx_path: Path
    report_path: Path
    algorithm: str
    block_size: int
    layers: list[LayerReport]
    fidelity: FidelityReport
    calibration_samples: int
    holdout_samples: int
    seconds: float
    kept_float: list[dict[str, str]] = field(default_factory=list)  # MatMul/Gemm left float, why
    budget: dict[str, Any] | None = None  # --weight-budget's per-layer block choice (budget.py)

    @property
    def fp32_weight_bytes(self) -> int:
        return sum(layer.fp32_bytes for layer in self.layers)

    @property
    def int4_weight_bytes(self) -> int:
        return sum(layer.int4_bytes for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.onnx_path),
            "report": str(self.report_path),
            "precision": PRECISION,
            "algorithm": self.algorithm,
            "block_size": self.block_size,
            "calibration_samples": self.calibration_samples,
            "holdout_samples": self.holdout_samples,
            "seconds": round(self.seconds, 2),
            "int4_layers": len(self.layers),
            "weight_budget": self.budget,
            "matmul_weight_bytes": {
                "fp32": self.fp32_weight_bytes,
                "int4": self.int4_weight_bytes,
                "ratio": self.int4_weight_bytes / max(1, self.fp32_weight_bytes),
            },
            "layers": [layer.__dict__ for layer in self.layers],
            "kept_float": self.kept_float,
            "fidelity": self.fidelity.to_json(),
        }


def check_block_size(layers: Sequence[WeightLayer], block: int) -> None:
    """Every layer's reduction size must be a multiple of the block (TensorRT has no partial blocks)."""
    if block < 2:
        raise TrtbuildError(f"--block-size {block} is too small", "use 32, 64 or 128 (default)")
    bad = [layer for layer in layers if layer.k % block]
    if not bad:
        return
    common = math.gcd(*(layer.k for layer in layers))
    fits = [b for b in (16, 32, 64, 128, 256) if common % b == 0]
    raise TrtbuildError(
        f"--block-size {block} does not divide the reduction size of {len(bad)} layer(s), e.g. "
        f"{bad[0].node} (K={bad[0].k})",
        f"use a block size that divides every K ({', '.join(map(str, fits)) or 'none of 16..256'}), "
        "or --exclude those layers",
    )


def collect_inputs(
    model: onnx.ModelProto,
    activations: Sequence[str],
    calib: CalibrationData,
    batch_size: int,
    threads: int | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], int]:
    """Each activation's rows [rows, K] over the calibration data (at most MAX_ROWS, sampled), and the
    number of samples they came from."""
    fed = {i.name for i in model.graph.input}
    wanted = [a for a in activations if a not in fed]
    session = fidelity.session(instrument(model, wanted), threads) if wanted else None
    parts: dict[str, list[np.ndarray]] = {a: [] for a in activations}
    count = 0
    for batch in calib.batches(batch_size):
        count += len(next(iter(batch.values())))
        values = dict(zip(wanted, session.run(wanted, dict(batch)), strict=True)) if session else {}
        for name in activations:
            array = np.asarray(batch[name] if name in fed else values[name], np.float32)
            parts[name].append(real_token_rows(array, batch))
    return {name: sample_rows(chunks, seed) for name, chunks in parts.items()}, count


def quantize_layers(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    rows: Mapping[str, np.ndarray],
    algorithm: str,
    block: int | Mapping[str, int],
) -> tuple[dict[str, BlockQuant], dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """(quantized weights per node, AWQ input scale per activation, per-node details); ``block``: one
    size, or one per node (budget.py)."""
    quants: dict[str, BlockQuant] = {}
    scales: dict[str, np.ndarray] = {}
    details: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.activation, []).append(layer)
    for activation, group in groups.items():
        weights = [weight_kn(model, layer) for layer in group]
        blocks = [block if isinstance(block, int) else block[layer.node] for layer in group]
        x = rows.get(activation)
        if algorithm == "awq" and x is not None:
            group_quants, choice = awq.awq_group(x, weights, blocks)
            scales[activation] = choice.scale
            for layer, quant in zip(group, group_quants, strict=True):
                quants[layer.node] = quant
                details[layer.node] = {
                    "alpha": choice.alpha,
                    "error_rtn": choice.error_rtn,
                    "error": choice.error,
                }
            continue
        # one Hessian / Gram matrix per group: Q, K and V read the same rows
        x64 = x.astype(np.float64) if algorithm == "gptq" and x is not None else None
        hessian = x64.T @ x64 if x64 is not None else None
        gram = x.T @ x if x is not None else None
        for layer, weight, b in zip(group, weights, blocks, strict=True):
            if hessian is not None:
                quants[layer.node] = gptq.gptq_hessian(hessian, weight, b)
            else:
                quants[layer.node] = quantize_blocks(weight, b)
            if gram is not None:
                rtn = quantize_blocks(weight, b).dequantized()
                details[layer.node] = {
                    "error_rtn": awq.output_error(gram, rtn - weight),
                    "error": awq.output_error(gram, quants[layer.node].dequantized() - weight),
                }
    return quants, scales, details


def check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise TrtbuildError(f"unknown INT4 algorithm '{algorithm}'", f"use one of {', '.join(ALGORITHMS)}")


def quantize_int4(
    model_path: str | Path,
    data: Any,
    out_dir: str | Path,
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    block_size: int = DEFAULT_BLOCK_SIZE,
    weight_budget: str | float | None = None,
    samples: int | None = None,
    holdout: int | None = DEFAULT_HOLDOUT,
    min_fidelity: str | float | Sequence[str] | FidelityThreshold | None = None,
    output_kind: Sequence[str] | Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    preprocess: Preprocess | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    seed: int = 0,
    tie_margin: float | None = near_ties.AUTO,
) -> Int4Result:
    """INT4 weight-only quantization of ``model_path``'s MatMul/Gemm weights, block-wise along K.

    ``algorithm``: awq-gptq (AWQ scales, GPTQ rounding, groups fitted in order to the FP32 outputs on the
    quantized inputs, default), awq (activation-aware scales + clip), gptq (Hessian error compensation) or
    rtn (round-to-nearest, needs no data but still gated). ``weight_budget`` (e.g. "1/7" of the FP32
    MatMul weight bytes): finer blocks than ``block_size`` for the most sensitive layers until it is spent
    (calibrators/int4/budget.py). Writes ``<stem>.int4.onnx`` and
    ``<stem>.int4.json`` into ``out_dir`` only when the held-out fidelity meets ``min_fidelity``; raises
    :class:`Int4GateError` otherwise.
    """
    check_algorithm(algorithm)
    budget_fraction = budget.parse_budget(weight_budget)
    start = time.perf_counter()
    with output_set.writer_lock(out_dir):
        threshold = (
            min_fidelity
            if isinstance(min_fidelity, FidelityThreshold)
            else fidelity.parse_min_fidelity(min_fidelity)
        )
        kind_overrides = output_kinds.parse_output_kinds(output_kind)
        model = ensure_node_names(load_model(model_path))
        hoist_constants(model)
        graph_outputs = [o.name for o in model.graph.output]
        check_outputs(threshold, graph_outputs)
        output_kinds.check_overrides(kind_overrides, graph_outputs)
        layers = find_layers(model, exclude)
        if not layers:
            raise TrtbuildError(
                f"{model_path} has no MatMul/Gemm with a constant 2-D weight to quantize to INT4"
                + (" (after --exclude)" if exclude else ""),
                "INT4 weight-only applies to linear/transformer layers; use --precision int8 or fp16",
            )
        check_block_size(layers, block_size)
        if budget_fraction is not None:
            budget.check_fits(layers, block_size, budget_fraction)
        reference_session = fidelity.float_session(model, threads)
        all_data = open_data(data, model_inputs(model), preprocess)
        if holdout is None:
            holdout = gate_stats.auto_holdout(all_data.known_length(), samples)
        calib, held = all_data.split(holdout, seed)
        calib = calib.sample(samples, seed)
        activations = list(dict.fromkeys(layer.activation for layer in layers))
        rows, calib_count = (
            collect_inputs(model, activations, calib, batch_size, threads, seed)
            if algorithm != "rtn" or budget_fraction is not None
            else ({}, 0)
        )
        blocks: int | dict[str, int] = block_size
        plan = None
        if budget_fraction is not None:
            noise = budget.at_outputs(
                budget.noise_table(model, layers, rows, block_size, seed),
                output_noise.output_noise(
                    model,
                    layers,
                    first_samples(calib.batches(batch_size), output_noise.SAMPLES),
                    block_size,
                    threads,
                ),
                block_size,
            )
            plan = budget.choose_blocks(layers, noise, block_size, budget_fraction)
            blocks = plan.blocks
            if algorithm == "rtn":
                rows = {}
        if algorithm == "awq-gptq":
            quants, scales, details = sequential.quantize_sequential(
                model,
                layers,
                rows,
                SegmentRunner(model, calib.batches(batch_size), threads, seed),
                blocks,
            )
        else:
            quants, scales, details = quantize_layers(model, layers, rows, algorithm, blocks)
        qmodel, placed = write_int4(model, layers, quants, scales)
        # with a budget the layers' blocks differ: the metadata lists the sizes used, coarsest first
        block_label = ",".join(map(str, sorted({q.block for q in quants.values()}, reverse=True)))

        held_batches = list(held.batches(batch_size))
        held_count = sum(int(next(iter(b.values())).shape[0]) for b in held_batches)
        reference = fidelity.run_reference(reference_session, held_batches)
        test = fidelity.run_batches(fidelity.session(qmodel, threads, ort_core.REFERENCE), held_batches)
        kinds = fidelity.decide_kinds(model, reference, kind_overrides)
        # top-1 outputs: FP32 near-ties listed, not counted, as quantize's INT8 gate does (near_ties.py)
        kinds = near_ties.attach(kinds, model, reference, held_batches, tie_margin, threads)
        report = fidelity.compare(reference, test, threshold, kinds, ort_core.REFERENCE)
        if not report.passed:
            raise Int4GateError(report, algorithm)
        stem = Path(model_path).name.removesuffix(".onnx")
        result = Int4Result(
            onnx_path=Path(out_dir) / f"{stem}.int4.onnx",
            report_path=Path(out_dir) / f"{stem}.int4.json",
            algorithm=algorithm,
            block_size=block_size,
            layers=[_layer_report(layer, quants[layer.node], details, placed) for layer in layers],
            fidelity=report,
            calibration_samples=calib_count,
            holdout_samples=held_count,
            seconds=time.perf_counter() - start,
            budget=plan.to_json() if plan else None,
            kept_float=kept_float(model, layers),
        )
        write_set(
            qmodel, result.onnx_path, result.report_path, result.to_json(), PRECISION, block_label, algorithm
        )
        log.info("INT4 weight-only: %d layers, %s, block %s", len(layers), algorithm, block_label)
        return result


def _layer_report(
    layer: WeightLayer, quant: BlockQuant, details: Mapping[str, Mapping[str, Any]], placed: Mapping[str, str]
) -> LayerReport:
    extra = details.get(layer.node, {})
    return LayerReport(
        node=layer.node,
        op_type=layer.op_type,
        k=layer.k,
        n=layer.n,
        fp32_bytes=layer.k * layer.n * 4,
        int4_bytes=(layer.k * layer.n + 1) // 2 + quant.scales.size * 4,
        alpha=extra.get("alpha"),
        error_rtn=extra.get("error_rtn"),
        error=extra.get("error"),
        input_scale=placed.get(layer.activation),
        block=quant.block,
    )


def write_set(
    qmodel: onnx.ModelProto,
    onnx_path: Path,
    report_path: Path,
    report_json: dict[str, Any],
    precision: str,
    block_size: int | str,
    algorithm: str,
) -> None:
    """Tag the graph (target, precision, block, algorithm), write it, then the report naming it by sha256
    (the set's manifest: removed first, written last). Shared by int4-weights and int4-weights,int8."""
    ort_core.set_metadata(
        qmodel,
        {
            ort_core.META_TARGET: "tensorrt",
            "trtbuild.precision": precision,
            "trtbuild.int4.block_size": str(block_size),
            "trtbuild.int4.algorithm": algorithm,
        },
    )
    report_path.unlink(missing_ok=True)
    atomic.write_bytes(onnx_path, qmodel.SerializeToString())
    report = {**report_json, output_set.MANIFEST_KEY: output_set.manifest_entries({"onnx": onnx_path})}
    atomic.write_text(report_path, json.dumps(report, indent=2, default=str) + "\n")
