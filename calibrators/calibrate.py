"""Top-level calibration API: one collection pass, any number of range methods, saved ranges and cache.

collection = collect("model.onnx", "photos/")            # one pass over the data
entropy = compute_ranges(collection, "entropy")          # methods read the same statistics
ranges = calibrate("model.onnx", "photos/", "percentile")  # or both steps at once
files = calibrate_to_files("model.onnx", "photos/", CalibrationSettings(method="entropy"))  # + JSON and cache
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from calibrators import cache
from calibrators.bias_correction import CHANNEL_MEANS_KEY, channel_means
from calibrators.collect import DEFAULT_BATCH_SIZE, Collection, collect, load_model, tensors_to_collect
from calibrators.data import CalibrationData, model_inputs, open_data
from calibrators.methods import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS, amax_for
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet, TensorRange
from trtbuild.core.defaults import DEFAULT_TRT_VERSION
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.output_set import check_writable_folder

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "CalibrationData",
    "CalibrationFiles",
    "CalibrationSettings",
    "Collection",
    "calibrate",
    "calibrate_to_files",
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
        log.warning(
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


@dataclass(frozen=True)
class CalibrationSettings:
    """Every choice of one calibration run, with its default; `trtbuild calibrate` fills it from its flags."""

    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    samples: int | None = None  # a seeded random subset of the data; None: all of it
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None  # ONNX Runtime intra-op threads; None: all cores
    exclude: tuple[str, ...] = ()  # regexes of node names kept float (their inputs are not measured)
    exclude_op_types: tuple[str, ...] = ()
    preprocess: Preprocess | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrtbuildError(
                f"unknown calibration method '{self.method}'", f"use one of {', '.join(METHODS)}"
            )


@dataclass(frozen=True)
class CalibrationFiles:
    """What :func:`calibrate_to_files` measured and wrote."""

    ranges: RangeSet
    ranges_path: Path
    cache_path: Path | None
    cache_header: str | None
    samples: int
    seconds: float


def calibrate_to_files(
    model_path: str | Path,
    data: Any,
    settings: CalibrationSettings | None = None,
    *,
    out_dir: str | Path | None = None,
    trt_version: str | None = DEFAULT_TRT_VERSION,
    show_progress: bool = True,
) -> CalibrationFiles:
    """Calibrate and write ``<model>.ranges.json`` and, unless ``trt_version`` is None, the TensorRT
    calibration cache ``<model>.calib.cache`` for that version, next to the model or in ``out_dir``.

    Everything that can be refused (folder, TensorRT version, method) is checked before the data pass."""
    settings = settings or CalibrationSettings()
    model_path = Path(model_path)
    folder = Path(out_dir) if out_dir is not None else model_path.parent
    check_writable_folder(folder, "--out-dir")
    header = cache.header(trt_version) if trt_version is not None else None
    proto = load_model(model_path)
    excluded = settings.exclude or settings.exclude_op_types
    tensors = tensors_to_collect(proto, settings.exclude, settings.exclude_op_types) if excluded else None
    collection = collect(
        proto,
        data,
        tensors=tensors,
        batch_size=settings.batch_size,
        threads=settings.threads,
        samples=settings.samples,
        seed=settings.seed,
        preprocess=settings.preprocess,
        show_progress=show_progress,
    )
    ranges = compute_ranges(collection, settings.method, percentile=settings.percentile)
    ranges.meta["model"] = str(model_path)
    if isinstance(data, (str, Path)):  # images come from paths: record how they became tensors
        ranges.meta["preprocess"] = open_data(data, model_inputs(proto), settings.preprocess).preprocessing()
    stem = model_path.name.removesuffix(".onnx")
    ranges_path = ranges.save(folder / f"{stem}.ranges.json")
    cache_path = None
    if trt_version is not None:
        cache_path = cache.write_cache(ranges, folder / f"{stem}.calib.cache", trt_version)
    return CalibrationFiles(ranges, ranges_path, cache_path, header, collection.samples, collection.seconds)
