"""PyTorch -> ONNX with the exporter torch recommends (`dynamo=True`), falling back to TorchScript.

The dynamo exporter writes opset 18 natively; a lower requested opset is reached with
onnx.version_converter after torch's own graph optimisation. When either export or that conversion
fails, the legacy TorchScript exporter runs instead and a warning names the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec
from trtbuild.core.onnx_file import convert_opset, opset_of

log = logging.getLogger(__name__)

DYNAMO_NATIVE_OPSET = 18
BATCH_DIM = "batch"


@dataclass(frozen=True)
class TorchExport:
    """What the exporter produced and how."""

    model: onnx.ModelProto
    exporter: str  # "dynamo" or "torchscript"
    seconds: float
    fallback_reason: str | None


def default_output_names(count: int) -> list[str]:
    """`output`, `output_1`, `output_2`, ... (one per flattened model output)."""
    return ["output"] + [f"output_{i}" for i in range(1, count)]


def dim_names(specs: Sequence[InputSpec]) -> dict[tuple[str, int], str]:
    """Symbolic name for each dynamic (input, axis): axis 0 is the shared `batch`, others are per input."""
    names = {}
    for spec in specs:
        for axis in spec.dynamic_axes:
            names[(spec.name, axis)] = BATCH_DIM if axis == 0 else f"{_ident(spec.name)}_dim{axis}"
    return names


def export_torch(
    model: Any,
    specs: Sequence[InputSpec],
    example: Sequence[np.ndarray],
    output_names: Sequence[str],
    opset: int = 17,
) -> TorchExport:
    """Export ``model`` traced on ``example`` (one array per spec, in order). Raises TrtbuildError if no
    exporter can handle the model."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    start = time.perf_counter()
    try:
        proto = _export_dynamo(model, specs, args, output_names, opset)
        return TorchExport(proto, "dynamo", time.perf_counter() - start, None)
    except Exception as exc:
        reason = _summary(exc)
    log.warning(f"the dynamo exporter failed ({reason}); falling back to the TorchScript exporter")
    start = time.perf_counter()
    try:
        proto = _export_torchscript(model, specs, args, output_names, opset)
    except Exception as exc:
        raise TrtbuildError(
            f"the model could not be exported to ONNX: dynamo: {reason}; TorchScript: {_summary(exc)}",
            "make forward() traceable (no data-dependent Python control flow) or check the --input shapes "
            "and dtypes; --debug shows the traceback",
        ) from exc
    return TorchExport(proto, "torchscript", time.perf_counter() - start, reason)


def _export_dynamo(
    model: Any, specs: Sequence[InputSpec], args: tuple[Any, ...], output_names: Sequence[str], opset: int
) -> onnx.ModelProto:
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise RuntimeError("TorchScript modules cannot be traced by torch.export")
    dims: dict[str, Any] = {}
    dynamic_shapes = []
    for spec in specs:
        axes = {}
        for axis in spec.dynamic_axes:
            name = dim_names([spec])[(spec.name, axis)]
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=spec.min[axis], max=spec.max[axis])
            axes[axis] = dims[name]
        dynamic_shapes.append(axes)
    with _quiet():
        program = torch.onnx.export(
            model,
            args,
            input_names=[s.name for s in specs],
            output_names=list(output_names),
            dynamic_shapes=tuple(dynamic_shapes) if dims else None,
            opset_version=max(opset, DYNAMO_NATIVE_OPSET),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    if opset_of(proto) != opset:
        proto = _convert_down(proto, opset)
    _check_names(proto, specs, output_names)
    return proto


def _convert_down(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter from the exporter's opset 18 to ``opset``, checked by onnx.checker."""
    source = opset_of(proto)
    try:
        converted = convert_opset(proto, opset)
        if opset < 18:
            _drop_reduce_noop_attr(converted.graph)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise RuntimeError(
            f"it writes opset {source} and onnx cannot convert that to opset {opset}: {_summary(exc)}"
        ) from exc
    return converted


_REDUCE_OPS_WITH_AXES_INPUT_SINCE_18 = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}


def _drop_reduce_noop_attr(graph: onnx.GraphProto) -> None:
    """onnx's 18->17 adapter moves Reduce* axes back into an attribute but keeps `noop_with_empty_axes`,
    which those ops only gained in 18. The attribute is meaningless once the axes are non-empty, or when it
    is 0 (the default), so drop it then; any other case stays and fails the checker."""
    for node in graph.node:
        if node.op_type not in _REDUCE_OPS_WITH_AXES_INPUT_SINCE_18 or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        noop = attrs.get("noop_with_empty_axes")
        if noop is None:
            continue
        axes = attrs.get("axes")
        if noop.i == 0 or (axes is not None and len(axes.ints) > 0):
            node.attribute.remove(noop)


def _export_torchscript(
    model: Any, specs: Sequence[InputSpec], args: tuple[Any, ...], output_names: Sequence[str], opset: int
) -> onnx.ModelProto:
    import torch

    names = dim_names(specs)
    dynamic_axes = {s.name: {a: names[(s.name, a)] for a in s.dynamic_axes} for s in specs if s.dynamic_axes}
    with tempfile.TemporaryDirectory(prefix="trtbuild-export-") as tmp, _quiet(), _native_output_silenced():
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=[s.name for s in specs],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or None,
            opset_version=opset,
            dynamo=False,
        )
        proto = onnx.load(str(path))  # pulls in external data written for >2 GB models
    _check_names(proto, specs, output_names)
    return proto


def _check_names(proto: onnx.ModelProto, specs: Sequence[InputSpec], output_names: Sequence[str]) -> None:
    init = {i.name for i in proto.graph.initializer}
    got_in = [i.name for i in proto.graph.input if i.name not in init]
    got_out = [o.name for o in proto.graph.output]
    if got_in != [s.name for s in specs]:
        raise RuntimeError(
            f"exported inputs {got_in} differ from the declared {[s.name for s in specs]} "
            "(an input the model does not use is dropped)"
        )
    if got_out != list(output_names):
        raise RuntimeError(f"exported outputs {got_out} differ from the requested {list(output_names)}")


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress on stdout and warn a lot; keep stdout clean for --json."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _native_output_silenced() -> Any:
    """The TorchScript exporter's C++ logger always dumps the whole TorchScript graph on failure (torch
    tests a function object for truth, so logging is never off); keep stdout (--json) and the one-line
    error clean by pointing file descriptors 1 and 2 at /dev/null meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as devnull:
            for fd in saved:
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _summary(exc: BaseException) -> str:
    """The most telling line of an exporter error (torch wraps the cause in long advice text)."""
    causes: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and len(causes) < 8:
        causes.append(node)
        node = node.__cause__ or node.__context__
    root = causes[-1]
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    text = next((ln for ln in lines if not ln.startswith(("-", "#", "The above"))), type(root).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return f"{type(root).__name__}: {text[:240]}"


def _ident(text: str) -> str:
    return re.sub(r"\W", "_", text)
