"""Near-ties: held-out samples whose FP32 top-1 the deployment's own float noise could flip.

Top-1 agreement asks "does the quantized model pick the class FP32 picks?". When FP32's two best classes
are closer than the noise of running that same FP32 network in FP16 (what TensorRT does with every layer
it does not run in INT8), the answer is a coin flip, not a property of the quantization: on the demo
(EfficientNet-Lite0, 200 held-out photos) four photos with FP32 top-2 margins of 0.002-0.016 failed the
99% gate with 32 layers (49% of the MACs) in float. So the gate decides top-1 on the *decisive* samples
and lists every near-tie it set aside (docs/fidelity-gate.md).

The rule, per classification/probability output, with z the FP32 values of one row (a sample, or one
position of an [N, T, C] output) and a, b its FP32 best and second-best classes:

- margin m = z[a] - z[b], in the output's own units (logits, probabilities, log-probabilities);
- ``tie_margin`` None (the default, "auto"): the FP32 graph converted to FP16 (I/O kept FP32) runs on the
  same held-out samples, giving h; the noise floor is the largest margin shift it causes over all rows,
  ``floor = max |(h[a] - h[b]) - m|``;
- ``tie_margin`` > 0: that number is the floor; 0: no near-ties (raw top-1, the old behaviour);
- a row is a near-tie when m <= floor. Every row whose top-1 FP16 flips is one (its shift exceeds its
  margin, so the floor does too);
- auto only: when that floor would set aside more than ``MAX_AUTO_SHARE`` of the rows, the FP16 graph is
  too noisy on this output to call anything a tie (PP-OCRv4's CTC reader: its largest shift over 3840
  positions is 0.85 in probability, which set aside half the positions and passed an INT8 graph whose raw
  per-position agreement was 94%), so none is set aside and top-1 is raw, with the reason in the report.

Cosine, KL and the other metrics are unchanged: they are continuous and have no ties.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from calibrators import gate_stats
from calibrators.fidelity_spec import TOP1_KINDS
from calibrators.output_kinds import OutputKind
from trtbuild.core import ort as ort_core
from trtbuild.core.fp16_graph import to_fp16

log = logging.getLogger(__name__)

AUTO = None  # tie_margin None: measure the floor with the FP16 graph
FP16_SOURCE = "FP16 graph"
SET_SOURCE = "--tie-margin"
NOISY_FP16_SOURCE = "FP16 graph, too noisy"  # auto floor refused: raw top-1
# The demo's floor sets aside 10 of 200 photos (5%); a floor that takes more than this share of the rows is
# the FP16 graph's own error, not FP32's coin flips, and would hide quantization error behind it.
MAX_AUTO_SHARE = 0.10


@dataclass(frozen=True)
class NearTies:
    """Which rows of one output are near-ties, and why. ``rows``: rows per sample (1 for [N, C], T for
    [N, T, C]); ``tied``: flat row indices (sample * rows + position); ``margins``: their FP32 margins."""

    floor: float
    source: str  # FP16_SOURCE, SET_SOURCE or NOISY_FP16_SOURCE
    samples: int
    rows: int = 1
    tied: tuple[int, ...] = ()
    margins: tuple[float, ...] = ()
    refused_share: float | None = None  # NOISY_FP16_SOURCE: the share of rows the floor would have taken

    def mask(self) -> np.ndarray:
        """[samples, rows] booleans, True where the row is a near-tie."""
        out = np.zeros(self.samples * self.rows, dtype=bool)
        out[list(self.tied)] = True
        return out.reshape(self.samples, self.rows)

    def describe(self) -> str:
        if self.source == NOISY_FP16_SOURCE:
            return (
                f"none set aside: the FP16 graph shifts FP32 top-2 margins by up to {self.floor:.4g}, "
                f"which would set aside {self.refused_share or 0:.1%} of the rows "
                f"(more than {MAX_AUTO_SHARE:.0%}): too noisy to call them ties, so top-1 is raw; "
                "--tie-margin sets a floor"
            )
        how = (
            "the largest FP32 top-2 margin shift the FP16 graph caused"
            if self.source == FP16_SOURCE
            else ("set by --tie-margin")
        )
        return f"FP32 top-2 margin <= {self.floor:.4g} ({how})"

    def listed(self, agrees: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Every near-tie: its sample (and position), FP32 margin and whether the test model agreed."""
        out = []
        for index, margin in zip(self.tied, self.margins, strict=True):
            sample, position = divmod(index, self.rows)
            item: dict[str, Any] = {"sample": sample, "margin": margin}
            if self.rows > 1:
                item["position"] = position
            if agrees is not None:
                item["agrees"] = bool(agrees.reshape(-1)[index])
            out.append(item)
        return out


@dataclass(frozen=True)
class Decided:
    """Top-1 agreement on the decisive rows: the mean over samples of each sample's share of agreeing
    decisive rows, its Wilson 95% interval, and how many samples had a decisive row."""

    agreement: float
    interval: tuple[float, float]
    samples: int


def decide(agrees: np.ndarray, ties: NearTies) -> Decided:
    """Top-1 agreement of ``agrees`` ([samples, rows] booleans) without the near-tie rows. With no decisive
    row at all there is nothing to decide on: the raw agreement stands (and the table says so)."""
    decisive = ~ties.mask()
    counted = decisive.sum(axis=1)
    keep = counted > 0
    if not keep.any():
        share = agrees.mean(axis=1)
        return Decided(float(share.mean()), gate_stats.wilson_interval(float(share.sum()), share.size), 0)
    share = (agrees & decisive).sum(axis=1)[keep] / counted[keep]
    n = int(keep.sum())
    return Decided(float(share.mean()), gate_stats.wilson_interval(float(share.sum()), n), n)


def margins(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row (last axis = classes): the best class, the runner-up and the margin between them."""
    rows = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
    order = np.argsort(rows, axis=1)
    best, second = order[:, -1], order[:, -2]
    index = np.arange(rows.shape[0])
    return best, second, rows[index, best] - rows[index, second]


def judged_by_top1(kind: OutputKind, reference: np.ndarray) -> bool:
    """The outputs compare_output gives a top-1 agreement: classes on the last axis of [N, C] / [N, T, C]."""
    return kind.kind in TOP1_KINDS and reference.ndim in (2, 3) and reference.shape[-1] >= 2


def find(reference: np.ndarray, floor: float, source: str) -> NearTies:
    """The rows of ``reference`` ([N, C] or [N, T, C]) whose FP32 margin is at most ``floor``."""
    _, _, m = margins(reference)
    tied = np.flatnonzero(m <= floor) if floor > 0 else np.zeros(0, dtype=np.int64)
    rows = 1 if reference.ndim == 2 else int(reference.shape[1])
    return NearTies(
        float(floor),
        source,
        int(reference.shape[0]),
        rows,
        tuple(int(i) for i in tied),
        tuple(float(m[i]) for i in tied),
    )


def margin_shift(reference: np.ndarray, other: np.ndarray) -> float:
    """The largest change of FP32's top-2 margin (its own best minus runner-up classes) in ``other``."""
    best, second, m = margins(reference)
    rows = np.asarray(other, np.float64).reshape(-1, other.shape[-1])
    index = np.arange(rows.shape[0])
    shifted = rows[index, best] - rows[index, second]
    return float(np.abs(shifted - m).max()) if m.size else 0.0


def fp16_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP32 graph in FP16, inputs and outputs kept FP32 (the float part of a TensorRT build)."""
    return to_fp16(model)


def attach(
    kinds: Mapping[str, OutputKind],
    model: onnx.ModelProto,
    reference: Mapping[str, np.ndarray],
    batches: Sequence[Mapping[str, np.ndarray]],
    tie_margin: float | None = AUTO,
    threads: int | None = None,
) -> dict[str, OutputKind]:
    """``kinds`` with the near-ties of every top-1 output attached (``OutputKind.ties``). ``tie_margin``:
    None measures the floor with the FP16 graph on ``batches`` (the held-out split ``reference`` came
    from), 0 attaches none, a positive number is the floor."""
    out = dict(kinds)
    judged = [n for n, k in kinds.items() if n in reference and judged_by_top1(k, reference[n])]
    if not judged or tie_margin == 0:
        return out
    floors: dict[str, float] = {}
    source = SET_SOURCE
    if tie_margin is not None:
        floors = {n: float(tie_margin) for n in judged}
    else:
        source = FP16_SOURCE
        fp16 = _run_fp16(model, batches, threads)
        if fp16 is None:
            return out
        floors = {n: margin_shift(reference[n], fp16[n]) for n in judged if n in fp16}
    for name, floor in floors.items():
        ties = find(reference[name], floor, source)
        share = len(ties.tied) / (ties.samples * ties.rows)
        if source == FP16_SOURCE and share > MAX_AUTO_SHARE:
            ties = replace(ties, source=NOISY_FP16_SOURCE, tied=(), margins=(), refused_share=share)
            log.warning("%s: %s", name, ties.describe())
        out[name] = replace(kinds[name], ties=ties)
        if ties.tied:
            log.info("%s: %d near-tie row(s) set aside by top-1 (%s)", name, len(ties.tied), ties.describe())
    return out


def _run_fp16(
    model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], threads: int | None
) -> dict[str, np.ndarray] | None:
    """The FP16 graph's outputs on ``batches``; None (logged) when this graph cannot be made or run in
    FP16 here: the gate then decides on every sample, as with --tie-margin 0."""
    from calibrators import fidelity  # fidelity imports OutputKind from output_kinds, not this module

    try:
        sess = ort_core.cpu_session(fp16_graph(model), ort_core.REFERENCE, threads)
        return fidelity.run_batches(sess, batches)
    except Exception as exc:  # the converter and ORT raise many types; the gate must still decide
        log.warning(
            "near-ties not measured: the FP16 graph could not be run (%s); top-1 is decided on every "
            "held-out sample (set --tie-margin to give the floor)",
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
        )
        return None
