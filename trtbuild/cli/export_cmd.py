"""`trtbuild export` (PyTorch -> prepared, verified ONNX) and `trtbuild prepare` (third-party ONNX)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from rich.table import Table

from export.meta import ExportMeta
from export.settings import ExportSettings
from export.verify import VerifyResult
from trtbuild.core.console import emit_json, out
from trtbuild.core.defaults import EXPORT_ATOL, EXPORT_RTOL, PREPARE_ATOL, PREPARE_RTOL
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import fmt_shape

E = ExportSettings  # the defaults of the export flags live in the settings object


def _named_shapes(values: Sequence[str], option: str) -> dict[str, str]:
    """`name:AxBxC` pairs -> {name: "AxBxC"} (parsed into shapes later, with one-line errors)."""
    shapes = {}
    for value in values:
        name, sep, shape = value.rpartition(":")
        if not sep or not name:
            raise TrtbuildError(f"cannot parse {option} '{value}'", f"write it as {option} name:1x3x224x224")
        shapes[name] = shape
    return shapes


def _dim_values(values: Sequence[str]) -> dict[str, int]:
    dims = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not name or not number.isdigit() or int(number) < 1:
            raise TrtbuildError(f"cannot parse --dim '{value}'", "write it as --dim image_width=128")
        dims[name] = int(number)
    return dims


@click.command("export")
@click.argument("source")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME:SHAPE[:DTYPE]",
    help="Model input, e.g. images:1x3x224x224 or ids:1x16:int64 (repeat, in forward() order).",
)
@click.option(
    "--weights", type=click.Path(dir_okay=False), help="State dict (.pt/.pth) to load into the model."
)
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), help="ONNX path [engines/<name>/<name>.onnx]."
)
@click.option("--dynamic-batch", is_flag=True, help="Make axis 0 of every input dynamic (1..--max-batch).")
@click.option(
    "--max-batch", default=E.max_batch, show_default=True, help="Largest batch with --dynamic-batch."
)
@click.option("--min-shape", multiple=True, metavar="NAME:SHAPE", help="Smallest shape of a dynamic input.")
@click.option("--max-shape", multiple=True, metavar="NAME:SHAPE", help="Largest shape of a dynamic input.")
@click.option(
    "--output-name", "output_names", multiple=True, help="Output names in order [output, output_1, ...]."
)
@click.option(
    "--opset", type=int, default=None, help="ONNX opset [17; an .onnx source keeps its own when >= 13]."
)
@click.option(
    "--verify-data",
    type=click.Path(dir_okay=False),
    help="Real inputs to verify on: .npy (one input) or .npz (arrays named like the inputs).",
)
@click.option("--atol", default=EXPORT_ATOL, show_default=True, help="Absolute tolerance vs PyTorch.")
@click.option("--rtol", default=EXPORT_RTOL, show_default=True, help="Relative tolerance vs PyTorch.")
@click.option("--seed", default=E.seed, show_default=True, help="Seed of the random verification inputs.")
@click.option(
    "--int-high",
    default=E.int_high,
    show_default=True,
    help="Random integer inputs are drawn from [0, INT_HIGH).",
)
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim simplification.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_command(
    source: str,
    inputs: tuple[str, ...],
    weights: str | None,
    out_path: str | None,
    dynamic_batch: bool,
    max_batch: int,
    min_shape: tuple[str, ...],
    max_shape: tuple[str, ...],
    output_names: tuple[str, ...],
    opset: int | None,
    verify_data: str | None,
    atol: float,
    rtol: float,
    seed: int,
    int_high: int,
    no_simplify: bool,
    as_json: bool,
) -> None:
    """Export a PyTorch model (module:attribute, file.py:attribute or TorchScript file) to a prepared,
    verified ONNX file with an .export.json sidecar. An .onnx SOURCE is prepared and checked against
    itself (--input then declares its min/opt/max shapes for later stages)."""
    from export.pipeline import export_model
    from trtbuild.core.output_set import check_writable_folder

    if out_path is not None:
        check_writable_folder(Path(out_path).parent, "--out")
    result = export_model(
        source,
        list(inputs),
        out_path,
        ExportSettings(
            opset=opset,
            dynamic_batch=dynamic_batch,
            max_batch=max_batch,
            min_shapes=_named_shapes(min_shape, "--min-shape"),
            max_shapes=_named_shapes(max_shape, "--max-shape"),
            output_names=list(output_names) or None,
            atol=atol,
            rtol=rtol,
            seed=seed,
            int_high=int_high,
            simplify=not no_simplify,
        ),
        weights=weights,
        verify_inputs=verify_data,
    )
    if as_json:
        emit_json(result.to_json())
        return
    exporter = result.exporter + (f" (fallback: {result.fallback_reason})" if result.fallback_reason else "")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    _print_summary(
        f"Exported {source}",
        result.onnx_path,
        result.meta,
        result.verification,
        [("exporter", exporter), ("time", timing)],
    )


@click.command("prepare")
@click.argument("onnx_in", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Prepared ONNX path.")
@click.option(
    "--opset", type=int, default=None, help="Convert to this opset [older than 13 -> 17, else kept]."
)
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=VALUE",
    help="Value of a symbolic dim for the comparison run, e.g. image_width=128.",
)
@click.option("--no-verify", is_flag=True, help="Skip comparing the prepared graph with the original in ORT.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim simplification.")
@click.option("--atol", default=PREPARE_ATOL, show_default=True, help="Absolute tolerance vs the original.")
@click.option("--rtol", default=PREPARE_RTOL, show_default=True, help="Relative tolerance vs the original.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prepare_command(
    onnx_in: str,
    out_path: str,
    opset: int | None,
    dims: tuple[str, ...],
    no_verify: bool,
    no_simplify: bool,
    atol: float,
    rtol: float,
    as_json: bool,
) -> None:
    """Prepare an existing ONNX file: checker, opset >= 13, Constant weights -> initializers, onnxslim,
    shape inference, stable names; then check it still matches the original in ONNX Runtime."""
    from export.pipeline import prepare_onnx
    from trtbuild.core.output_set import check_writable_folder

    check_writable_folder(Path(out_path).parent, "--out")
    result = prepare_onnx(
        onnx_in,
        out_path,
        ExportSettings(
            opset=opset,
            simplify=not no_simplify,
            verify_outputs=not no_verify,
            dim_values=_dim_values(dims),
            atol=atol,
            rtol=rtol,
        ),
    )
    if as_json:
        emit_json(result.to_json())
        return
    report = result.preparation
    _print_summary(
        f"Prepared {onnx_in}",
        result.onnx_path,
        result.meta,
        result.verification,
        [
            ("opset change", f"{report.opset_before} -> {report.opset_after}"),
            ("nodes", f"{report.nodes_before} -> {report.nodes_after}"),
            ("steps", "; ".join(report.steps)),
        ],
    )


def _print_summary(
    title: str,
    onnx_path: Path,
    meta: ExportMeta,
    verification: VerifyResult | None,
    extra_rows: Sequence[tuple[str, str]],
) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("onnx", str(onnx_path))
    table.add_row("opset", str(meta.opset))
    for spec in meta.inputs:
        shapes = (
            fmt_shape(spec.opt_shape)
            if spec.min == spec.max
            else (f"min {fmt_shape(spec.min)} / opt {fmt_shape(spec.opt_shape)} / max {fmt_shape(spec.max)}")
        )
        table.add_row(f"input {spec.name}", f"{spec.dtype} {shapes}")
    for output in meta.outputs:
        table.add_row(f"output {output.name}", f"{output.dtype} {'x'.join(str(d) for d in output.shape)}")
    for key, value in extra_rows:
        table.add_row(key, value)
    out.print(table)
    if verification is None:
        return
    errors = Table(
        title=f"Verification vs {verification.reference} ({len(verification.cases)} cases: "
        f"{', '.join(c.label for c in verification.cases)})",
        title_justify="left",
    )
    for column in ("output", "max abs", "max rel", "mismatched", "result"):
        errors.add_column(column, justify="left" if column == "output" else "right")
    for o in verification.worst():
        errors.add_row(
            o.name,
            f"{o.max_abs:.3g}",
            f"{o.max_rel:.3g}",
            f"{o.mismatched}/{o.total}",
            "[green]pass[/green]" if o.mismatched == 0 else "[red]fail[/red]",
        )
    out.print(errors)


COMMANDS: list[click.Command] = [export_command, prepare_command]
