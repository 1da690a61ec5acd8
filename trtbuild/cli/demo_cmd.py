"""`trtbuild demo`: the main job on the bundled EfficientNet-Lite0 and real photos."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from trtbuild.core import console
from trtbuild.core.defaults import OUTPUT_ROOT


@click.command("demo")
@click.option(
    "--out",
    "out_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=OUTPUT_ROOT,
    show_default=True,
    help="Output root; artifacts go to OUT/efficientnet_lite0/.",
)
@click.option(
    "--profile-iterations",
    type=click.IntRange(5),
    default=50,
    show_default=True,
    help="Timed iterations per model in the profile stage.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stage results as JSON on stdout.")
def demo(out_root: Path, profile_iterations: int, as_json: bool) -> None:
    """Export, quantize, plan, profile and bundle the pretrained EfficientNet-Lite0 on real photos."""
    from trtbuild.demo import run_demo

    result = run_demo(out_root, quiet=as_json, profile_iterations=profile_iterations)
    if as_json:
        console.emit_json(result.to_json())
        return
    table = Table(title=f"trtbuild demo: EfficientNet-Lite0 → {result.out_dir}")
    table.add_column("stage", style="bold")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for stage in result.stages:
        table.add_row(stage.name, f"{stage.seconds:.1f}", stage.summary)
    console.out.print(table)


COMMANDS: list[click.Command] = [demo]
