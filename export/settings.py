"""Every choice of one `export` or `prepare` run, with its default: the one place those defaults live.

`trtbuild export` / `trtbuild prepare` fill it from their flags (flag ``--foo-bar`` is field ``foo_bar``);
the Python API takes it as ``export_model(source, inputs, out, settings)`` or as keyword overrides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from export.meta import DEFAULT_MAX_BATCH
from export.prepare import EXTERNAL_DATA_THRESHOLD
from export.verify import DEFAULT_INT_HIGH
from trtbuild.core.defaults import EXPORT_ATOL, EXPORT_RTOL, PREPARE_ATOL, PREPARE_RTOL
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.settings import with_overrides

DEFAULT_OPSET = 17  # for PyTorch sources; an ONNX source keeps its opset unless it is older than 13


@dataclass(frozen=True)
class ExportSettings:
    """How to export (or prepare) and verify. See :func:`export.pipeline.export_model`."""

    opset: int | None = None  # None: DEFAULT_OPSET for PyTorch, the file's own (>= 13) for ONNX
    dynamic_batch: bool = False  # axis 0 of every input dynamic, 1..max_batch
    max_batch: int = DEFAULT_MAX_BATCH
    min_shapes: Mapping[str, str | Sequence[int]] | None = None  # per input name
    max_shapes: Mapping[str, str | Sequence[int]] | None = None
    output_names: Sequence[str] | None = None  # None: output, output_1, ...
    dim_values: Mapping[str, int] | None = None  # prepare: values of symbolic dims for the comparison run
    simplify: bool = True  # onnxslim
    verify_outputs: bool = True  # prepare: compare the prepared graph with the original in ORT
    atol: float | None = None  # None: EXPORT_ATOL against PyTorch, PREPARE_ATOL against an ONNX original
    rtol: float | None = None
    seed: int = 0  # of the random verification inputs
    int_high: int = DEFAULT_INT_HIGH  # random integer inputs are drawn from [0, int_high)
    external_threshold: int = EXTERNAL_DATA_THRESHOLD  # bytes above which weights go to external data

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise TrtbuildError(f"--{name} {value} is negative", f"pass --{name} 0 or more")

    def tolerances(self, against_torch: bool) -> tuple[float, float]:
        """(atol, rtol) for a comparison against PyTorch or against the original ONNX file."""
        atol, rtol = (EXPORT_ATOL, EXPORT_RTOL) if against_torch else (PREPARE_ATOL, PREPARE_RTOL)
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)

    @classmethod
    def from_overrides(cls, base: ExportSettings | None, overrides: Mapping[str, Any]) -> ExportSettings:
        """``base`` (or the defaults) with ``overrides`` applied; an unknown name is a programming error."""
        return with_overrides(cls, base, overrides, "export")
