"""The pixel math a model was calibrated with, carried to the configs that feed a deployed engine images.

`trtbuild quantize` records its calibration images' preprocessing in the ranges JSON (``meta.preprocess``)
and in the Q/DQ ONNX it writes (metadata ``trtbuild.preprocess``). An nvinfer config (or a Triton warmup
image) built with other mean/std/scale feeds the INT8 engine pixels its ranges were not measured on: every
activation shifts, and nothing reports it. So a handoff given no image options takes the recorded ones,
and image options that contradict the record are refused (docs/fidelity-gate.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import onnx

from calibrators.preprocess import META_KEY, Preprocess, pixel_text
from calibrators.ranges import RangeSet
from trtbuild.core import ort as ort_core
from trtbuild.core.errors import TrtbuildError


def recorded(
    ranges: RangeSet | None, graphs: Sequence[str | os.PathLike[str] | None]
) -> tuple[Preprocess, str] | None:
    """The recorded calibration preprocessing and where it was read (the ranges, else the first graph
    that carries it); None when nothing records one (array data, a third-party graph)."""
    if ranges is not None and ranges.meta.get("preprocess"):
        return Preprocess.from_record(ranges.meta["preprocess"]), "the ranges' calibration record"
    for graph in graphs:
        if graph is None or not Path(graph).is_file():
            continue
        text = ort_core.metadata(onnx.load(str(graph), load_external_data=False)).get(META_KEY)
        if text:
            return Preprocess.from_record(json.loads(text)), f"'{Path(graph).name}' (its calibration record)"
    return None


def resolve(
    given: Preprocess | None,
    ranges: RangeSet | None,
    graphs: Sequence[str | os.PathLike[str] | None],
    notes: list[str] | None = None,
) -> Preprocess:
    """The preprocessing to deploy with: ``given`` (the user's image options; None when none was passed),
    checked against the record; else the record; else ImageNet's default. Appends what it chose to
    ``notes``. Raises when the user's pixel math differs from the calibration's."""
    found = recorded(ranges, graphs)
    if found is None:
        return given or Preprocess()
    record, source = found
    if given is None:
        if notes is not None:
            notes.append(
                f"image preprocessing from {source}: mean {pixel_text(record.mean)}, std "
                f"{pixel_text(record.std)}, scale {pixel_text(record.scale)}"
            )
        return record
    differences = [
        f"--{f} {pixel_text(getattr(given, f))} (calibrated with {pixel_text(getattr(record, f))})"
        for f in record.pixel_differences(given)
    ]
    if differences:
        raise TrtbuildError(
            f"{', '.join(differences)}: the image options differ from the preprocessing recorded in "
            f"{source}, so the engine would get other pixels than its INT8 ranges were measured on",
            "leave the image options out to use the recorded ones, or re-calibrate with the new ones",
        )
    return given
