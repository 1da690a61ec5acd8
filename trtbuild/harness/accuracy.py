"""Accuracy of a candidate against the FP32 model through Polygraphy's Comparator (ONNX Runtime runners on
both sides), plus what the Comparator doesn't report: cosine similarity and top-1 agreement."""

from __future__ import annotations

import contextlib
import io
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core import metrics
from trtbuild.harness.runner import Feed, Runner


@dataclass(frozen=True)
class AccuracyResult:
    """Worst case over outputs and samples (max errors, min cosine), against the reference model."""

    reference: str
    samples: int
    max_abs: float
    max_rel: float  # Polygraphy's elementwise |a-b|/|a|: explodes where the reference is near 0
    err_over_range: float  # max_abs / max |reference|: the relative error that stays meaningful
    mean_abs: float
    cosine: float  # min over samples of cos(reference, candidate), outputs flattened per sample
    top1_agreement: float | None  # for (N, classes) outputs: share of samples with the same argmax
    passed: bool  # Polygraphy's verdict at the tolerances given
    semantics: str = "reference"  # how an ONNX candidate was run (trtbuild/core/ort.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return metrics.cosine_per_sample(a, b)


def _output_parts(reference: Path, first: Any) -> dict[str, tuple[Any, ...]]:
    """Outputs that join box coordinates with scores in one Concat (YOLOv8's ``output0``) and their parts
    (calibrators/output_kinds.py): the min cosine also covers each part, else pixel coordinates hide the
    scores, as in the quantize gate."""
    import onnx

    from calibrators.output_kinds import split_parts

    model = onnx.load(str(reference), load_external_data=False)
    found = {name: split_parts(model, name, np.asarray(value)) for name, value in dict(first).items()}
    return {name: parts for name, parts in found.items() if parts}


def polygraphy_adapter(runner: Runner, output_names: Sequence[str] | None = None) -> Any:
    """Wrap one of our runners (TensorRT engine, PyTorch) as a Polygraphy runner for the Comparator.

    ``output_names`` renames outputs in order (PyTorch outputs have no names; the ONNX reference's are used).
    """
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class Adapter(BaseRunner):  # type: ignore[misc]
        def activate_impl(self) -> None:
            runner.activate()

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for info in runner.input_info():
                meta.add(info.name, dtype=DataType.from_dtype(info.dtype), shape=list(info.shape))
            return meta

        def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, np.ndarray]:
            start = time.time()
            outputs = runner.infer({k: np.asarray(v) for k, v in feed_dict.items()})
            self.inference_time = time.time() - start
            if output_names is not None and len(output_names) == len(outputs):
                outputs = dict(zip(output_names, outputs.values(), strict=True))
            return OrderedDict(outputs)

        def deactivate_impl(self) -> None:
            runner.deactivate()

    return Adapter(name="candidate")


def compare_onnx(
    reference: str | Path,
    candidate: str | Path | Runner,
    feeds: Sequence[Feed],
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> AccuracyResult:
    """Run the ONNX reference (ONNX Runtime CPU) and the candidate on ``feeds`` through Polygraphy's
    Comparator and compare every output. The candidate is an ONNX path (run on ORT CPU too) or one of
    our runners (a TensorRT engine, a PyTorch model), wrapped for Polygraphy."""
    import onnx
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    from trtbuild.core import ort as ort_core

    onnxruntime.set_default_logger_severity(3)  # ORT's graph-cleanup chatter is not the user's problem
    ref_runner = OnnxrtRunner(lambda: ort_core.cpu_session(Path(reference)), name="reference")
    semantics = ort_core.REFERENCE
    if isinstance(candidate, Runner):
        ref_names = [o.name for o in ort_core.cpu_session(Path(reference)).get_outputs()]
        cand_runner = polygraphy_adapter(candidate, ref_names)
    else:
        # A TensorRT Q/DQ graph is judged by its reference semantics, an ORT-CPU graph by ORT's real kernels.
        semantics = ort_core.semantics_for(onnx.load(str(candidate), load_external_data=False))
        cand_runner = OnnxrtRunner(lambda: ort_core.cpu_session(Path(candidate), semantics), name="candidate")
    # Polygraphy logs every comparison to stdout; keep ours (tables, --json) clean.
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), contextlib.redirect_stdout(io.StringIO()):
        run_results = Comparator.run([ref_runner, cand_runner], data_loader=list(feeds))
        verdicts = Comparator.compare_accuracy(
            run_results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)
        )
    max_abs = max_rel = mean_abs_sum = 0.0
    outputs_seen = 0
    for result in verdicts:
        for per_iteration in result.values():
            for by_output in per_iteration:
                for out in by_output.values():
                    max_abs = max(max_abs, float(out.max_absdiff))
                    max_rel = max(max_rel, float(out.max_reldiff))
                    mean_abs_sum += float(out.mean_absdiff)
                    outputs_seen += 1
    ref_peak = 0.0
    cosines: list[float] = []
    agree, total = 0, 0
    ref_iters, cand_iters = run_results["reference"], run_results["candidate"]
    parts = _output_parts(Path(reference), ref_iters[0] if ref_iters else {})
    for ref_out, cand_out in zip(ref_iters, cand_iters, strict=True):
        for name in ref_out:
            a, b = np.asarray(ref_out[name]), np.asarray(cand_out[name])
            ref_peak = max(ref_peak, float(np.abs(a).max(initial=0.0)))
            cosines.extend(_cosines(a, b).tolist())
            for part in parts.get(name, ()):  # scores joined to pixel boxes count on their own
                cosines.extend(_cosines(part.take(a), part.take(b)).tolist())
            if a.ndim == 2 and a.shape[1] > 1:
                agree += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
                total += a.shape[0]
    return AccuracyResult(
        reference=Path(reference).name,
        samples=sum(next(iter(f.values())).shape[0] if f else 0 for f in feeds),
        max_abs=max_abs,
        max_rel=max_rel,
        err_over_range=max_abs / ref_peak if ref_peak > 0 else (0.0 if max_abs == 0 else float("inf")),
        mean_abs=mean_abs_sum / max(1, outputs_seen),
        cosine=float(min(cosines)) if cosines else float("nan"),
        top1_agreement=agree / total if total else None,
        passed=bool(verdicts),
        semantics=semantics,
    )
