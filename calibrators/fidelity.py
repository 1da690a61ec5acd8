"""Fidelity of an INT8 model against its FP32 original on held-out data: the accuracy gate.

Per output: cosine similarity and SQNR (dB); for classifier outputs ([N, classes]) also top-1 agreement and
KL(FP32 || INT8) of the softmax. The gate uses top-1 agreement for classifiers and cosine otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from rich.table import Table

from trtbuild.errors import TrtbuildError

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FidelityThreshold:
    """Minimum top-1 agreement (classifier outputs) and cosine similarity (every other output)."""

    top1: float = 0.99
    cosine: float = 0.99

    def describe(self) -> str:
        return f"top-1 agreement >= {self.top1:.2%}, cosine >= {self.cosine:.4f}"


DEFAULT_THRESHOLD = FidelityThreshold()


def parse_min_fidelity(text: str | float | None) -> FidelityThreshold:
    """'99%', '0.99' (both metrics), or 'top1=0.98,cosine=0.995'."""
    if text is None:
        return DEFAULT_THRESHOLD
    if isinstance(text, (int, float)):
        value = _fraction(str(text))
        return FidelityThreshold(top1=value, cosine=value)
    parts = dict(p.split("=", 1) for p in str(text).split(",") if "=" in p)
    if parts:
        unknown = set(parts) - {"top1", "cosine"}
        if unknown:
            raise TrtbuildError(
                f"--min-fidelity has unknown metric(s) {sorted(unknown)}",
                "use top1=<x>,cosine=<y> or one number",
            )
        return FidelityThreshold(
            top1=_fraction(parts.get("top1", str(DEFAULT_THRESHOLD.top1))),
            cosine=_fraction(parts.get("cosine", str(DEFAULT_THRESHOLD.cosine))),
        )
    value = _fraction(str(text))
    return FidelityThreshold(top1=value, cosine=value)


def _fraction(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", text)
    if not match:
        raise TrtbuildError(f"--min-fidelity '{text}' is not a number", "pass e.g. 99% or 0.99")
    value = float(match.group(1)) / (100.0 if match.group(2) or float(match.group(1)) > 1 else 1.0)
    if not 0.0 <= value <= 1.0:
        raise TrtbuildError(f"--min-fidelity '{text}' is outside 0..100%", "pass e.g. 99% or 0.99")
    return value


@dataclass(frozen=True)
class OutputFidelity:
    """How closely one INT8 output follows FP32 on the held-out samples."""

    name: str
    cosine: float  # mean over samples of the per-sample cosine similarity
    min_cosine: float
    sqnr_db: float  # 10 log10(|fp32|^2 / |fp32 - int8|^2) over all samples
    top1_agreement: float | None = None  # classifier outputs only
    kl: float | None = None  # mean KL(softmax fp32 || softmax int8), classifier outputs only

    def passes(self, threshold: FidelityThreshold) -> bool:
        if self.top1_agreement is not None:
            return self.top1_agreement >= threshold.top1
        return self.cosine >= threshold.cosine

    def score(self) -> float:
        """Continuous error for ranking (lower is better): KL for classifiers, else 1 - cosine."""
        return float(self.kl) if self.kl is not None else 1.0 - self.cosine


@dataclass
class FidelityReport:
    samples: int
    outputs: list[OutputFidelity]
    threshold: FidelityThreshold = field(default_factory=FidelityThreshold)

    @property
    def passed(self) -> bool:
        return all(o.passes(self.threshold) for o in self.outputs)

    def score(self) -> float:
        return sum(o.score() for o in self.outputs)

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            metric = (
                f"top-1 {o.top1_agreement:.2%}" if o.top1_agreement is not None else f"cosine {o.cosine:.4f}"
            )
            parts.append(f"{o.name}: {metric}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "passed": self.passed,
            "threshold": asdict(self.threshold),
            "outputs": [asdict(o) for o in self.outputs],
        }

    def table(self, title: str = "INT8 fidelity vs FP32 (held-out samples)") -> Table:
        table = Table(title=f"{title}: {self.samples} samples, gate {self.threshold.describe()}")
        for col in ("output", "top-1 agree", "KL", "cosine (mean)", "cosine (min)", "SQNR dB", "gate"):
            table.add_column(col, justify="left" if col == "output" else "right")
        for o in self.outputs:
            table.add_row(
                o.name,
                "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}",
                "-" if o.kl is None else f"{o.kl:.4f}",
                f"{o.cosine:.5f}",
                f"{o.min_cosine:.5f}",
                f"{o.sqnr_db:.1f}",
                "[green]pass[/green]" if o.passes(self.threshold) else "[red]FAIL[/red]",
            )
        return table


# --------------------------------------------------------------------------------------------- metrics


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def is_classifier_output(array: np.ndarray) -> bool:
    """[N, classes] with more than one class: logits or probabilities of a classifier."""
    return array.ndim == 2 and array.shape[1] > 1


_HEAD_OPS = {"Gemm", "MatMul", "Softmax", "LogSoftmax"}
_SKIP_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Add"}


def classifier_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs that a classifier head produces (Gemm/MatMul/Softmax, maybe through a bias Add or reshape).
    A 2-D output from anything else (pooling, normalisation: a sentence embedding) is judged by cosine."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = set()
    for out in model.graph.output:
        node = producer.get(out.name)
        for _ in range(4):
            if node is None or node.op_type not in _SKIP_OPS:
                break
            node = producer.get(node.input[0])
        if node is not None and node.op_type in _HEAD_OPS:
            found.add(out.name)
    return found


def compare_output(
    name: str, ref: np.ndarray, test: np.ndarray, classifier: bool | None = None
) -> OutputFidelity:
    if ref.shape != test.shape:
        raise TrtbuildError(f"output '{name}' has shape {test.shape} in INT8 but {ref.shape} in FP32")
    r = ref.reshape(ref.shape[0], -1).astype(np.float64) if ref.ndim else ref.reshape(1, 1).astype(np.float64)
    t = test.reshape(r.shape).astype(np.float64)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(t, axis=1)
    dots = (r * t).sum(axis=1)
    # Two all-zero vectors agree perfectly; one all-zero vector does not.
    cos = np.where(
        norms > 0,
        dots / np.where(norms > 0, norms, 1.0),
        np.where(np.abs(r).sum(1) + np.abs(t).sum(1) == 0, 1.0, 0.0),
    )
    noise = float(((r - t) ** 2).sum())
    signal = float((r**2).sum())
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    top1 = kl = None
    if is_classifier_output(ref) and classifier is not False:
        top1 = float((ref.argmax(1) == test.argmax(1)).mean())
        p, q = _softmax(r), _softmax(t)
        kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
    return OutputFidelity(name, float(cos.mean()), float(cos.min()), sqnr, top1, kl)


def compare(
    ref: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    threshold: FidelityThreshold | None = None,
    classifiers: set[str] | None = None,
) -> FidelityReport:
    """Fidelity of ``test`` outputs against ``ref`` outputs (same names, same samples). ``classifiers``: the
    outputs to judge by top-1 (see :func:`classifier_outputs`); None: every [N, classes] output."""
    names = [n for n in ref if n in test]
    if not names:
        raise TrtbuildError(
            "the INT8 and FP32 models share no output names", "quantize without renaming outputs"
        )
    samples = int(next(iter(ref.values())).shape[0]) if next(iter(ref.values())).ndim else 1
    outputs = [
        compare_output(n, ref[n], test[n], None if classifiers is None else n in classifiers) for n in names
    ]
    return FidelityReport(samples=samples, outputs=outputs, threshold=threshold or DEFAULT_THRESHOLD)


# --------------------------------------------------------------------------------------------- running


def session(
    model: onnx.ModelProto | str, threads: int | None = None, optimize: bool = True
) -> ort.InferenceSession:
    """A quiet CPU ONNX Runtime session. ``optimize=False`` runs Q/DQ as written (exact fake-quant, no fused
    integer kernels): 3x faster to build and run for a graph with signed Q/DQ, used to rank layers."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_batches(sess: ort.InferenceSession, batches: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """Run every batch; outputs concatenated along the batch axis."""
    names = [o.name for o in sess.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in batches:
        for name, value in zip(names, sess.run(names, dict(feeds)), strict=True):
            collected[name].append(np.asarray(value))
    return {n: np.concatenate(v, axis=0) if v and v[0].ndim else v[0] for n, v in collected.items() if v}


def measure(
    fp32: onnx.ModelProto | str,
    int8: onnx.ModelProto | str,
    batches: Sequence[Feeds],
    threshold: FidelityThreshold | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> FidelityReport:
    """Run both models on ``batches`` (held-out data) and compare; ``reference`` reuses FP32 outputs."""
    ref = reference if reference is not None else run_batches(session(fp32), batches)
    fp32_model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(fp32, load_external_data=False)
    return compare(ref, run_batches(session(int8), batches), threshold, classifier_outputs(fp32_model))
