"""Fidelity of a quantized model against its FP32 original on held-out data: the accuracy gate.

Each output is judged by what it is (calibrators/output_kinds.py): classification logits and probabilities
by top-1 agreement (and KL), regression and embedding outputs by cosine, with SQNR and the error over the
output's range reported for all. Bounds come from calibrators/fidelity_spec.py; the metrics themselves
from trtbuild/core/metrics.py. Every report says on how many samples and under which semantics (reference
Q/DQ or ORT's CPU kernels, trtbuild/core/ort.py) it was measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from rich.table import Table

from calibrators import gate_stats, near_ties, output_kinds
from calibrators.fidelity_spec import (
    DEFAULT_THRESHOLD,
    METRICS,
    FidelityThreshold,
    check_outputs,
    describe_bound,
    meets,
    parse_min_fidelity,
)
from calibrators.output_kinds import OutputKind
from trtbuild.core import metrics
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError

Feeds = Mapping[str, np.ndarray]
CAPTION_TIES = 20  # near-ties named in the console caption (a CTC reader can have thousands)
__all__ = [
    "DEFAULT_THRESHOLD",
    "FidelityReport",
    "FidelityThreshold",
    "OutputFidelity",
    "compare",
    "compare_output",
    "measure",
    "parse_min_fidelity",
    "run_batches",
    "session",
]


@dataclass(frozen=True)
class OutputFidelity:
    """How closely one quantized output follows FP32 on the held-out samples."""

    name: str
    cosine: float  # mean over samples of the per-sample cosine similarity
    min_cosine: float
    sqnr_db: float  # 10 log10(|fp32|^2 / |fp32 - int8|^2) over all samples
    top1_agreement: float | None = None  # classification / probability rows only
    kl: float | None = None  # mean KL(fp32 || int8) of the (soft-maxed) rows, same outputs
    kind: str = "regression"  # calibrators/output_kinds.py
    kind_reason: str = ""
    err_over_range: float = 0.0  # max |fp32 - int8| / (max - min of fp32)
    top1_interval: tuple[float, float] | None = None  # Wilson 95% interval of top-1 agreement
    cosine_interval: tuple[float, float] | None = None  # t 95% interval of the mean cosine
    iou: float | None = None  # prob_map outputs: mean IoU of the maps thresholded at 0.3
    # Near-ties (calibrators/near_ties.py): top1_agreement above is decided on the decisive samples; the
    # raw agreement on every sample, and every sample set aside, are reported next to it.
    raw_top1: float | None = None
    raw_top1_interval: tuple[float, float] | None = None
    decisive_samples: int | None = None  # samples with a decisive row (None: no near-tie rule applied)
    tie_rule: str | None = None  # how near-ties were decided
    near_ties: list[dict[str, Any]] = field(default_factory=list)  # each one: sample, margin, agrees

    def measured(self, metric: str) -> float | None:
        return {
            "top1": self.top1_agreement,
            "cosine": self.cosine,
            "sqnr": self.sqnr_db,
            "kl": self.kl,
            "err": self.err_over_range,
            "iou": self.iou,
        }[metric]

    def bounds(self, threshold: FidelityThreshold) -> dict[str, float]:
        return threshold.bounds_for(self.name, self.kind, self.top1_agreement is not None)

    def failures(self, threshold: FidelityThreshold) -> list[str]:
        """Each bound this output misses, as 'metric measured (bound)'."""
        out = []
        for metric, bound in self.bounds(threshold).items():
            value = self.measured(metric)
            if not meets(metric, value, bound):
                shown = "n/a" if value is None else f"{value:.4g}"
                out.append(f"{METRICS[metric][1]} {shown} (needs {describe_bound(metric, bound)})")
        return out

    def passes(self, threshold: FidelityThreshold) -> bool:
        return not self.failures(threshold)

    def score(self) -> float:
        """Continuous error for ranking (lower is better): KL where top-1 judges, else 1 - cosine."""
        return float(self.kl) if self.kl is not None else 1.0 - self.cosine


@dataclass
class FidelityReport:
    samples: int
    outputs: list[OutputFidelity]
    threshold: FidelityThreshold = field(default_factory=FidelityThreshold)
    semantics: str = ort_core.REFERENCE  # how the quantized graph was evaluated (trtbuild/core/ort.py)

    @property
    def passed(self) -> bool:
        return all(o.passes(self.threshold) for o in self.outputs)

    def failing(self) -> list[OutputFidelity]:
        return [o for o in self.outputs if not o.passes(self.threshold)]

    def score(self, outputs: set[str] | None = None) -> float:
        """Summed error of ``outputs`` (default: all), for ranking candidates."""
        return sum(o.score() for o in self.outputs if outputs is None or o.name in outputs)

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            shown = [
                f"top-1 {_top1_text(o, self.samples)}"
                if m == "top1"
                else f"{METRICS[m][1]} {o.measured(m):.4g}"
                for m in o.bounds(self.threshold)
                if o.measured(m) is not None
            ]
            parts.append(f"{o.name} ({o.kind}): {', '.join(shown)}")
        return "; ".join(parts)

    @property
    def sample_warning(self) -> str | None:
        """Set when the gate is decided on fewer samples than can support it (calibrators/gate_stats.py)."""
        decisive = [o.decisive_samples for o in self.outputs if o.decisive_samples is not None]
        fewest = min([self.samples, *decisive])
        warning = gate_stats.small_sample_warning(self.samples)
        if warning is None and fewest < gate_stats.MIN_TRUSTED_SAMPLES:  # enough held out, too few decide
            warning = gate_stats.small_sample_warning(fewest)
            return f"{warning} ({self.samples} held out, {fewest} of them decisive for top-1)"
        if warning and fewest < self.samples:
            warning += f" ({fewest} of them decisive for top-1)"
        return warning

    def near_tie_lines(self, limit: int | None = None) -> list[str]:
        """Per top-1 output with the near-tie rule on: the held-out samples it set aside (the first
        ``limit`` of them; all by default), and why."""
        return [_ties_caption(o, limit) for o in self.outputs if o.tie_rule]

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "sample_warning": self.sample_warning,
            "semantics": self.semantics,
            "semantics_description": ort_core.describe(self.semantics),
            "passed": self.passed,
            "threshold": self.threshold.to_json(),
            "outputs": [
                {
                    **asdict(o),
                    "gate": {m: b for m, b in o.bounds(self.threshold).items()},
                    "passed": o.passes(self.threshold),
                    "failures": o.failures(self.threshold),
                }
                for o in self.outputs
            ],
        }

    def table(self, title: str = "INT8 fidelity vs FP32 (held-out samples)") -> Table:
        why = [f"{o.name}: {o.kind} ({o.kind_reason})" for o in self.outputs if o.kind_reason]
        table = Table(
            title=f"{title}: {self.samples} samples",
            caption="\n".join(
                [
                    *why,
                    *self.near_tie_lines(CAPTION_TIES),
                    f"measured with {ort_core.describe(self.semantics)}; [..] = 95% interval",
                    *([f"[yellow]{self.sample_warning}[/yellow]"] if self.sample_warning else []),
                ]
            ),
        )
        maps = any(o.iou is not None for o in self.outputs)  # detector probability maps: IoU column
        tied = any(o.tie_rule for o in self.outputs)  # near-ties set aside: the raw top-1 beside it
        columns = ("output", "kind", "gate", "top-1", "KL", "cosine", "min cos", "SQNR dB", "err/range")
        tie_columns = ("raw (ties)",) if tied else ()  # the near-ties themselves are in the caption
        iou_column = (f"IoU@{metrics.PROB_MAP_THRESHOLD:g}",) if maps else ()
        for col in (*columns[:4], *tie_columns, *columns[4:], *iou_column, ""):
            table.add_column(col, justify="left" if col in ("output", "kind", "gate") else "right")
        for o in self.outputs:
            iou = ("-" if o.iou is None else f"{o.iou:.4f}",) if maps else ()
            ties = (
                (f"{o.raw_top1:.2%} ({len(o.near_ties)})",)
                if o.tie_rule and o.raw_top1 is not None
                else ("-",)
            )
            table.add_row(
                o.name,
                o.kind,
                ", ".join(_short_bound(m, b) for m, b in o.bounds(self.threshold).items()),
                "-"
                if o.top1_agreement is None
                else f"{o.top1_agreement:.2%} {_interval(o.top1_interval, True)}",
                *(ties if tied else ()),
                "-" if o.kl is None else f"{o.kl:.4f}",
                f"{o.cosine:.5f} {_interval(o.cosine_interval, False)}",
                f"{o.min_cosine:.5f}",
                f"{o.sqnr_db:.1f}",
                f"{o.err_over_range:.2%}",
                *iou,
                "[green]pass[/green]" if o.passes(self.threshold) else "[red]FAIL[/red]",
            )
        return table


def _top1_text(o: OutputFidelity, samples: int) -> str:
    """'99.50% [97.2%, 99.9%] on 196 decisive samples (4 near-tie row(s) excluded, FP32 top-2 margin <=
    0.016 (...)); raw top-1 98.00% [95.0%, 99.2%] on 200'."""
    text = f"{o.top1_agreement:.2%} {_interval(o.top1_interval, True)}"
    if not o.tie_rule or o.raw_top1 is None:
        return text
    if not o.decisive_samples:
        return f"{text} on {samples}: every sample a near-tie ({o.tie_rule}), so raw top-1 decides"
    return (
        f"{text} on {o.decisive_samples} decisive samples ({len(o.near_ties)} near-tie row(s) excluded, "
        f"{o.tie_rule}); raw top-1 {o.raw_top1:.2%} {_interval(o.raw_top1_interval, True)} on {samples}"
    )


def _ties_caption(o: OutputFidelity, limit: int | None = None) -> str:
    """One line naming the near-ties set aside (the first ``limit``): sample, FP32 margin, whether the
    model agreed."""
    if not o.near_ties:
        return f"{o.name}: no near-ties ({o.tie_rule})"
    shown = o.near_ties if limit is None else o.near_ties[:limit]
    more = len(o.near_ties) - len(shown)
    listed = ", ".join(
        f"#{t['sample']}"
        + (f"@{t['position']}" if "position" in t else "")
        + f" ({t['margin']:.4g}"
        + ("" if t.get("agrees", True) else ", differs")
        + ")"
        for t in shown
    )
    if more:  # a per-position output can have thousands: the JSON and the --report page list them all
        listed += f" and {more} more (all in the JSON and --report)"
    return f"{o.name}: {len(o.near_ties)} near-tie(s) not counted by top-1 ({o.tie_rule}): {listed}"


def _interval(bounds: tuple[float, float] | None, percent: bool) -> str:
    if bounds is None:
        return ""
    lo, hi = bounds
    return f"[{lo:.1%}, {hi:.1%}]" if percent else f"[{lo:.4f}, {hi:.4f}]"


def _short_bound(metric: str, value: float) -> str:
    direction = ">=" if METRICS[metric][0] == "min" else "<="
    return f"{metric}{direction}{value:.2%}" if metric == "top1" else f"{metric}{direction}{value:.4g}"


# --------------------------------------------------------------------------------------------- comparing


def compare_output(
    name: str, ref: np.ndarray, test: np.ndarray, kind: OutputKind | None = None
) -> OutputFidelity:
    """Every metric of one output; ``kind`` None decides it from the values alone (no graph)."""
    if ref.shape != test.shape:
        raise TrtbuildError(f"output '{name}' has shape {test.shape} quantized but {ref.shape} in FP32")
    if kind is None:
        kind = output_kinds.decide(None, name, ref)
    cos = metrics.cosine_per_sample(ref, test)
    top1 = kl = None
    top1_interval = None
    tie_fields: dict[str, Any] = {}
    if kind.kind in ("classification", "probability") and ref.ndim in (2, 3) and ref.shape[-1] >= 2:
        # [N, C], or [N, T, C] per-position classes (a CTC text reader: characters per time step). The
        # interval counts samples, not positions: the positions of one input are not independent draws.
        rows = (ref.argmax(axis=-1) == test.argmax(axis=-1)).reshape(ref.shape[0], -1)
        agree = rows.mean(axis=1)
        top1 = float(agree.mean())
        top1_interval = gate_stats.wilson_interval(float(agree.sum()), ref.shape[0])
        ties = kind.ties if kind.ties is not None and kind.ties.samples == ref.shape[0] else None
        if ties is not None:  # decide on the decisive rows; raw agreement reported beside it
            decided = near_ties.decide(rows, ties)
            tie_fields = {
                "raw_top1": top1,
                "raw_top1_interval": top1_interval,
                "decisive_samples": decided.samples,
                "tie_rule": ties.describe(),
                "near_ties": ties.listed(rows),
            }
            top1, top1_interval = decided.agreement, decided.interval
        if kind.kind == "classification":
            kl = metrics.kl_divergence(metrics.softmax(ref), metrics.softmax(test))
        elif kind.log_probabilities:
            kl = metrics.kl_divergence(np.exp(ref.astype(np.float64)), np.exp(test.astype(np.float64)))
        else:
            kl = metrics.kl_divergence(np.clip(ref, 0, 1), np.clip(test, 0, 1))
    iou = metrics.map_iou(ref, test) if kind.kind == "prob_map" else None
    return OutputFidelity(
        name,
        float(cos.mean()),
        float(cos.min()),
        metrics.sqnr_db(ref, test),
        top1,
        kl,
        kind.kind,
        kind.reason,
        metrics.error_over_range(ref, test),
        top1_interval,
        gate_stats.mean_interval(cos),
        iou,
        **tie_fields,
    )


def compare(
    ref: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    threshold: FidelityThreshold | None = None,
    kinds: Mapping[str, OutputKind] | None = None,
    semantics: str = ort_core.REFERENCE,
) -> FidelityReport:
    """Fidelity of ``test`` outputs against ``ref`` outputs (same names, same samples). ``kinds``: each
    output's kind (:func:`decide_kinds`); None decides from the values alone."""
    names = [n for n in ref if n in test]
    if not names:
        raise TrtbuildError(
            "the quantized and FP32 models share no output names", "quantize without renaming outputs"
        )
    threshold = threshold or DEFAULT_THRESHOLD
    first = next(iter(ref.values()))
    samples = int(first.shape[0]) if first.ndim else 1
    outputs = []
    for n in names:
        kind = None if kinds is None else kinds.get(n)
        outputs.append(compare_output(n, ref[n], test[n], kind))
        for part in kind.parts if kind is not None else ():  # boxes and scores of one Concat, each judged
            outputs.append(compare_output(part.name, part.take(ref[n]), part.take(test[n]), part.kind))
    check_outputs(threshold, [o.name for o in outputs], parts_known=True)
    return FidelityReport(samples=samples, outputs=outputs, threshold=threshold, semantics=semantics)


def decide_kinds(
    model: onnx.ModelProto, reference: Mapping[str, np.ndarray], overrides: Mapping[str, str] | None = None
) -> dict[str, OutputKind]:
    """Each output's kind from the graph, the FP32 values and the user's ``--output-kind``."""
    return output_kinds.decide_all(model, reference, overrides)


# --------------------------------------------------------------------------------------------- running


def session(
    model: onnx.ModelProto | str, threads: int | None = None, semantics: str = ort_core.REFERENCE
) -> ort.InferenceSession:
    """A quiet CPU ONNX Runtime session under ``semantics`` (see trtbuild/core/ort.py): ``reference`` for
    FP32 graphs and TensorRT Q/DQ graphs, ``ort-cpu`` for graphs built for ORT's integer kernels."""
    return ort_core.cpu_session(model, semantics, threads)


def float_session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """The FP32 reference session, made before any work: a model ONNX Runtime cannot load (e.g. a dynamo
    export whose output name repeats an inner tensor's) is one error line, not a traceback mid-pipeline."""
    try:
        return session(model, threads)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise TrtbuildError(
            f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}",
            "check the model with `trtbuild export` / onnx.checker",
        ) from exc


def semantics_for_activations(activation_type: str) -> str:
    """int8 activations: a TensorRT graph (reference semantics); uint8: ORT CPU (its real kernels)."""
    return ort_core.ORT_CPU if activation_type == "uint8" else ort_core.REFERENCE


def run_batches(sess: ort.InferenceSession, batches: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """Run every batch; outputs concatenated along their batch axis, moved to axis 0 (one row per input
    sample, whatever the layout: time-major OCR logits [T, N, C] included)."""
    names = [o.name for o in sess.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in batches:
        size = batch_size(feeds)
        for name, value in zip(names, sess.run(names, dict(feeds)), strict=True):
            collected[name].append(samples_first(np.asarray(value), size))
    return {n: np.concatenate(v, axis=0) if v and v[0].ndim else v[0] for n, v in collected.items() if v}


def run_reference(sess: ort.InferenceSession, batches: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """:func:`run_batches` on the FP32 model: a model that fails on the user's data (e.g. an Add whose
    shapes only broadcast at another batch size) is one error line, not ORT's traceback."""
    try:
        return run_batches(sess, batches)
    except (
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.InvalidArgument,
        ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ) as exc:
        raise TrtbuildError(
            f"ONNX Runtime cannot run the FP32 model on the held-out data: {str(exc).splitlines()[0][:300]}",
            "check that the data matches the model's inputs (batch size, shapes), or fix the model",
        ) from exc


def batch_size(feeds: Feeds) -> int | None:
    """The batch size of one feed: the leading dimension its inputs share (None when they do not)."""
    leading = {np.shape(v)[0] for v in feeds.values() if np.ndim(v)}
    return leading.pop() if len(leading) == 1 else None


def samples_first(value: np.ndarray, size: int | None) -> np.ndarray:
    """``value`` with its batch axis first. The batch axis is axis 0 when its length is the batch size,
    else the first axis that has it (sequence-first outputs); an output with no such axis from a batch of
    one is one sample. Only used to count and pair samples: a wrong guess here would split or merge
    samples, never change a value."""
    if size is None or value.ndim == 0 or value.shape[0] == size:
        return value
    axes = [a for a, d in enumerate(value.shape) if d == size]
    if axes:
        return np.moveaxis(value, axes[0], 0)
    return value[None] if size == 1 else value


def measure(
    fp32: onnx.ModelProto | str,
    int8: onnx.ModelProto | str,
    batches: Sequence[Feeds],
    threshold: FidelityThreshold | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    semantics: str | None = None,
    output_kind: Mapping[str, str] | None = None,
    tie_margin: float | None = near_ties.AUTO,
) -> FidelityReport:
    """Run both models on ``batches`` (held-out data) and compare; ``reference`` reuses FP32 outputs.
    ``semantics``: how to run the INT8 graph; None decides from the graph (ort_core.semantics_for).
    ``tie_margin``: top-1 near-ties as quantize's gate finds them (near_ties.attach; 0 = raw top-1)."""
    ref = reference if reference is not None else run_batches(session(fp32), batches)
    fp32_model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(fp32, load_external_data=False)
    if semantics is None:
        int8_model = int8 if isinstance(int8, onnx.ModelProto) else onnx.load(int8, load_external_data=False)
        semantics = ort_core.semantics_for(int8_model)
    test = run_batches(session(int8, semantics=semantics), batches)
    kinds = near_ties.attach(decide_kinds(fp32_model, ref, output_kind), fp32_model, ref, batches, tie_margin)
    return compare(ref, test, threshold, kinds, semantics)
