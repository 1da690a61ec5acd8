"""Model input specs (`name:1x3x224x224[:float32]`), dynamic axes, and min/opt/max shapes for profiles."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtbuild.errors import TrtbuildError

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
        raise TrtbuildError(f"cannot parse {what} '{text}'", "write it like 1x3x224x224")
    return tuple(int(d) for d in text.split("x"))


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name:1x3x224x224[:float32]``."""
    match = _SPEC.match(text.strip())
    if not match:
        raise TrtbuildError(
            f"cannot parse input spec '{text}'",
            "write it as name:1x3x224x224 or name:1x3x224x224:float32",
        )
    shape = parse_shape(match["shape"])
    if any(d == 0 for d in shape):
        raise TrtbuildError(f"input spec '{text}' has a zero-sized dimension", "use positive dimensions")
    return InputSpec(match["name"], shape, match["dtype"] or "float32")
