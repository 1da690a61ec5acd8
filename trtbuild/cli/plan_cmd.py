"""`trtbuild targets`, `plan`, `build`, `inspect`: thin commands over targets / plan / trt_backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from trtbuild.cli.profile_options import high_precision_option, shape_option
from trtbuild.core.console import emit_json, out, progress, warn
from trtbuild.core.defaults import DEFAULT_TRT_VERSION, OUTPUT_ROOT
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import fmt_shape, parse_profile_spec
from trtbuild.core.trt_versions import has
from trtbuild.memory_plan import PRECISIONS as MEMORY_PRECISIONS
from trtbuild.memory_plan import MemoryPlan, for_build_plan, plan_memory
from trtbuild.plan import HARDWARE_COMPAT, BuildPlan, PlanSettings
from trtbuild.plan_graphs import plan_model
from trtbuild.targets import PRECISIONS, TARGETS
from trtbuild.trtexec import save_plan_files


@click.command("targets")
@click.option(
    "--model",
    type=click.Path(dir_okay=False),
    help="Show whether this ONNX model fits each target in each precision (memory plan).",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    help="With --model: name:MIN,OPT,MAX or name:SHAPE (default: the export sidecar, else the graph).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def targets_cmd(model: str | None, shapes: tuple[str, ...], as_json: bool) -> None:
    """List deployment targets: architecture, TensorRT versions, precisions, DLA, defaults, memory."""
    if model is not None:
        _targets_for_model(model, shapes, as_json)
        return
    rows = [t.to_json() for t in TARGETS.values()]
    if as_json:
        emit_json(rows)
        return
    table = Table(title="trtbuild targets")
    # Ids are what users type: never cut them (rich would shrink them to `xavie…` at 80 columns, in CI or
    # piped). The short fact columns keep their width too; the prose columns wrap instead.
    fixed = {"target": max(len(r["id"]) for r in rows), "arch": 5, "JetPack": 7, "DLA": 3}
    cols = (
        "target",
        "device",
        "arch",
        "JetPack",
        "TensorRT",
        "precisions",
        "DLA",
        "memory",
        "workspace",
        "note",
    )
    for col in cols:
        if col in fixed:
            table.add_column(col, no_wrap=True, min_width=fixed[col])
        else:
            table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["id"],
            r["name"],
            r["sm"],
            r["jetpack"] or "-",
            ", ".join(r["trt_versions"]),
            " ".join(r["precisions"]),
            str(r["dla_cores"]) if r["dla_cores"] else "no",
            f"{r['memory_gib']:g} GiB",
            f"{r['workspace_mib']} MiB",
            r["note"],
        )
    out.print(table)


def _targets_for_model(model: str, shapes: tuple[str, ...], as_json: bool) -> None:
    """Each target's memory plan for ``model`` in every precision it runs (trtbuild/memory_plan.py)."""
    import onnx

    from export.meta import model_input_specs
    from trtbuild.core.onnx_file import load_model_file

    load_model_file(model, external_data=False)  # one line for a missing/invalid file
    specs = [parse_profile_spec(s) for s in shapes] or model_input_specs(model)
    max_shapes = {spec.name: spec.max for spec in specs}
    graph = onnx.load(model, load_external_data=False)
    plans: list[MemoryPlan] = [
        plan_memory(graph, target, precision, max_shapes)
        for target in TARGETS.values()
        for precision in MEMORY_PRECISIONS
        if precision in target.precisions
        and (precision != "int4-weights" or has("int4_weight_only", target.default_trt))
    ]
    unknown = max((p.unknown_shapes for p in plans), default=0)
    if unknown:
        # ORT's symbolic shape inference fails on some graphs (the issue-11 sweep: TorchScript MiniLM
        # exports after ONNX's version converter, e.g. their INT4 graphs: 310 tensors, 0.09 of 0.61 MiB
        # counted; dynamo's opset-20 export is fine): say so rather than under-report
        warn(
            f"{unknown} activation tensors of {model} have no shape at these shapes and are not counted: the "
            "activation peak is a lower bound (for a quantized graph, run `trtbuild targets --model` on its "
            "float model; `trtbuild plan` takes the activations from it)"
        )
    if as_json:
        emit_json([p.to_json() for p in plans])
        return
    table = Table(title=f"memory plan: {model} at max shapes {max_shapes}")
    for col in ("target", "usable", *MEMORY_PRECISIONS):
        table.add_column(col, no_wrap=col == "target")
    for target in TARGETS.values():
        own = {p.precision: p for p in plans if p.target == target.id}
        usable = next(iter(own.values())).device_bytes / 2**30
        cells = []
        for precision in MEMORY_PRECISIONS:
            p = own.get(precision)
            cells.append(
                "-" if p is None else f"{p.needed_bytes / 2**30:.2f} GiB " + ("fits" if p.fits else "NO")
            )
        table.add_row(target.id, f"{usable:.1f} GiB", *cells)
    table.caption = "needed = weights + activation peak + the target's default workspace; - : not supported"
    out.print(table)


def _plan_options(fn: Any) -> Any:
    options = [
        click.option("--target", "-t", required=True, help="Target id (see `trtbuild targets`)."),
        click.option("--precision", "-p", required=True, help=f"One of {', '.join(PRECISIONS)}."),
        click.option(
            "--trt-version", help=f"TensorRT version (data-center targets; default {DEFAULT_TRT_VERSION})."
        ),
        shape_option,
        click.option("--workspace", "workspace_mib", type=int, help="Workspace memory pool in MiB."),
        click.option("--opt-level", type=int, help="Builder optimization level 0-5 (TensorRT 8.6+)."),
        click.option("--timing-cache", type=click.Path(dir_okay=False), help="Persistent timing cache file."),
        click.option(
            "--hardware-compat",
            type=click.Choice(["none", *HARDWARE_COMPAT]),
            default="none",
            help="Engine portability across GPU architectures.",
        ),
        click.option("--version-compat", is_flag=True, help="Version-compatible engine (TensorRT 8.6+)."),
        click.option(
            "--sparsity/--no-sparsity",
            default=None,
            help="2:4 sparse kernels [default: on when the weights follow 2:4 and the GPU has them].",
        ),
        click.option("--dla-core", type=int, help="Run on this DLA core (Jetson Xavier/Orin)."),
        click.option(
            "--no-gpu-fallback", is_flag=True, help="With --dla-core: fail instead of falling back."
        ),
        click.option(
            "--calib-cache", type=click.Path(dir_okay=False), help="INT8 calibration cache (TRT <= 10.x)."
        ),
        click.option("--qdq-onnx", type=click.Path(dir_okay=False), help="Q/DQ (explicitly quantized) ONNX."),
        click.option("--fp16-onnx", type=click.Path(dir_okay=False), help="FP16 graph (default: converted)."),
        high_precision_option,
        click.option(
            "--data",
            "data_path",
            type=click.Path(exists=True),
            help="FP8 without --qdq-onnx: calibration data (as `trtbuild quantize --data`); the FP8 Q/DQ "
            "graph is quantized from it, gated on held-out samples with auto-fallback.",
        ),
        click.option(
            "--min-fidelity",
            multiple=True,
            help="With --data: the fidelity gate of the FP8 graph (as `trtbuild quantize`).",
        ),
        click.option(
            "--out",
            "out_root",
            default=str(OUTPUT_ROOT),
            show_default=True,
            type=click.Path(file_okay=False),
            help="Output root; files go to <out>/<model>/.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_from_options(model: str, **kw: Any) -> BuildPlan:
    """The plan for the flags of `trtbuild plan` (names as in :class:`PlanSettings`)."""
    settings = PlanSettings(
        target=kw["target"],
        precision=kw["precision"],
        trt_version=kw["trt_version"],
        shapes=tuple(parse_profile_spec(s) for s in kw["shapes"]),
        workspace_mib=kw["workspace_mib"],
        opt_level=kw["opt_level"],
        timing_cache=kw["timing_cache"],
        hardware_compat=kw["hardware_compat"],
        version_compat=kw["version_compat"],
        sparsity=kw["sparsity"],
        dla_core=kw["dla_core"],
        gpu_fallback=not kw["no_gpu_fallback"],
        calib_cache=kw["calib_cache"],
        qdq_onnx=kw["qdq_onnx"],
        fp16_onnx=kw["fp16_onnx"],
        high_precision=kw["high_precision"],
        data=kw["data_path"],
        min_fidelity=tuple(kw["min_fidelity"]),
        out_root=kw["out_root"],
    )
    return plan_model(model, settings)


def print_plan(plan: BuildPlan, plan_path: Path | None, script_path: Path | None) -> None:
    from trtbuild.trtexec import command_line

    table = Table(
        title=f"build plan: {plan.model} -> {plan.target} {plan.precision.upper()} "
        f"(TensorRT {plan.trt_version})",
        show_header=False,
    )
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("GPU", f"{plan.gpu} (compute capability {plan.compute_capability})"),
        ("ONNX", f"{plan.onnx} [{plan.onnx_kind}]"),
        ("network", "strongly typed" if plan.strongly_typed else "weakly typed (builder flags)"),
        ("builder flags", ", ".join(plan.builder_flags) or "-"),
        ("calibration cache", plan.calib_cache or "-"),
        *[
            (
                f"input {s.name}",
                f"min {fmt_shape(s.min)}  opt {fmt_shape(s.opt_shape)}  max {fmt_shape(s.max)}",
            )
            for s in plan.inputs
        ],
        ("workspace", f"{plan.workspace_mib} MiB"),
        ("opt level", "-" if plan.opt_level is None else str(plan.opt_level)),
        ("hardware compat", plan.hardware_compat or "-"),
        ("version compat", "yes" if plan.version_compatible else "no"),
        ("sparsity", "yes" if plan.sparsity else "no"),
        (
            "DLA",
            "-"
            if plan.dla_core is None
            else f"core {plan.dla_core}" + (" + GPU fallback" if plan.gpu_fallback else ""),
        ),
        ("timing cache", plan.timing_cache),
        ("engine", plan.engine),
        ("memory", for_build_plan(plan).describe()),
        *[("note", n) for n in plan.notes],
    ]
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    out.print("[bold]trtexec:[/bold] " + command_line(plan), highlight=False, soft_wrap=True)
    if plan_path and script_path:
        out.print(f"saved {plan_path} and {script_path}", highlight=False)


@click.command("plan")
@click.argument("model", type=click.Path(dir_okay=False))
@_plan_options
def plan_cmd(model: str, as_json: bool, **kw: Any) -> None:
    """Decide and save a TensorRT build plan for MODEL.onnx, with the trtexec command for the device."""
    plan = plan_from_options(model, **kw)
    plan_path, script_path = save_plan_files(plan)
    if as_json:
        emit_json(
            {
                "plan": plan.to_json(),
                "plan_path": str(plan_path),
                "trtexec_script": str(script_path),
                "memory": for_build_plan(plan).to_json(),
            }
        )
    else:
        print_plan(plan, plan_path, script_path)


@click.command("build")
@click.argument("model_or_plan", type=click.Path(dir_okay=False))
@click.option("--target", "-t", help="Target id (when MODEL is an ONNX file).")
@click.option("--precision", "-p", help="Precision (when MODEL is an ONNX file).")
@click.option(
    "--out",
    "out_root",
    default=str(OUTPUT_ROOT),
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output root (when MODEL is an ONNX file).",
)
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log.")
@click.option("--json", "as_json", is_flag=True, help="Print the engine sidecar as JSON.")
def build_cmd(
    model_or_plan: str, target: str | None, precision: str | None, out_root: str, verbose: bool, as_json: bool
) -> None:
    """Build an engine from a saved plan (.plan.json), or plan + build MODEL.onnx with --target/--precision.

    Needs a real TensorRT; without it, exits 2 naming the saved plan and trtexec script to run on the device.
    """
    from trtbuild import trt_backend

    if model_or_plan.endswith(".json"):
        plan = BuildPlan.load(model_or_plan)
        plan_path = Path(model_or_plan)
        script = plan_path.with_name(plan_path.name.removesuffix(".plan.json") + ".trtexec.sh")
        script_path = script if script.is_file() else None
    else:
        if not target or not precision:
            raise TrtbuildError(
                "building from an ONNX file needs --target and --precision",
                "pass them, or give a saved .plan.json from `trtbuild plan`",
            )
        # Every other plan option at its default; use `trtbuild plan` + build PLAN.json for the rest.
        plan = plan_model(model_or_plan, PlanSettings(target=target, precision=precision, out_root=out_root))
        plan_path, script_path = save_plan_files(plan)
    with progress(transient=True) as bar:  # TensorRT gives no fraction-done; a spinner with elapsed time
        bar.add_task(f"building {Path(plan.engine).name}", total=None)
        meta = trt_backend.build_engine(plan, plan_path=plan_path, script_path=script_path, verbose=verbose)
    if as_json:
        emit_json(meta.to_json())
    else:
        out.print(
            f"built {plan.engine} ({meta.engine_bytes / 2**20:.1f} MiB, {meta.build_seconds:.1f} s) on "
            f"{meta.gpu_name}, TensorRT {meta.trt_version}",
            highlight=False,
        )


@click.command("inspect")
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print sidecar + layers as JSON.")
def inspect_cmd(engine: str, as_json: bool) -> None:
    """Show an engine's sidecar (and its layers when TensorRT is installed)."""
    from trtbuild.trt_backend import inspect_engine

    info = inspect_engine(engine)
    if as_json:
        emit_json(info)
        return
    side = info["sidecar"]
    table = Table(title=f"engine {engine}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in (
        "trt_version",
        "gpu_name",
        "compute_capability",
        "precision",
        "onnx",
        "onnx_sha256",
        "build_seconds",
        "engine_bytes",
        "device_memory_bytes",
        "num_layers",
        "created",
    ):
        table.add_row(key, str(side[key]))
    for t in side["tensors"]:
        table.add_row(f"{t['mode']} {t['name']}", f"{'x'.join(str(d) for d in t['shape'])} {t['dtype']}")
    out.print(table)
    layers = info.get("layers")
    if layers is None:
        out.print(info.get("layers_unavailable", ""), highlight=False)
    else:
        out.print(f"{len(layers)} layers (use --json for details)")


COMMANDS: list[click.Command] = [targets_cmd, plan_cmd, build_cmd, inspect_cmd]
