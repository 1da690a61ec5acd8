"""Scoring a QAT step on the graph that ships (`qat --select-on graph`): the student's FP32 weights
exported as `qat` exports them at the end, Q/DQ placed with its learned ranges as `quantize` places them,
run in ONNX Runtime on the held-out samples against the original FP32 outputs.

Why: the torch fake-quant student and ONNX Runtime's Q/DQ arithmetic differ by float rounding (weights
near a rounding boundary once BatchNorm is folded, summation order). On EfficientNet-Lite0 with the margin
term the torch student scored 99.1 % decisive held-out top-1 where its exported Q/DQ graph scored 97.4 %:
the crops the term lifts sit just over the decision boundary, where those differences flip them back. So
the step is ranked on the artifact that ships. Cost: one export and one Q/DQ pass per evaluation instead
of one torch pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from calibrators import fidelity
from calibrators.collect import load_model
from calibrators.fidelity import Feeds, FidelityReport
from calibrators.output_kinds import OutputKind
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq
from calibrators.quantize import upgrade_opset
from calibrators.ranges import RangeSet
from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.fake_quant import QuantHooks

SELECT_ON = ("student", "graph")  # where held-out steps are scored: the torch student, or the shipped graph
DEFAULT_SELECT_ON = "student"
INT8_OPSET = 13  # what quantize upgrades an int8 graph to (per-channel Q/DQ)


def check(select_on: str) -> None:
    if select_on not in SELECT_ON:
        raise TrtbuildError(f"unknown --select-on '{select_on}'", f"use one of {', '.join(SELECT_ON)}")


def shipped_qdq(float_path: Path, ranges: RangeSet, options: QdqOptions) -> onnx.ModelProto:
    """The Q/DQ graph `quantize(float_path, ranges=ranges, rounding nearest, no fallback)` writes."""
    model = upgrade_opset(load_model(float_path), INT8_OPSET)
    return apply_qdq(model, plan_qdq(model, ranges, options))


class GraphScorer:
    """Called at each held-out evaluation: the fidelity of the graph the current student would ship as.

    ``export(path)`` writes the student's FP32 graph to ``path`` exactly as `qat` writes the final one
    (smoothing re-applied); it runs with the fake-quant ``hooks`` paused and torch's RNG state kept, so
    training continues as it would without this scoring. ``ranges()``: the learned ranges now.
    """

    def __init__(
        self,
        export: Callable[[Path], None],
        path: Path,
        hooks: QuantHooks,
        ranges: Callable[[], RangeSet],
        options: QdqOptions,
        held: Sequence[Feeds],
        reference: Mapping[str, np.ndarray],
        kinds: Mapping[str, OutputKind],
    ) -> None:
        self.export, self.path, self.hooks, self.ranges = export, path, hooks, ranges
        self.options, self.held, self.reference, self.kinds = options, list(held), reference, kinds

    def __call__(self) -> FidelityReport:
        with torch.random.fork_rng(devices=[]), self.hooks.paused():
            self.export(self.path)
        qdq = shipped_qdq(self.path, self.ranges(), self.options)
        test = fidelity.run_batches(fidelity.session(qdq), self.held)
        return fidelity.compare(self.reference, test, kinds=self.kinds)
