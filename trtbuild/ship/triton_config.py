"""Triton `config.pbtxt` as data: tensors, batching, instances, warmup, written in protobuf text format.

Pure functions only (no files): :func:`batching` decides max_batch_size and the per-tensor dims from the
input profile and the graph's outputs, refusing what Triton would refuse at load time, and
:meth:`TritonConfig.to_pbtxt` renders the message Triton parses with its `model_config.proto`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from export.meta import Dim, OutputInfo
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec, fmt_shape

# numpy dtype name -> Triton DataType (model_config.proto)
TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
# Triton serves a model under its folder name and in HTTP/gRPC URLs, so keep it a plain path segment.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
DEFAULT_QUEUE_DELAY_US = 100


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str  # TYPE_*
    dims: tuple[int, ...]  # without the batch dim when max_batch_size > 0; -1 where dynamic
    label_filename: str | None = None
    reshape: tuple[int, ...] | None = None  # a [batch]-only tensor: dims [1] reshaped to []


@dataclass(frozen=True)
class Warmup:
    """One warmup request from a recorded real sample: input name -> raw file under `warmup/`."""

    files: dict[str, str]
    batch_size: int = 1


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    profile_max_batch: int | None  # the profile's max batch (None: no batch axis)


@dataclass(frozen=True)
class TritonConfig:
    name: str
    platform: str  # "tensorrt_plan" | "onnxruntime_onnx"
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    instance_kind: str  # KIND_GPU | KIND_CPU
    instance_count: int = 1
    gpus: tuple[int, ...] = ()
    preferred_batch_sizes: tuple[int, ...] = ()
    dynamic_batching: bool = False
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    warmup: Warmup | None = None
    default_model_filename: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    def to_pbtxt(self) -> str:
        lines = [f"name: {_quote(self.name)}", f"platform: {_quote(self.platform)}"]
        lines.append(f"max_batch_size: {self.max_batch_size}")
        if self.default_model_filename:
            lines.append(f"default_model_filename: {_quote(self.default_model_filename)}")
        lines += _tensors("input", self.inputs) + _tensors("output", self.outputs)
        if self.dynamic_batching:
            lines.append("dynamic_batching {")
            if self.preferred_batch_sizes:
                lines.append(f"  preferred_batch_size: [ {', '.join(map(str, self.preferred_batch_sizes))} ]")
            lines += [f"  max_queue_delay_microseconds: {self.max_queue_delay_us}", "}"]
        group = [f"    count: {self.instance_count}", f"    kind: {self.instance_kind}"]
        if self.gpus:
            group.append(f"    gpus: [ {', '.join(map(str, self.gpus))} ]")
        lines += ["instance_group [", "  {", *group, "  }", "]"]
        if self.warmup is not None:
            lines += self._warmup_lines(self.warmup)
        for key, value in sorted(self.parameters.items()):
            lines += [
                "parameters {",
                f"  key: {_quote(key)}",
                f"  value {{ string_value: {_quote(value)} }}",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def _warmup_lines(self, warmup: Warmup) -> list[str]:
        by_name = {t.name: t for t in self.inputs}
        lines = [
            "model_warmup [",
            "  {",
            '    name: "recorded_sample"',
            f"    batch_size: {warmup.batch_size}",
        ]
        for name, path in warmup.files.items():
            tensor = by_name[name]
            lines += [
                "    inputs {",
                f"      key: {_quote(name)}",
                "      value {",
                f"        data_type: {tensor.data_type}",
                f"        dims: [ {', '.join(map(str, tensor.dims))} ]",
                f"        input_data_file: {_quote(path)}",
                "      }",
                "    }",
            ]
        return [*lines, "  }", "]"]


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.match(name) or name in (".", ".."):
        raise TrtbuildError(
            f"'{name}' cannot be a Triton model name (it is the repository folder and part of the URL)",
            "pass --name with letters, digits, '_', '-' or '.', not starting with '.' or '-'",
        )
    return name


def check_tensor_names(kind: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if not name or any(ord(c) < 32 for c in name):
            raise TrtbuildError(
                f"{kind} name {name!r} cannot be written to a Triton config", "rename it in the ONNX model"
            )
        if name in seen:
            raise TrtbuildError(f"two {kind}s are named '{name}'; Triton needs unique names", "rename one")
        seen.add(name)


def triton_dtype(dtype: str, where: str) -> str:
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise TrtbuildError(
            f"{where} has dtype {dtype}, which Triton has no type for",
            "cast it to a numeric type in the model",
        ) from None


def batching(
    inputs: Sequence[InputSpec],
    input_dtypes: dict[str, str],
    outputs: Sequence[OutputInfo],
    *,
    max_batch: int | None = None,
    want_dynamic_batching: bool = False,
) -> Batching:
    """Triton's view of the profile: a batch axis when every input's axis 0 is dynamic from 1.

    Refuses (TrtbuildError) what Triton would refuse at load or at the first request: inputs that
    disagree on the batch range, a profile that cannot take batch 1, ``max_batch`` above the profile's
    max, outputs without a batch axis, and dynamic batching for a model with no batch axis.
    """
    check_tensor_names("input", [s.name for s in inputs])
    check_tensor_names("output", [o.name for o in outputs])
    dynamic0 = [s for s in inputs if s.min[0] != s.max[0]] if all(s.opt_shape for s in inputs) else []
    if dynamic0 and len(dynamic0) != len(inputs):
        fixed = next(s for s in inputs if s not in dynamic0)
        raise TrtbuildError(
            f"input '{dynamic0[0].name}' has a dynamic batch but input '{fixed.name}' is fixed at "
            f"{fmt_shape(fixed.max)}; Triton batches all inputs together",
            "give every input the same dynamic batch axis (export with --dynamic-batch)",
        )
    if not dynamic0:
        if max_batch is not None or want_dynamic_batching:
            shown = ", ".join(f"{s.name} {fmt_shape(s.max)}" for s in inputs)
            raise TrtbuildError(
                f"the model has no batch axis (fixed input shapes: {shown}), so Triton cannot batch it",
                "export with --dynamic-batch, or drop --max-batch/--dynamic-batching",
            )
        ins = tuple(  # a scalar (Silero VAD's `sr`) is dims [1] reshaped to []: Triton refuses no dims
            _batch_only(
                TritonTensor(s.name, triton_dtype(input_dtypes[s.name], f"input '{s.name}'"), _dims(s, 0))
            )
            for s in inputs
        )
        outs = tuple(_output(o, 0) for o in outputs)
        return Batching(0, ins, outs, None)
    lows = {s.min[0] for s in inputs}
    highs = {s.max[0] for s in inputs}
    if lows != {1}:
        raise TrtbuildError(
            f"the profile's smallest batch is {min(lows)}, but Triton sends batches from 1 up",
            "use a profile whose min batch is 1 (e.g. --min-shape with batch 1)",
        )
    if len(highs) != 1:
        raise TrtbuildError(
            f"inputs disagree on the max batch ({', '.join(f'{s.name}: {s.max[0]}' for s in inputs)})",
            "give every input the same max batch in the profile",
        )
    profile_max = highs.pop()
    if max_batch is not None and not 1 <= max_batch <= profile_max:
        raise TrtbuildError(
            f"--max-batch {max_batch} is outside the plan's profile (batch 1..{profile_max})",
            f"pass --max-batch 1..{profile_max}, or re-plan with a larger max shape",
        )
    for out in outputs:
        if not out.shape or isinstance(out.shape[0], int):
            raise TrtbuildError(
                f"output '{out.name}' has shape {_show(out.shape)} with no batch axis while the inputs "
                "have one; Triton would reject the batched config",
                "export the model so every output keeps the batch as its first dim",
            )
    ins = tuple(
        _batch_only(
            TritonTensor(s.name, triton_dtype(input_dtypes[s.name], f"input '{s.name}'"), _dims(s, 1))
        )
        for s in inputs
    )
    outs = tuple(_batch_only(_output(o, 1)) for o in outputs)
    return Batching(max_batch or profile_max, ins, outs, profile_max)


def _batch_only(tensor: TritonTensor) -> TritonTensor:
    """Triton needs at least one dim besides the batch: a [batch] tensor is dims [1] reshaped to []."""
    return tensor if tensor.dims else TritonTensor(tensor.name, tensor.data_type, (1,), reshape=())


def preferred_sizes(
    opt_batch: int, max_batch_size: int, requested: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The profile's opt and max batch (both where TensorRT tuned kernels), or the user's list."""
    if requested:
        bad = [b for b in requested if not 1 <= b <= max_batch_size]
        if bad:
            raise TrtbuildError(
                f"preferred batch size(s) {bad} are outside 1..{max_batch_size} (max_batch_size)",
                f"pass sizes within 1..{max_batch_size}",
            )
        return tuple(sorted(set(requested)))
    sizes = sorted({min(opt_batch, max_batch_size), max_batch_size})
    return tuple(s for s in sizes if s > 1) or (1,)


def _dims(spec: InputSpec, skip: int) -> tuple[int, ...]:
    return tuple(-1 if lo != hi else hi for lo, hi in zip(spec.min[skip:], spec.max[skip:], strict=True))


def _output(out: OutputInfo, skip: int) -> TritonTensor:
    dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in out.shape[skip:])
    return TritonTensor(out.name, triton_dtype(out.dtype, f"output '{out.name}'"), dims)


def _show(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _tensors(kind: str, tensors: Sequence[TritonTensor]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        lines += [
            "  {",
            f"    name: {_quote(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {', '.join(map(str, t.dims))} ]",
        ]
        if t.reshape is not None:
            lines.append(f"    reshape: {{ shape: [ {', '.join(map(str, t.reshape))} ] }}")
        if t.label_filename:
            lines.append(f"    label_filename: {_quote(t.label_filename)}")
        lines.append("  }," if i < len(tensors) - 1 else "  }")
    return [*lines, "]"]


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII as octal UTF-8 bytes)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'
