"""Every choice of one `quantize` run, with its default: the one place those defaults live.

`trtbuild quantize` fills it from its flags (flag ``--foo-bar`` is field ``foo_bar``); the Python API takes it
as ``quantize(model, data, out, settings)`` or as keyword overrides of the defaults. Invalid choices are
refused when the settings are made, before any data is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from calibrators import adaround, fallback_ranking, output_aware, smoothquant
from calibrators.collect import DEFAULT_BATCH_SIZE
from calibrators.fallback import DEFAULT_MAX_FLOAT_COMPUTE
from calibrators.fidelity import FidelityThreshold
from calibrators.methods import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from calibrators.preprocess import Preprocess
from calibrators.qdq_types import QDQ_TYPES
from trtbuild.core.defaults import DEFAULT_TRT_VERSION
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.settings import with_overrides

FALLBACK_STRATEGIES = ("auto", "drop_one", "local")
FALLBACK_PRECISIONS = ("float", "fp8")


@dataclass(frozen=True)
class QuantizeSettings:
    """How to calibrate, place Q/DQ, judge and fall back. See :func:`calibrators.quantize.quantize`."""

    # calibration (the same names as calibrators.calibrate.CalibrationSettings)
    method: str = DEFAULT_METHOD  # or "output-aware" (calibrators/output_aware.py: int8 only)
    percentile: float = DEFAULT_PERCENTILE
    samples: int | None = None  # a seeded random subset of the calibration split; None: all of it
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None  # ONNX Runtime intra-op threads; None: all cores
    preprocess: Preprocess | None = None
    exclude: tuple[str, ...] = ()  # regexes of node names kept float
    # per-channel equalization of depthwise-conv inputs whose channel ranges differ (dw_equalize.py)
    equalize_depthwise: bool = False
    exclude_op_types: tuple[str, ...] = ()
    # what is written
    activation_type: str = "int8"  # int8 (TensorRT), fp8 (TensorRT E4M3), uint8 (ONNX Runtime CPU)
    trt_version: str = DEFAULT_TRT_VERSION  # of the legacy calibration cache
    bias_correction: bool = True
    rounding: str = "nearest"  # or "learned" (calibrators/adaround.py)
    rounding_budget_s: float = adaround.AdaRoundConfig.budget_s
    # SmoothQuant on MatMul/Gemm inputs with outlier channels before calibrating (calibrators/smoothquant.py;
    # auto: where some channel's max is OUTLIER_RATIO x the median channel's)
    smooth_quant: str = "auto"
    ort_cpu_kind: str = "auto"  # uint8 only: the CPU the graph is for
    ort_weights: str = "auto"  # uint8 only: the weight format (calibrators/ort_cpu.py)
    # uint8 only: time FP32 vs the INT8 graph here at batch 1 and say when INT8 is not faster (ort_speed.py)
    speed_check: bool = True
    # the gate
    holdout: int | None = None  # held-out samples; None: sized to the data (gate_stats.auto_holdout)
    min_fidelity: str | float | Sequence[str] | FidelityThreshold | None = None
    output_kind: Sequence[str] | Mapping[str, str] | None = None
    write_report: bool = False  # the per-layer accuracy report (calibrators/layer_report.py)
    # top-1 near-ties (calibrators/near_ties.py): None measures the floor with the FP16 graph, 0 = raw top-1
    tie_margin: float | None = None
    # the fallback
    auto_fallback: bool = False
    fallback_strategy: str = "auto"
    fallback_rank: str = fallback_ranking.DEFAULT_RANKING
    max_float_compute: float = DEFAULT_MAX_FLOAT_COMPUTE
    # what auto-fallback turns a layer into: float, or FP8 where it can (`--precision int8,fp8`, mixed
    # INT8/FP8 per layer for TensorRT on sm89+, calibrators/qdq_mixed.py)
    fallback_precision: str = "float"

    def __post_init__(self) -> None:
        # Lists from callers become tuples, so settings stay immutable.
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "exclude_op_types", tuple(self.exclude_op_types))
        _one_of("calibration method", self.method, (*METHODS, output_aware.METHOD))
        if self.method == output_aware.METHOD and self.activation_type != "int8":
            raise TrtbuildError(
                f"--method {output_aware.METHOD} scores int8 ranges, not {self.activation_type} ones",
                "use --method mse for uint8/fp8 graphs",
            )
        _one_of("precision", self.activation_type, QDQ_TYPES)
        _one_of("rounding", self.rounding, adaround.ROUNDINGS)
        _one_of("--smooth-quant mode", self.smooth_quant, smoothquant.MODES)
        _one_of("sensitivity strategy", self.fallback_strategy, FALLBACK_STRATEGIES)
        _one_of("fallback ranking", self.fallback_rank, fallback_ranking.RANKINGS)
        _one_of("fallback precision", self.fallback_precision, FALLBACK_PRECISIONS)
        if self.fallback_precision == "fp8" and (self.activation_type != "int8" or not self.auto_fallback):
            raise TrtbuildError(
                "mixed INT8/FP8 picks its FP8 layers through auto-fallback on an int8 graph",
                "use --precision int8,fp8 (it turns --auto-fallback on), or auto_fallback=True with int8",
            )
        if self.tie_margin is not None and not self.tie_margin >= 0.0:
            raise TrtbuildError(
                f"--tie-margin {self.tie_margin} is negative", "pass auto, 0 (raw top-1) or a margin >= 0"
            )
        if not 0.0 <= self.max_float_compute <= 1.0:
            raise TrtbuildError(
                f"--max-float-compute {self.max_float_compute} is outside 0..1", "pass a share such as 0.5"
            )

    @classmethod
    def from_overrides(cls, base: QuantizeSettings | None, overrides: Mapping[str, Any]) -> QuantizeSettings:
        """``base`` (or the defaults) with ``overrides`` applied; an unknown name is a programming error."""
        return with_overrides(cls, base, overrides, "quantize")

    def to_json(self) -> dict[str, Any]:
        """The settings as plain values, for the fidelity report."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["exclude"], out["exclude_op_types"] = list(self.exclude), list(self.exclude_op_types)
        out["preprocess"] = None if self.preprocess is None else dataclasses.asdict(self.preprocess)
        out["min_fidelity"] = None if self.min_fidelity is None else str(self.min_fidelity)
        out["output_kind"] = None if self.output_kind is None else str(self.output_kind)
        return out


def _one_of(what: str, value: str, allowed: Sequence[str] | Mapping[str, Any]) -> None:
    if value not in allowed:
        raise TrtbuildError(f"unknown {what} '{value}'", f"use one of {', '.join(allowed)}")
