"""`trtbuild calibrate`: measure activation ranges on calibration data; write ranges JSON + TensorRT cache."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from calibrators.calibrate import CalibrationSettings, calibrate_to_files
from calibrators.collect import DEFAULT_BATCH_SIZE
from calibrators.methods import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet
from trtbuild.cli.data_options import data_option, preprocess_options
from trtbuild.core import console
from trtbuild.core.defaults import DEFAULT_TRT_VERSION


def _table(ranges: RangeSet, rows: int) -> Table:
    ordered = sorted(ranges.values(), key=lambda r: r.amax, reverse=True)
    shown = ordered if len(ordered) <= 2 * rows else [*ordered[:rows], None, *ordered[-rows:]]
    table = Table(title=f"{ranges.method} ranges: widest and narrowest of {len(ranges)} tensors")
    for column in ("tensor", "amax", "min", "max", "amax / max|x|"):
        table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold")
    for r in shown:
        if r is None:
            table.add_row("…", "", "", "", "")
            continue
        absmax = max(abs(r.min), abs(r.max))
        ratio = f"{r.amax / absmax:.3f}" if absmax else "-"
        table.add_row(r.name, f"{r.amax:.5g}", f"{r.min:.5g}", f"{r.max:.5g}", ratio)
    return table


@click.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@data_option
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True)
@click.option("--samples", type=int, default=None, help="Use N samples (seeded random subset; default all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --samples.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option(
    "--percentile",
    type=float,
    default=DEFAULT_PERCENTILE,
    show_default=True,
    help="Percentile of |x| for --method percentile.",
)
@click.option(
    "--trt-version",
    default=DEFAULT_TRT_VERSION,
    show_default=True,
    help="TensorRT version the cache header is written for (8.5 .. 10.x).",
)
@click.option("--no-cache", is_flag=True, help="Write only the ranges JSON (e.g. for TensorRT 11).")
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write <model>.ranges.json and <model>.calib.cache (default: the model's folder).",
)
@click.option("--exclude", multiple=True, help="Regex of node names to keep in float (not calibrated).")
@click.option(
    "--exclude-op-type",
    "--exclude-op",
    "exclude_op_types",
    multiple=True,
    help="Op type to keep in float (not calibrated; --exclude-op is the old name).",
)
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def calibrate_command(
    model: Path,
    data_path: Path,
    method: str,
    samples: int | None,
    seed: int,
    batch_size: int,
    threads: int | None,
    percentile: float,
    trt_version: str,
    no_cache: bool,
    out_dir: Path | None,
    exclude: tuple[str, ...],
    exclude_op_types: tuple[str, ...],
    preprocess: Preprocess,
    as_json: bool,
) -> None:
    """Calibrate MODEL.onnx on --data: per-tensor INT8 ranges (JSON) and a TensorRT calibration cache."""
    settings = CalibrationSettings(
        method=method,
        percentile=percentile,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        threads=threads,
        exclude=exclude,
        exclude_op_types=exclude_op_types,
        preprocess=preprocess,
    )
    files = calibrate_to_files(
        model, data_path, settings, out_dir=out_dir, trt_version=None if no_cache else trt_version
    )
    ranges = files.ranges
    if as_json:
        ordered = sorted(ranges.values(), key=lambda r: r.amax, reverse=True)
        console.emit_json(
            {
                "ranges": str(files.ranges_path),
                "cache": None if files.cache_path is None else str(files.cache_path),
                "cache_header": files.cache_header,
                "method": method,
                "samples": files.samples,
                "seconds": round(files.seconds, 3),
                "tensors": len(ranges),
                "widest": [{"name": r.name, "amax": r.amax} for r in ordered[:5]],
                "narrowest": [{"name": r.name, "amax": r.amax} for r in ordered[-5:]],
            }
        )
        return
    console.out.print(_table(ranges, 5))
    console.out.print(f"{files.samples} samples, {len(ranges)} tensors, {files.seconds:.1f} s")
    console.out.print(f"ranges: {files.ranges_path}")
    if files.cache_path is not None:
        console.out.print(f"cache:  {files.cache_path} ({files.cache_header})")


COMMANDS: list[click.Command] = [calibrate_command]
