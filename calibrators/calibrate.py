"""Top-level calibration API: one collection pass, any number of range methods, saved ranges and cache.

collection = collect("model.onnx", "photos/")            # one pass over the data
entropy = compute_ranges(collection, "entropy")          # methods read the same statistics
ranges = calibrate("model.onnx", "photos/", "percentile")  # or both steps at once
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from calibrators.bias_correction import CHANNEL_MEANS_KEY, channel_means
from calibrators.collect import DEFAULT_BATCH_SIZE, Collection, collect, load_model
from calibrators.data import CalibrationData, model_inputs, open_data
from calibrators.methods import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS, amax_for
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet, TensorRange
from trtbuild.core import console
from trtbuild.core.errors import TrtbuildError

__all__ = [
    "METHODS",
    "CalibrationData",
    "Collection",
    "calibrate",
    "calibration_data",
    "collect",
    "compute_ranges",
]


def calibration_data(
    model: str | Path | onnx.ModelProto, data: Any, preprocess: Preprocess | None = None
) -> CalibrationData:
    """Open ``data`` for ``model`` without reading it; then ``.sample(n, seed)`` or ``.split(holdout=n)``.

    ``calib, held_out = calibration_data(m, "photos/").split(holdout=64)`` gives disjoint parts: calibrate on
    ``calib`` (pass it as ``data``), judge fidelity on ``held_out.batches(8)`` / ``held_out.samples()``.
    """
    return open_data(data, model_inputs(load_model(model)), preprocess)


def compute_ranges(
    collection: Collection,
    method: str = DEFAULT_METHOD,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    grid: str = "int8",
) -> RangeSet:
    """Ranges for every collected tensor with one method (no data pass); ``grid`` is the number format
    the ranges are for (int8, or fp8 where the MSE search rounds on the E4M3 grid)."""
    if method not in METHODS:
        raise TrtbuildError(f"unknown calibration method '{method}'", f"use one of {', '.join(METHODS)}")
    meta: dict[str, Any] = dict(collection.meta)
    meta.update({"collect_seconds": round(collection.seconds, 3)})
    if method == "percentile":
        meta["percentile"] = percentile
    if grid != "int8":
        meta["grid"] = grid
    means = channel_means(collection.stats)
    if means:  # what Q/DQ placement needs for bias correction (QdqOptions.bias_correction)
        meta[CHANNEL_MEANS_KEY] = means
    ranges = RangeSet(method=method, meta=meta)
    constant = []
    for name, stats in collection.stats.items():
        amax = amax_for(stats, method, percentile, grid)
        if amax == 0.0:
            constant.append(name)
        ranges.add(TensorRange(name=name, amax=amax, min=stats.min, max=stats.max))
    if constant:
        console.warn(
            f"{len(constant)} tensor(s) were all zeros on the calibration data (amax 0): "
            f"{', '.join(constant[:3])}"
        )
    return ranges


def calibrate(
    model_path: str | Path | onnx.ModelProto,
    data: Any,
    method: str = DEFAULT_METHOD,
    *,
    tensors: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    samples: int | None = None,
    seed: int = 0,
    preprocess: Preprocess | None = None,
    show_progress: bool = True,
) -> RangeSet:
    """Collect statistics over ``data`` and compute ranges with ``method``. Save with ``RangeSet.save()``."""
    if method not in METHODS:  # fail before the data pass
        raise TrtbuildError(f"unknown calibration method '{method}'", f"use one of {', '.join(METHODS)}")
    collection = collect(
        model_path,
        data,
        tensors=tensors,
        batch_size=batch_size,
        threads=threads,
        samples=samples,
        seed=seed,
        preprocess=preprocess,
        show_progress=show_progress,
    )
    return compute_ranges(collection, method, percentile=percentile)
