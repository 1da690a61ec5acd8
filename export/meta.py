"""The `<model>.export.json` sidecar: how an ONNX file was made, and the input shapes later stages reuse.

Plan, profile and bundle read it with :func:`load_export_meta` / :func:`model_input_specs`; a third-party
ONNX without a sidecar still gets input specs, read from the graph.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from trtbuild import __version__
from trtbuild.core.atomic import write_text
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.hashing import sha256_file as file_sha256
from trtbuild.core.inputs import InputSpec
from trtbuild.core.onnx_file import fixed_size

SIDECAR_SUFFIX = ".export.json"
FORMAT_VERSION = 1
DEFAULT_MAX_BATCH = 32

Dim = int | str


@dataclass(frozen=True)
class OutputInfo:
    name: str
    shape: tuple[Dim, ...]  # ints, or symbolic names such as "batch"
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ExportMeta:
    source: str
    inputs: list[InputSpec]
    outputs: list[OutputInfo]
    opset: int
    sha256: str
    exporter: str  # "dynamo", "torchscript" or "prepare" (third-party ONNX)
    verification: dict[str, Any] | None = None
    preparation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "trtbuild": __version__,
            "created": self.created,
            "source": self.source,
            "exporter": self.exporter,
            "opset": self.opset,
            "sha256": self.sha256,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "preparation": self.preparation,
            "verification": self.verification,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportMeta:
        known = {
            "format",
            "trtbuild",
            "created",
            "source",
            "exporter",
            "opset",
            "sha256",
            "inputs",
            "outputs",
            "preparation",
            "verification",
        }
        return cls(
            source=str(data["source"]),
            inputs=[InputSpec.from_json(s) for s in data["inputs"]],
            outputs=[OutputInfo(str(o["name"]), tuple(o["shape"]), str(o["dtype"])) for o in data["outputs"]],
            opset=int(data["opset"]),
            sha256=str(data["sha256"]),
            exporter=str(data.get("exporter", "")),
            verification=data.get("verification"),
            preparation=data.get("preparation"),
            extra={k: v for k, v in data.items() if k not in known},
            created=str(data.get("created", "")),
        )


def meta_path(onnx_path: str | os.PathLike[str]) -> Path:
    """`engines/m/m.onnx` -> `engines/m/m.export.json`."""
    path = Path(onnx_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def write_export_meta(meta: ExportMeta, onnx_path: str | os.PathLike[str]) -> Path:
    return write_text(meta_path(onnx_path), json.dumps(meta.to_json(), indent=2) + "\n")


def load_export_meta(onnx_path: str | os.PathLike[str], *, check_hash: bool = True) -> ExportMeta:
    """Read the sidecar of ``onnx_path``. Raises TrtbuildError when it is missing, unreadable, or (with
    ``check_hash``) describes a different file than the ONNX now on disk."""
    path = meta_path(onnx_path)
    if not path.is_file():
        raise TrtbuildError(
            f"'{onnx_path}' has no export sidecar ({path.name})",
            "export it with `trtbuild export` or run `trtbuild prepare` on it",
        )
    try:
        meta = ExportMeta.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise TrtbuildError(
            f"sidecar '{path}' is unreadable ({type(exc).__name__}: {exc})",
            "re-run `trtbuild export` or `trtbuild prepare` to rewrite it",
        ) from exc
    if check_hash and Path(onnx_path).is_file() and file_sha256(onnx_path) != meta.sha256:
        raise TrtbuildError(
            f"'{onnx_path}' changed after its sidecar {path.name} was written",
            "re-run `trtbuild export` or `trtbuild prepare` on it",
        )
    return meta


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old IR versions list weights as inputs too)."""
    init = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def graph_outputs(model: onnx.ModelProto) -> list[OutputInfo]:
    return [OutputInfo(o.name, _dims(o), value_dtype(o)) for o in model.graph.output]


def specs_from_graph(
    model: onnx.ModelProto, *, max_batch: int = DEFAULT_MAX_BATCH, dim_values: Mapping[str, int] | None = None
) -> list[InputSpec]:
    """Input specs read from the graph. A symbolic dim named in ``dim_values`` takes that value; another
    symbolic axis 0 is taken as the batch (1..``max_batch``, opt 1); any other symbolic axis has no range to
    guess, so it is an error naming the fix."""
    dim_values = dim_values or {}
    specs = []
    for value in graph_inputs(model):
        dims = _dims(value)
        opt: list[int] = []
        hi: list[int] = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, str) and dim in dim_values:
                dim = int(dim_values[dim])
            if isinstance(dim, int):
                opt.append(dim)
                hi.append(dim)
            elif axis == 0:
                opt.append(1)
                hi.append(max_batch)
            else:
                raise TrtbuildError(
                    f"input '{value.name}' has dynamic axis {axis} ('{dim}') with no known range",
                    _range_fix(value.name, dim),
                )
        lo = [
            1 if isinstance(d, str) and axis == 0 and d not in dim_values else o
            for axis, (d, o) in enumerate(zip(dims, opt, strict=False))
        ]
        specs.append(InputSpec(value.name, tuple(opt), value_dtype(value), tuple(lo), tuple(hi)))
    return specs


def fixed_inputs_not_given(
    inputs: Sequence[onnx.ValueInfoProto], specs: Sequence[InputSpec]
) -> list[InputSpec]:
    """The fully fixed graph ``inputs`` that ``specs`` leave out, at their declared shape: a scalar such as
    Silero VAD's int64 `sr` cannot be written as a --shape at all, and a fixed shape needs no choice."""
    given = {s.name for s in specs}
    extra = []
    for value in inputs:
        dims = [fixed_size(d) for d in value.type.tensor_type.shape.dim]
        if value.name in given or not value.type.tensor_type.HasField("shape") or None in dims:
            continue
        extra.append(InputSpec(value.name, tuple(d for d in dims if d is not None), value_dtype(value)))
    return extra


def _range_fix(name: str, dim: str) -> str:
    """How to give an open axis its range; `prepare --dim` only reaches named axes (Silero VAD's are
    unnamed, '?', and `--dim ?=576` matched nothing)."""
    shape = (
        f"give its range with --shape {name}:MIN,OPT,MAX (plan, export-jetson/-triton/-deepstream, bundle)"
    )
    if dim == "?":
        return f"{shape}, or export with --min/--max-shape"
    return f"{shape}, or fix it with `trtbuild prepare --dim {dim}=VALUE`, or export with --min/--max-shape"


def model_input_specs(
    onnx_path: str | os.PathLike[str], *, max_batch: int = DEFAULT_MAX_BATCH
) -> list[InputSpec]:
    """The input specs (min/opt/max) of ``onnx_path``: from its sidecar when there is one, else from the
    graph (see :func:`specs_from_graph`)."""
    if meta_path(onnx_path).is_file():
        inputs = load_export_meta(onnx_path).inputs
        if inputs:
            return inputs  # else the sidecar could not fix a symbolic dim: the graph explains which
    model = onnx.load(str(onnx_path), load_external_data=False)
    return specs_from_graph(model, max_batch=max_batch)


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    """Each axis's size, or its symbol: -1 is Paddle2ONNX's way of writing a dynamic axis (any other
    negative size stays, to be refused as a negative dimension)."""
    shape = value.type.tensor_type.shape
    return tuple((d.dim_param or "?") if (size := fixed_size(d)) is None else size for d in shape.dim)


def value_dtype(value: onnx.ValueInfoProto) -> str:
    """The numpy name of a graph value's element type (\"unknown\" when the graph declares none)."""
    elem = value.type.tensor_type.elem_type
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else "unknown"
