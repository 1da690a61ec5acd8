"""What each model output is, which decides how the fidelity gate judges it.

- ``probability``: a Softmax/LogSoftmax/Sigmoid output, or rows in [0, 1] that sum to 1: top-1 agreement
  and KL on the probabilities themselves.
- ``classification``: [N, C] logits of a Gemm/MatMul head with at least ``MIN_CLASSES`` columns (or named
  like logits/classes): top-1 agreement and KL of the softmax. [N, T, C] logits named like classes (or set
  by ``--output-kind``, or a Gemm/MatMul head widening its features to C >= MIN_CLASSES columns: a
  vocabulary, as CTC readers and LM heads end) and [N, T, C] probabilities are judged per position (a
  text reader's characters).
  The argmax of 4 box offsets or 10 landmark coordinates means nothing, so fewer columns, heads named
  like boxes/landmarks/keypoints, and raw heads beside a Softmax/Sigmoid head on the same features (a
  multi-task net that scores its classes itself: MTCNN's O-Net) are never judged by top-1 unless they are
  probabilities.
- ``embedding``: a pooled or L2-normalised [N, D] vector (ReduceMean/LpNormalization/Div by a norm, or
  rows of unit length): cosine, SQNR, error over range.
- ``prob_map``: a Sigmoid output with spatial axes ([N, C, H, W]: a segmentation or text-detector
  probability map): cosine, and the IoU of the map thresholded at 0.3 (``NAME:iou=0.92`` gates it).
- ``regression``: everything else (boxes, landmarks, depth, raw detector maps): cosine, SQNR, error over
  range.

A Concat output that joins box coordinates with class scores (YOLOv8's ``output0`` [N, 4 + classes,
anchors]) is also judged **per part** (``OutputPart``, ``output0[4:22]``): coordinates in pixels would
otherwise dominate its cosine, and a graph whose scores are all wrong (even all zero) would still pass.

The user has the last word (``--output-kind NAME=KIND``); the gate table shows every decision and why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from calibrators.qdq_rules import BOX_SCORE_RANGE_RATIO, SCORE_OPS
from trtbuild.core.errors import TrtbuildError

if TYPE_CHECKING:
    from calibrators.near_ties import NearTies

KINDS = ("classification", "probability", "regression", "embedding", "prob_map")
MIN_CLASSES = 10

_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Add"})
# A per-element op (Sigmoid) keeps its meaning through a permutation too; Softmax's axis does not.
_ELEMENTWISE_THROUGH = _PASS_THROUGH | {"Transpose"}
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
    # the parts of a Concat output joining boxes with scores, each judged on its own (split_parts)
    parts: tuple[OutputPart, ...] = ()


@dataclass(frozen=True)
class OutputPart:
    """Channels ``start:stop`` of axis ``axis`` of a (sample-first) output, judged as ``kind``."""

    name: str  # "output0[4:22]": what the gate table and --min-fidelity call it
    axis: int
    start: int
    stop: int
    kind: OutputKind

    def take(self, values: np.ndarray) -> np.ndarray:
        return np.take(values, np.arange(self.start, self.stop), axis=self.axis)


def _producer(
    model: onnx.ModelProto, name: str, through: frozenset[str] = _PASS_THROUGH
) -> onnx.NodeProto | None:
    """The node that really computes ``name``, skipping reshapes, casts and bias adds."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(name)
    for _ in range(6):
        if node is None or node.op_type not in through:
            break
        node = producer.get(node.input[0])
    return node


def _producer_op(model: onnx.ModelProto, name: str, through: frozenset[str] = _PASS_THROUGH) -> str | None:
    node = _producer(model, name, through)
    return node.op_type if node is not None else None


def _scored_sibling(model: onnx.ModelProto, name: str) -> str | None:
    """The graph output of a Softmax/Sigmoid head reading the same features as the Gemm/MatMul head of
    ``name`` (MTCNN's O-Net: box offsets, 10 landmark coordinates and a face Softmax on one feature vector).
    A multi-task network that scores its classes itself leaves the raw heads beside it to regression."""
    head = _producer(model, name)
    if head is None or head.op_type not in _HEAD_OPS:
        return None
    outputs = {o.name for o in model.graph.output}
    for output in outputs - {name}:
        scored = _producer(model, output)
        if scored is None or scored.op_type not in _PROBABILITY_OPS or not scored.input:
            continue
        sibling = _producer(model, scored.input[0])
        if sibling is None or sibling is head or sibling.op_type not in _HEAD_OPS or not sibling.input:
            continue
        if sibling.input[0] == head.input[0]:
            return output
    return None


def _widening_head(model: onnx.ModelProto, name: str) -> int | None:
    """The input width K of the Gemm/MatMul head making ``name`` when its constant weight maps K features
    to more than K columns; None otherwise."""
    head = _producer(model, name)
    if head is None or head.op_type not in _HEAD_OPS or len(head.input) < 2:
        return None
    dims = _constant_dims(model, head.input[1])
    if dims is None or len(dims) != 2:
        return None
    trans_b = head.op_type == "Gemm" and any(a.name == "transB" and a.i for a in head.attribute)
    k, c = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
    return k if c > k else None


def _constant_dims(model: onnx.ModelProto, name: str) -> list[int] | None:
    """The shape of constant ``name``: an initializer or a Constant node's value (Paddle2ONNX, tf2onnx)."""
    found = next((t for t in model.graph.initializer if t.name == name), None)
    if found is None:
        node = next((n for n in model.graph.node if n.op_type == "Constant" and name in n.output), None)
        found = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
    return None if found is None else [int(d) for d in found.dims]


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
    sigmoid = model is not None and _producer_op(model, name, _ELEMENTWISE_THROUGH) == "Sigmoid"
    if sigmoid and reference is not None and np.ndim(reference) >= 4:
        return OutputKind("prob_map", "Sigmoid map over spatial axes")
    if sigmoid and reference is not None and np.ndim(reference) == 3:
        # [N, anchors, classes] (PicoDet, YOLO heads): independent scores, not one distribution per row
        return OutputKind("prob_map", "Sigmoid scores per position and class")
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
            sibling = None if model is None else _scored_sibling(model, name)
            if sibling is not None:
                return OutputKind("regression", f"{op} head beside the model's own {sibling} scores")
            return OutputKind("classification", f"{op} head, {columns} classes")
        if op is None and columns >= MIN_CLASSES:  # values without a graph: [N, C] with many columns
            return OutputKind("classification", f"{columns} columns")
        if op in _HEAD_OPS:
            return OutputKind("regression", f"{op} head with {columns} columns: too few for top-1")
    per_position = ref is not None and ref.ndim == 3 and ref.shape[-1] >= 2
    if per_position and op in _HEAD_OPS and _CLASS_NAMES.search(name):
        # A hidden state is also a 3-D MatMul output, so the name (or --output-kind) says "classes", or:
        return OutputKind("classification", f"{op} head named like class logits, per position")
    widening = None if model is None or not per_position else _widening_head(model, name)
    if widening is not None and ref is not None and ref.shape[-1] >= MIN_CLASSES:
        # a projection *up* to C columns is a vocabulary (CTC readers, LM heads), not a hidden state,
        # which stays as wide as the features it came from: ddddocr's reader, 1024 -> 8210 per position
        classes = ref.shape[-1]
        return OutputKind("classification", f"{op} head widening {widening} features to {classes} classes")
    shape = "scalar" if ref is None or ref.ndim == 0 else "x".join(str(d) for d in ref.shape[1:])
    return OutputKind("regression", f"{op or 'graph'} output ({shape} per sample)")


def decide_all(
    model: onnx.ModelProto,
    reference: Mapping[str, np.ndarray],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, OutputKind]:
    overrides = dict(overrides or {})
    check_overrides(overrides, list(reference))
    kinds = {n: decide(model, n, reference[n], overrides.get(n)) for n in reference}
    shapes = _Shapes(model)  # shape inference runs once, and only if a Concat output needs it
    return {n: replace(k, parts=split_parts(model, n, reference[n], shapes)) for n, k in kinds.items()}


def split_parts(
    model: onnx.ModelProto, name: str, reference: np.ndarray, shapes: _Shapes | None = None
) -> tuple[OutputPart, ...]:
    """The inputs of the Concat whose inputs become spans of output ``name`` (directly, or through
    Transpose/Reshape and Concats along other axes: :func:`_traced_concats`), as parts, when it joins
    scores with other values or values whose ranges differ by more than BOX_SCORE_RANGE_RATIO (the rule
    that keeps such a Concat float in Q/DQ placement); () for any other output."""
    for node, axis, spans in _traced_concats(model, name, reference.ndim, shapes or _Shapes(model)):
        if spans[-1][1] != reference.shape[axis]:
            continue
        ops = [_producer_op(model, t) for t in node.input]
        scores = [op in SCORE_OPS for op in ops]
        amax = [float(np.abs(np.take(reference, range(a, b), axis=axis)).max(initial=0)) for a, b in spans]
        spread = max(amax) / max(min(amax), 1e-12)
        if not (any(scores) and not all(scores)) and spread <= BOX_SCORE_RANGE_RATIO:
            continue
        return tuple(
            OutputPart(f"{name}[{a}:{b}]", axis, a, b, _part_kind(name, op, score))
            for (a, b), op, score in zip(spans, ops, scores, strict=True)
        )
    return ()


def possible_part_names(model: onnx.ModelProto, name: str) -> tuple[str, ...] | None:
    """The part names :func:`split_parts` can give output ``name``, from the graph alone (before any data
    runs, so a misspelt bound fails first): () when it can have none, None when the graph does not say
    (its rank or the Concat's sizes are not static)."""
    declared = {o.name: o for o in model.graph.output}.get(name)
    producer = next((n for n in model.graph.node if name in n.output), None)
    if producer is None or producer.op_type not in ("Concat", *_AXIS_MAPS):
        return ()
    if declared is None or not declared.type.tensor_type.HasField("shape"):
        return None
    found = _traced_concats(model, name, len(declared.type.tensor_type.shape.dim), _Shapes(model))
    return tuple(f"{name}[{a}:{b}]" for _, _, spans in found for a, b in spans) or None


def possible_parts(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
    """:func:`possible_part_names` of each output a part name in ``names`` (``output0[4:22]``) refers to."""
    bases = {n.partition("[")[0] for n in names if "[" in n}
    return {b: possible_part_names(model, b) for b in sorted(bases)}


# Ops whose output axes map to input axes, followed when looking for the Concat behind an output
_AXIS_MAPS = ("Transpose", "Reshape", "Identity", "Cast")


def _traced_concats(
    model: onnx.ModelProto, name: str, ndim: int, shapes: _Shapes
) -> list[tuple[onnx.NodeProto, int, list[tuple[int, int]]]]:
    """For each per-sample axis of output ``name`` (not the batch), the Concat whose inputs lie side by
    side on it, with static sizes: found directly, or through Transpose, Reshape (where it keeps the axis)
    and Concats along other axes. YOLOX writes [N, anchors, 4 + 1 + C] as Concat(boxes, objectness,
    classes) per scale on the channel axis, Reshape, Concat of the scales, Transpose. Each as (that Concat,
    the output axis, each input's [start, end) on it)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for axis in range(1, ndim) if ndim >= 2 else ():
        traced = _trace_axis(producer, shapes, name, axis, ndim)
        if traced is not None:
            found.append((traced[0], axis, traced[1]))
    return found


def _trace_axis(
    producer: Mapping[str, onnx.NodeProto], shapes: _Shapes, tensor: str, axis: int, rank: int
) -> tuple[onnx.NodeProto, list[tuple[int, int]]] | None:
    for _ in range(12):
        node = producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "Concat" and len(node.input) >= 2:
            joined = next((a.i for a in node.attribute if a.name == "axis"), 0) % rank
            sizes = shapes.sizes(node.input, axis)
            if sizes is None:
                return None
            if joined == axis:
                ends = np.cumsum(sizes)
                return node, [(int(e - n), int(e)) for e, n in zip(ends, sizes, strict=True)]
            if len(set(sizes)) != 1:  # joined along another axis: every input must have the same layout
                return None
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is None or len(perm) != rank:
                return None
            axis = perm[axis]
        elif node.op_type == "Reshape":
            mapped = _reshaped_axis(shapes.shape(node.input[0]), shapes.shape(tensor), axis)
            if mapped is None:
                return None
            axis, rank = mapped
        elif node.op_type not in ("Identity", "Cast"):
            return None
        tensor = node.input[0]
    return None


def _reshaped_axis(before: list[int] | None, after: list[int] | None, axis: int) -> tuple[int, int] | None:
    """The axis of ``before`` that Reshape keeps as ``after[axis]`` (same size, same product of the axes
    in front), and ``before``'s rank; None when the reshape splits or merges it (or shapes are unknown)."""
    if before is None or after is None or axis >= len(after):
        return None
    front = int(np.prod(after[:axis], dtype=np.int64))
    for k, size in enumerate(before):
        if size == after[axis] and int(np.prod(before[:k], dtype=np.int64)) == front:
            return k, len(before)
    return None


def _part_kind(output: str, op: str | None, score: bool) -> OutputKind:
    """Scores (independent per class and anchor) are judged like a probability map: cosine and IoU at the
    map threshold; the rest (box coordinates) as regression."""
    if score:
        return OutputKind("prob_map", f"{op} scores joined into {output} by Concat")
    return OutputKind("regression", f"{op or 'graph'} values joined into {output} by Concat")


class _Shapes:
    """Static tensor shapes of a graph: declared value_info first, shape inference (once) for the rest."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.known = {v.name: v for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
        self.inferred = False

    def shape(self, tensor: str) -> list[int] | None:
        """``tensor``'s static shape, None when it or one of its axes is unknown."""
        value = self.known.get(tensor) if self._infer([tensor]) else None
        if value is None or not value.type.tensor_type.HasField("shape"):
            return None
        dims = value.type.tensor_type.shape.dim
        return [int(d.dim_value) for d in dims] if all(d.HasField("dim_value") for d in dims) else None

    def _infer(self, tensors: Sequence[str]) -> bool:
        """Run shape inference once when a tensor is not declared; False when it cannot run."""
        if not self.inferred and not all(t in self.known for t in tensors):
            self.inferred = True
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # noqa: BLE001 - a model shape inference cannot take is simply not split
                return False
            self.known.update({v.name: v for v in inferred.graph.value_info})
        return True

    def sizes(self, tensors: Sequence[str], axis: int) -> list[int] | None:
        """Each tensor's static size on ``axis``, None when one is unknown."""
        if not self._infer(tensors):
            return None
        sizes = []
        for t in tensors:
            dims = self.known[t].type.tensor_type.shape.dim if t in self.known else []
            if len(dims) <= axis or not dims[axis].HasField("dim_value"):
                return None
            sizes.append(int(dims[axis].dim_value))
        return sizes


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
