"""What each model output is, which decides how the fidelity gate judges it.

- ``probability``: a Softmax/LogSoftmax/Sigmoid output, or rows in [0, 1] that sum to 1: top-1 agreement
  and KL on the probabilities themselves.
- ``classification``: [N, C] logits of a Gemm/MatMul head with at least ``MIN_CLASSES`` columns (or named
  like logits/classes): top-1 agreement and KL of the softmax. [N, T, C] logits named like classes (or set
  by ``--output-kind``) and [N, T, C] probabilities are judged per position (a text reader's characters).
  The argmax of 4 box offsets or 10 landmark coordinates means nothing, so fewer columns, and heads named
  like boxes/landmarks/keypoints, are never judged by top-1 unless they are probabilities.
- ``embedding``: a pooled or L2-normalised [N, D] vector (ReduceMean/LpNormalization/Div by a norm, or
  rows of unit length): cosine, SQNR, error over range.
- ``prob_map``: a Sigmoid output with spatial axes ([N, C, H, W]: a segmentation or text-detector
  probability map): cosine, and the IoU of the map thresholded at 0.3 (``NAME:iou=0.92`` gates it).
- ``regression``: everything else (boxes, landmarks, depth, raw detector maps): cosine, SQNR, error over
  range.

The user has the last word (``--output-kind NAME=KIND``); the gate table shows every decision and why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from trtbuild.core.errors import TrtbuildError

if TYPE_CHECKING:
    from calibrators.near_ties import NearTies

KINDS = ("classification", "probability", "regression", "embedding", "prob_map")
MIN_CLASSES = 10

_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Add"}
_PROBABILITY_OPS = {"Softmax", "LogSoftmax", "Sigmoid"}
_HEAD_OPS = {"Gemm", "MatMul"}
_EMBEDDING_OPS = {"ReduceMean", "LpNormalization", "GlobalAveragePool", "ReduceL2"}
# Output names say what a head is where shapes cannot (10 landmark coordinates vs 10 classes).
_REGRESSION_NAMES = re.compile(
    r"(box|bbox|landmark|keypoint|kpt|coord|offset|regress|reg$|pose|depth|disp|loc$|delta|point)", re.I
)
_CLASS_NAMES = re.compile(r"(logit|class|cls|label|categor)", re.I)


@dataclass(frozen=True)
class OutputKind:
    kind: str
    reason: str
    log_probabilities: bool = False  # LogSoftmax output: exponentiate before top-1/KL
    # held-out rows whose FP32 top-1 is within float noise: top-1 is decided without them (near_ties.py)
    ties: NearTies | None = None


def _producer_op(model: onnx.ModelProto, name: str) -> str | None:
    """The op type of the node that really computes ``name``, skipping reshapes, casts and bias adds."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(name)
    for _ in range(6):
        if node is None or node.op_type not in _PASS_THROUGH:
            break
        node = producer.get(node.input[0])
    return node.op_type if node is not None else None


def _is_division_by_norm(model: onnx.ModelProto, name: str) -> bool:
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(name)
    if node is None or node.op_type != "Div" or len(node.input) < 2:
        return False
    divisor = producer.get(node.input[1])
    for _ in range(4):  # Div(x, Clip/Max(Expand(ReduceL2/Sqrt(...))))
        if divisor is None:
            return False
        if divisor.op_type in ("ReduceL2", "Sqrt", "LpNormalization"):
            return True
        divisor = producer.get(divisor.input[0]) if divisor.input else None
    return False


def decide(
    model: onnx.ModelProto | None, name: str, reference: np.ndarray | None, override: str | None = None
) -> OutputKind:
    """The kind of output ``name``, from the user, the graph (None: values alone) and the FP32 values."""
    if override is not None:
        return OutputKind(override, "set by --output-kind")
    op = None if model is None else _producer_op(model, name)
    if op == "Sigmoid" and reference is not None and np.ndim(reference) >= 4:
        return OutputKind("prob_map", "Sigmoid map over spatial axes")
    if op in _PROBABILITY_OPS:
        return OutputKind("probability", f"{op} output", log_probabilities=op == "LogSoftmax")
    ref = None if reference is None else np.asarray(reference, np.float64)
    two_d = ref is not None and ref.ndim == 2 and ref.shape[1] >= 2
    in_unit_interval = two_d and ref is not None and ref.min() >= 0 and ref.max() <= 1
    if in_unit_interval and ref is not None and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3):
        return OutputKind("probability", "rows in [0, 1] summing to 1")
    if (model is not None and _is_division_by_norm(model, name)) or op in _EMBEDDING_OPS:
        return OutputKind("embedding", f"{'L2-normalised' if op == 'Div' else op} vector")
    if two_d and ref is not None:
        columns = ref.shape[1]
        norms = np.linalg.norm(ref, axis=1)
        if np.allclose(norms, 1.0, atol=1e-3):
            return OutputKind("embedding", "rows of unit length")
        if _REGRESSION_NAMES.search(name):
            return OutputKind("regression", f"{op or 'graph'} output named like a regression head")
        if op in _HEAD_OPS and _CLASS_NAMES.search(name):
            return OutputKind("classification", f"{op} head named like class logits, {columns} classes")
        if op in _HEAD_OPS and columns >= MIN_CLASSES:
            return OutputKind("classification", f"{op} head, {columns} classes")
        if op is None and columns >= MIN_CLASSES:  # values without a graph: [N, C] with many columns
            return OutputKind("classification", f"{columns} columns")
        if op in _HEAD_OPS:
            return OutputKind("regression", f"{op} head with {columns} columns: too few for top-1")
    per_position = ref is not None and ref.ndim == 3 and ref.shape[-1] >= 2
    if per_position and op in _HEAD_OPS and _CLASS_NAMES.search(name):
        # A hidden state is also a 3-D MatMul output, so only the name (or --output-kind) says "classes".
        return OutputKind("classification", f"{op} head named like class logits, per position")
    shape = "scalar" if ref is None or ref.ndim == 0 else "x".join(str(d) for d in ref.shape[1:])
    return OutputKind("regression", f"{op or 'graph'} output ({shape} per sample)")


def decide_all(
    model: onnx.ModelProto,
    reference: Mapping[str, np.ndarray],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, OutputKind]:
    overrides = dict(overrides or {})
    check_overrides(overrides, list(reference))
    return {n: decide(model, n, reference[n], overrides.get(n)) for n in reference}


def parse_output_kinds(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``NAME=KIND`` items (the last ``=`` separates: output names may contain ``=``) into a mapping."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        pairs = dict(items)
    else:
        pairs = {}
        for item in items:
            name, eq, kind = item.rpartition("=")
            if not eq or not name:
                raise TrtbuildError(
                    f"--output-kind '{item}' is not NAME=KIND",
                    f"e.g. box=regression; kinds: {', '.join(KINDS)}",
                )
            pairs[name] = kind.strip()
    for name, kind in pairs.items():
        if kind not in KINDS:
            raise TrtbuildError(
                f"--output-kind {name}={kind}: unknown kind", f"use one of {', '.join(KINDS)}"
            )
    return pairs


def check_overrides(overrides: Mapping[str, str], outputs: Sequence[str]) -> None:
    unknown = [n for n in overrides if n not in outputs]
    if unknown:
        raise TrtbuildError(
            f"--output-kind names output(s) {', '.join(repr(n) for n in unknown)} the model does not have",
            f"the outputs are {', '.join(repr(n) for n in outputs)}",
        )
