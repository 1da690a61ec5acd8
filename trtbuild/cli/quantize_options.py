"""Options `trtbuild quantize` would silently ignore for the chosen --precision: refused instead.

The INT4 paths (calibrators/int4) take no activation ranges, learned rounding, SmoothQuant or layer
report, and INT8/FP8 have no INT4 block size, budget or algorithm; a user who passed one of them asked
for something that would not happen (`--report` with int4-weights wrote no report, `--exclude-op-type`
quantized the op anyway)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from trtbuild.core.errors import TrtbuildError

INT4_ONLY = ("block_size", "weight_budget", "int4_algorithm")
NOT_FOR_INT4 = (
    "method",
    "percentile",
    "equalize_depthwise",
    "max_float_compute",
    "fallback_strategy",
    "fallback_rank",
    "write_report",
    "exclude_op_type",
    "ort_cpu_kind",
    "ort_weights",
    "speed_check",
    "bias_correction",
    "rounding",
    "rounding_budget",
    "smooth_quant",
)
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def refuse_ignored(precision: str) -> None:
    """One error naming every option the user gave that ``precision`` does not use."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return
    int4 = precision.startswith("int4-weights")
    ignored = NOT_FOR_INT4 if int4 else INT4_ONLY
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name in ignored and ctx.get_parameter_source(param.name) in _GIVEN
    ]
    if given:
        raise TrtbuildError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --precision {precision}",
            "drop it; for INT4 use --int4-algorithm/--block-size/--weight-budget/--exclude"
            if int4
            else "drop it (INT4 options apply to --precision int4-weights and int4-weights,int8)",
        )
