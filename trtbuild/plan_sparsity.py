"""Whether a build plan turns on TensorRT's 2:4 sparse kernels: asked for, or detected in the weights.

A graph whose eligible Conv/Gemm/MatMul weights mostly follow the 2:4 pattern (e.g. `trtbuild qat
--sparsity 2:4`) gets SPARSE_WEIGHTS / `--sparsity=enable` by itself on targets that have sparse Tensor
Cores; the plan's notes say how many layers and weights are eligible and sparse.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from calibrators.sparsity import SparsityReport, analyze
from trtbuild.core.errors import TrtbuildError
from trtbuild.targets import Target

MAX_ANALYZED_BYTES = 2 << 30  # beyond this (external-data giants), only an explicit --sparsity turns it on


def sparsity_of(path: str | os.PathLike[str]) -> SparsityReport | None:
    """The 2:4 report of an ONNX file's weights, or None when it cannot be read cheaply."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size > MAX_ANALYZED_BYTES:
        return None
    try:
        return analyze(onnx.load(str(p)))
    except Exception:  # an unreadable graph fails later with its own message; detection just stays off
        return None


def describe(report: SparsityReport) -> str:
    j = report.to_json()
    return (
        f"2:4 sparsity: {j['sparse_layers']} of {j['eligible_layers']} eligible layers "
        f"({j['sparse_weights']:,} of {j['eligible_weights']:,} eligible weights; "
        f"{j['total_weights']:,} weights in all {j['weighted_layers']} weighted layers) follow 2:4"
    )


def decide_sparsity(
    requested: bool | None, tgt: Target, graphs: list[str | os.PathLike[str]], notes: list[str]
) -> bool:
    """``requested``: True/False from the user, None to detect it from the first readable graph."""
    if requested:
        if not tgt.supports_sparsity:
            raise TrtbuildError(
                f"{tgt.name} ({tgt.sm_text}) has no structured-sparsity support (needs sm80+)",
                "drop --sparsity",
            )
        return True
    if requested is False:
        return False
    report = next((r for r in (sparsity_of(g) for g in graphs) if r is not None), None)
    if report is None or not report.is_sparse_model:
        return False
    if not tgt.supports_sparsity:
        notes.append(describe(report) + f"; {tgt.name} has no sparse Tensor Cores, so they run dense")
        return False
    notes.append(describe(report) + "; sparse kernels turned on (SPARSE_WEIGHTS)")
    return True
