"""Model input specs (`name:1x3x224x224[:float32]`), dynamic axes, and min/opt/max shapes for profiles."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError

DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "int64": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "bool": np.dtype("bool"),
    "uint8": np.dtype("uint8"),
    "int8": np.dtype("int8"),
}

_SPEC = re.compile(r"^(?P<name>[A-Za-z_][\w.\-/]*):(?P<shape>\d+(?:x\d+)*)(?::(?P<dtype>\w+))?$")

Shape = tuple[int, ...]

MAX_TENSOR_BYTES = 8 << 30  # one input tensor (or one batch of calibration data) held in memory
_MAX_DIM_DIGITS = 18  # int("9" * 5000) is slow and int() refuses 4300+ digits: no real dim is this long


def format_bytes(n: int) -> str:
    """``n`` bytes for people: 894.1 GiB, 12.0 MiB, 512 B."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def tensor_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes a dense tensor of ``shape`` and ``dtype`` takes (exact Python integers: never overflows)."""
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


def check_tensor_size(
    what: str, shape: Sequence[int], dtype: Any, limit: int | None = None, fix: str | None = None
) -> int:
    """Refuse a negative dimension, or a tensor that would take more than ``limit`` bytes (default
    :data:`MAX_TENSOR_BYTES`), before anything allocates it: one error line giving the size it would take
    and the limit. Returns its size in bytes."""
    limit = MAX_TENSOR_BYTES if limit is None else limit
    dims = tuple(shape)
    if any(d < 0 for d in dims):
        raise TrtbuildError(
            f"{what} has a negative dimension ({'x'.join(str(d) for d in dims)})",
            "use positive dimensions (a model with one declares an invalid shape: fix or re-export it)",
        )
    need = tensor_bytes(dims, dtype)
    if need > limit:
        raise TrtbuildError(
            f"{what} {'x'.join(str(d) for d in dims)} ({np.dtype(dtype).name}) would take "
            f"{format_bytes(need)} of memory, more than the {format_bytes(limit)} limit",
            fix or "use a smaller shape",
        )
    return need


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``opt_shape`` is what export traces with; min/max bound the dynamic dims.

    A dim is dynamic when min and max differ there; ``dynamic_axes`` names them for the exporter.
    """

    name: str
    opt_shape: Shape
    dtype: str = "float32"
    min_shape: Shape | None = None
    max_shape: Shape | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TrtbuildError(
                f"input '{self.name}' has unknown dtype '{self.dtype}'",
                f"use one of {', '.join(DTYPES)}",
            )
        for label, shape in (("opt", self.opt_shape), ("min", self.min_shape), ("max", self.max_shape)):
            if shape is not None and not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape
            ):
                raise TrtbuildError(
                    f"input '{self.name}' {label} shape {shape!r} is not a list of integers",
                    "write shapes like 1x3x224x224",
                )
            if shape is not None:
                # negative dims, and shapes no machine can hold (export feeds opt, profiles up to max)
                check_tensor_size(f"input '{self.name}' {label} shape", shape, DTYPES[self.dtype])
        for label, shape in (("min", self.min_shape), ("max", self.max_shape)):
            if shape is not None and len(shape) != len(self.opt_shape):
                raise TrtbuildError(
                    f"input '{self.name}' {label} shape {fmt_shape(shape)} has a different rank "
                    f"than {fmt_shape(self.opt_shape)}",
                    "give min/opt/max shapes of the same rank",
                )
        lo, hi = self.min, self.max
        if any(a > b for a, b in zip(lo, self.opt_shape, strict=True)) or any(
            a > b for a, b in zip(self.opt_shape, hi, strict=True)
        ):
            raise TrtbuildError(
                f"input '{self.name}' shapes are not ordered min <= opt <= max "
                f"({fmt_shape(lo)}, {fmt_shape(self.opt_shape)}, {fmt_shape(hi)})",
                "fix the --min/--opt/--max shapes",
            )

    @property
    def min(self) -> Shape:
        return self.min_shape or self.opt_shape

    @property
    def max(self) -> Shape:
        return self.max_shape or self.opt_shape

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return DTYPES[self.dtype]

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, (a, b) in enumerate(zip(self.min, self.max, strict=True)) if a != b)

    def with_dynamic_batch(self, max_batch: int) -> InputSpec:
        """Make axis 0 dynamic from 1 to ``max_batch`` (opt keeps the traced batch)."""
        min_shape = (1, *self.min[1:])
        max_shape = (max(max_batch, self.opt_shape[0]), *self.max[1:])
        return InputSpec(self.name, self.opt_shape, self.dtype, min_shape, max_shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "min": list(self.min),
            "opt": list(self.opt_shape),
            "max": list(self.max),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputSpec:
        return cls(
            str(data["name"]),
            tuple(data["opt"]),
            str(data.get("dtype", "float32")),
            tuple(data["min"]),
            tuple(data["max"]),
        )


def fmt_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def parse_shape(text: str, what: str = "shape") -> Shape:
    if not re.fullmatch(r"\d+(?:x\d+)*", text):
        raise TrtbuildError(f"cannot parse {what} '{text[:200]}'", "write it like 1x3x224x224")
    dims = text.split("x")
    if any(len(d.lstrip("0")) > _MAX_DIM_DIGITS for d in dims):
        raise TrtbuildError(f"{what} '{text[:200]}' has an impossibly large dimension", "use a real shape")
    return tuple(int(d) for d in dims)


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name:1x3x224x224[:float32]``."""
    match = _SPEC.match(text.strip())
    if not match:
        raise TrtbuildError(
            f"cannot parse input spec '{text[:200]}'",
            "write it as name:1x3x224x224 or name:1x3x224x224:float32",
        )
    shape = parse_shape(match["shape"])
    if any(d == 0 for d in shape):
        raise TrtbuildError(
            f"input spec '{text[:200]}' has a zero-sized dimension", "use positive dimensions"
        )
    return InputSpec(match["name"], shape, match["dtype"] or "float32")


def parse_profile_spec(text: str) -> InputSpec:
    """`name:MIN,OPT,MAX` or `name:SHAPE` (static)."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise TrtbuildError(
            f"cannot parse --shape '{text}'",
            "write it as name:1x3x224x224,8x3x224x224,32x3x224x224 (min,opt,max) or name:1x3x224x224",
        )
    parts = [parse_shape(p, "--shape") for p in dims.split(",")]
    if len(parts) == 1:
        return InputSpec(name, parts[0], "float32", parts[0], parts[0])
    if len(parts) != 3:
        raise TrtbuildError(f"--shape '{text}' needs 1 or 3 shapes, got {len(parts)}", "give min,opt,max")
    return InputSpec(name, parts[1], "float32", parts[0], parts[2])
