"""The TensorRT profile and unquantized-layer options of `plan`, `export-jetson` and `bundle create`."""

from __future__ import annotations

import click

from trtbuild.plan import HIGH_PRECISIONS

shape_option = click.option(
    "--shape",
    "shapes",
    multiple=True,
    help="name:MIN,OPT,MAX (e.g. images:1x3x224x224,8x3x224x224,32x3x224x224); default: the export "
    "sidecar, else the graph.",
)

high_precision_option = click.option(
    "--high-precision",
    type=click.Choice(HIGH_PRECISIONS),
    default="fp16",
    show_default=True,
    help="Strongly typed Q/DQ builds: the type of the unquantized layers (fp32 when the model's float "
    "parts drift in FP16: slower, as accurate as its Q/DQ).",
)
