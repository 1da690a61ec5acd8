"""Graph preparation every later stage relies on, for exported and third-party ONNX alike.

checker -> opset upgrade to >= 13 (onnx.version_converter) -> Constant-node weights into initializers
-> constant folding / simplification (onnxslim) -> shape inference -> stable node names -> checker.
Models over 2 GB are read and written with external data (one `<model>.onnx.data` file beside it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.onnx_file import constants_to_initializers, dedupe_value_info

MIN_OPSET = 13
UPGRADE_OPSET = 17  # what an older third-party graph is upgraded to unless asked otherwise
PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised in one piece
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3


@dataclass
class PrepareReport:
    """What preparation changed, for the summary table and the sidecar."""

    opset_before: int
    opset_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    constants_to_initializers: int = 0
    initializers: int = 0
    external_data: bool = False
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file (with its external data); an unreadable file is a one-line TrtbuildError."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"ONNX file '{path}' does not exist", "check the path")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise TrtbuildError(
            f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {_short(exc)})",
            "pass a valid .onnx file (and its .data file if it has external data)",
        ) from exc


def check_onnx(model: onnx.ModelProto, label: str = "the model") -> None:
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
    except Exception as exc:
        raise TrtbuildError(
            f"{label} is not a valid ONNX graph ({_short(exc)})",
            "re-export it, or fix the graph the checker names",
        ) from exc


def prepare_model(
    model: onnx.ModelProto, *, opset: int | None = None, simplify: bool = True, label: str = "the model"
) -> tuple[onnx.ModelProto, PrepareReport]:
    """Return the prepared graph and what changed. ``opset``: convert to exactly this opset; by default a
    graph older than opset 13 is upgraded to 17 and a newer one is left as it is."""
    report = PrepareReport(opset_before=default_opset(model), nodes_before=len(model.graph.node))
    check_onnx(model, label)
    target = (
        opset
        if opset is not None
        else (report.opset_before if report.opset_before >= MIN_OPSET else UPGRADE_OPSET)
    )
    if target < MIN_OPSET:
        raise TrtbuildError(
            f"opset {target} is too old for TensorRT and the later stages",
            f"use --opset {MIN_OPSET} or newer",
        )
    if target != report.opset_before:
        model = _convert_opset(model, target, label)
        report.steps.append(f"opset {report.opset_before} -> {target}")
    report.constants_to_initializers = constants_to_initializers(model.graph)
    if report.constants_to_initializers:
        report.steps.append(f"{report.constants_to_initializers} Constant nodes -> initializers")
    wrong = drop_wrong_output_shapes(model)
    if wrong:
        report.steps.append(f"dropped wrong declared shapes of output(s) {', '.join(wrong)}")
    if simplify:
        model = _slim(model, label)
        report.steps.append("onnxslim constant folding / simplification")
        after_slim = constants_to_initializers(model.graph)  # folding can leave new Constant nodes
        if after_slim:
            report.constants_to_initializers += after_slim
            report.steps.append(f"{after_slim} more Constant nodes -> initializers")
    model = _infer_shapes(model)
    report.steps.append("shape inference")
    if dedupe_value_info(model.graph):
        report.steps.append("dropped repeated value_info entries")
    renamed = name_nodes(model.graph)
    if renamed:
        report.steps.append(f"named {renamed} nodes")
    check_onnx(model, f"{label} after preparation")
    report.opset_after = default_opset(model)
    report.nodes_after = len(model.graph.node)
    report.initializers = len(model.graph.initializer)
    return model, report


def _convert_opset(model: onnx.ModelProto, target: int, label: str) -> onnx.ModelProto:
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:
        raise TrtbuildError(
            f"cannot convert {label} from opset {default_opset(model)} to {target} ({_short(exc)})",
            "choose another --opset, or re-export the model at that opset",
        ) from exc
    # The converter keeps an IR version from the source; raise it to what the new opset needs.
    converted.ir_version = max(
        converted.ir_version,
        onnx.helper.find_min_ir_version_for([o for o in converted.opset_import], ignore_unknown=True),
    )
    return converted


def drop_wrong_output_shapes(model: onnx.ModelProto) -> list[str]:
    """Clear declared graph-output shapes that contradict shape inference (a rank or a fixed dim differs).

    Some third-party files declare a stale output shape (ddddocr's OCR model says [1, seqlen] and returns
    [seqlen, 1, classes]); onnxslim trusts the declaration and rewrites the final Reshape to fit it, which
    changes the result. Inference from the graph itself is the truth."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for output in probe.graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:
        return []
    wrong = []
    for declared, found in zip(model.graph.output, inferred.graph.output, strict=False):
        have, got = declared.type.tensor_type, found.type.tensor_type
        if not have.HasField("shape") or not got.HasField("shape"):
            continue
        a, b = have.shape.dim, got.shape.dim
        clash = len(a) != len(b) or any(
            x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
            for x, y in zip(a, b, strict=False)
        )
        if clash:
            have.ClearField("shape")
            wrong.append(declared.name)
    return wrong


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give every node a unique, deterministic name (`<OpType>_<index>` when unnamed or duplicated), so
    reports, Q/DQ placement and TensorRT layer names line up run after run."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            renamed += 1
        seen.add(node.name)
    return renamed


def _slim(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    import onnxslim

    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - closed with the process
            slimmed = onnxslim.slim(model)
    except Exception as exc:
        raise TrtbuildError(
            f"onnxslim could not simplify {label} ({_short(exc)})",
            "pass --no-simplify to skip simplification",
        ) from exc
    if slimmed is None:
        raise TrtbuildError(f"onnxslim returned no model for {label}", "pass --no-simplify")
    return slimmed


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ByteSize() >= PROTOBUF_LIMIT:
        with tempfile.TemporaryDirectory(prefix="trtbuild-shapes-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            onnx.shape_inference.infer_shapes_path(str(path))
            return onnx.load(str(path))
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return onnx.shape_inference.infer_shapes(model)


def data_file(onnx_path: str | os.PathLike[str]) -> Path:
    """Where a model's external data lives: `<model>.onnx.data` beside it."""
    path = Path(onnx_path)
    return path.with_name(path.name + ".data")


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> bool:
    """Write ``model`` to ``path`` (not atomic: use staged_onnx). Models larger than ``external_threshold``
    bytes keep their weights in `<model>.onnx.data`. Returns whether external data was written. Saving with
    external data moves the weights out of ``model``'s in-memory tensors."""
    path = Path(path)
    if model.ByteSize() > external_threshold:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file(path).name,
            size_threshold=1024,
        )
        if model.ByteSize() >= PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
    else:
        onnx.save_model(model, str(path))
    return data_file(path).exists()  # tensors under 1 KiB stay inline, so a tiny model may write none


@contextlib.contextmanager
def staged_onnx(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a path with ``target``'s file name in a temp folder beside it. If the block succeeds, the model,
    its external data and any sidecar written next to it move into place; otherwise nothing is left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged = stage / target.name
        yield staged
        if data_file(staged).exists():
            os.replace(data_file(staged), data_file(target))
        elif data_file(target).exists():
            data_file(target).unlink()  # stale weights from an earlier, larger export
        os.replace(staged, target)
        for extra in stage.iterdir():  # sidecars
            os.replace(extra, target.parent / extra.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]
