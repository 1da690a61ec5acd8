"""Calibrated ranges: the one set of numbers every output (Q/DQ ONNX, TRT cache, encodings) comes from."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError

if TYPE_CHECKING:
    import onnx

RANGES_SCHEMA = 1


@dataclass(frozen=True)
class TensorRange:
    """Range of one activation tensor.

    ``amax`` is the symmetric clipping threshold chosen by the calibration method (scale = amax / 127);
    ``min``/``max`` are the observed extremes, kept for asymmetric (Qualcomm uint8) encodings.
    """

    name: str
    amax: float
    min: float
    max: float

    def __post_init__(self) -> None:
        for label, value in (("amax", self.amax), ("min", self.min), ("max", self.max)):
            if not math.isfinite(value):
                raise TrtbuildError(
                    f"range of tensor '{self.name}' has a non-finite {label} ({value})",
                    "check the calibration data for NaN/Inf or exclude this tensor from quantization",
                )
        if self.amax < 0:
            raise TrtbuildError(f"range of tensor '{self.name}' has a negative amax ({self.amax})")

    @property
    def scale(self) -> float:
        """Symmetric INT8 scale (TensorRT's): amax / 127."""
        return self.amax / 127.0

    def clipped(self) -> tuple[float, float]:
        """Observed [min, max] clipped to ±amax: the asymmetric range a uint8 encoding should cover."""
        lo = max(self.min, -self.amax)
        hi = min(self.max, self.amax)
        return min(lo, 0.0), max(hi, 0.0)


@dataclass
class RangeSet(Mapping[str, TensorRange]):
    """Ranges per tensor name, plus how they were made."""

    method: str
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> TensorRange:
        return self.ranges[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def add(self, tensor_range: TensorRange) -> None:
        self.ranges[tensor_range.name] = tensor_range

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": RANGES_SCHEMA,
            "method": self.method,
            "meta": self.meta,
            "tensors": {
                name: {k: v for k, v in asdict(r).items() if k != "name"} for name, r in self.ranges.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RangeSet:
        if data.get("schema") != RANGES_SCHEMA:
            raise TrtbuildError(
                f"ranges file has schema {data.get('schema')!r}, this trtbuild reads schema {RANGES_SCHEMA}",
                "re-run `trtbuild calibrate` with this version",
            )
        ranges = {
            name: TensorRange(name=name, amax=float(v["amax"]), min=float(v["min"]), max=float(v["max"]))
            for name, v in data["tensors"].items()
        }
        return cls(method=str(data["method"]), ranges=ranges, meta=dict(data.get("meta", {})))

    def check_fits(self, model: onnx.ModelProto, label: str) -> None:
        """Refuse ranges naming tensors ``model`` does not have: they were measured on another graph
        (``quantize --equalize-depthwise`` calibrates its rewritten graph, whose depthwise inputs are new
        tensors), and a cache or encodings written from them would silently leave those layers without
        a range, unlike the graph the fidelity gate passed."""
        graph = model.graph
        have = {v.name for v in (*graph.input, *graph.initializer)} | {
            o for n in graph.node for o in n.output
        }
        missing = [n for n in self.ranges if n not in have]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            shown = ", ".join(repr(n) for n in missing[:3]) + more
            what = (
                f"none of the calibrated tensor names occur in {label} ({shown})"
                if len(missing) == len(self.ranges)
                else f"the ranges name {len(missing)} tensor(s) {label} does not have ({shown})"
            )
            raise TrtbuildError(
                f"{what}: they were measured on another graph",
                "calibrate this model (`trtbuild calibrate`), or ship the Q/DQ graph of the run that wrote "
                "them (--qdq-onnx); ranges of `quantize --equalize-depthwise` belong to its rewritten graph",
            )

    def save(self, path: str | Path) -> Path:
        return atomic.write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RangeSet:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrtbuildError(
                f"cannot read ranges file {path}: {exc}", "pass a file written by `trtbuild calibrate`"
            ) from exc
        return cls.from_json(data)
