"""`trtbuild qat`: recovery training from the PyTorch source (INT8 QAT, optionally 2:4 sparsity first),
writing the same artifacts as `trtbuild quantize`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from calibrators.collect import DEFAULT_BATCH_SIZE
from calibrators.methods import DEFAULT_METHOD, METHODS
from calibrators.preprocess import Preprocess
from calibrators.quantize import FidelityGateError
from calibrators.quantize_settings import QuantizeSettings
from trtbuild.cli.data_options import data_option, preprocess_options
from trtbuild.core import console
from trtbuild.core.defaults import DEFAULT_TRT_VERSION


@click.command("qat")
@click.argument("source")
@click.option(
    "--input", "inputs", multiple=True, required=True, metavar="NAME:SHAPE[:DTYPE]", help="As for export."
)
@data_option
@click.option("--dynamic-batch", is_flag=True, help="Make axis 0 of every input dynamic (as for export).")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict (.pt/.pth) to load first.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="[engines/<name>/qat]")
@click.option("--sparsity", type=click.Choice(["2:4"]), default=None, help="Prune to 2:4 first, recover.")
@click.option(
    "--sparse-budget",
    type=float,
    default=None,  # = trtbuild.qat.sparse_recipe.DEFAULT_BUDGET (no torch import here)
    help="2:4: output-KL budget on the fit samples; layers over their per-weight share stay dense "
    "(reported). Default: prune every eligible layer.",
)
@click.option(
    "--sparse-max-dense",
    type=int,
    default=None,
    metavar="WEIGHTS",
    help="2:4 with --sparse-budget: keep at most this many weights dense (a size target; "
    "EfficientNet-Lite0 stays >= 5x smaller than FP32 at ~180000).",
)
@click.option("--sparse-lr", type=float, default=1e-4, show_default=True, help="2:4 recovery lr.")
@click.option("--steps", type=int, default=200, show_default=True, help="QAT steps (and 2:4 recovery steps).")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--lr", type=float, default=2e-6, show_default=True, help="Weight learning rate (Adam).")
@click.option("--step-lr", type=float, default=2e-6, show_default=True, help="LSQ step-size learning rate.")
@click.option(
    "--eval-every", type=int, default=25, show_default=True, help="Held-out fidelity every N steps."
)
@click.option("--patience", type=int, default=3, show_default=True, help="Stop after N evaluations w/o gain.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in <out-dir>/checkpoints.")
@click.option("--holdout", type=int, default=QuantizeSettings.holdout, show_default=True)
@click.option("--samples", type=int, default=None, help="Train on N samples (default: all but held-out).")
@click.option("--min-fidelity", multiple=True, help="The final gate, as for quantize.")
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True)
@click.option("--exclude", multiple=True, help="Regex of node names to keep in float (repeatable).")
@click.option("--exclude-op-type", multiple=True, help="Op type to keep in float (repeatable).")
@click.option("--output-name", "output_names", multiple=True, help="Output names in order.")
@click.option("--trt-version", default=DEFAULT_TRT_VERSION, show_default=True)
@click.option(
    "--start",
    type=click.Choice(["learned", "nearest"]),
    default="learned",
    show_default=True,
    help="Start from learned-rounding PTQ (integers + bias correction folded in) or round-to-nearest.",
)
@click.option(
    "--smooth-quant",
    type=click.Choice(["auto", "on", "off"]),
    default=QuantizeSettings.smooth_quant,
    show_default=True,
    help="As for quantize; the student trains the smoothed model.",
)
@click.option(
    "--loss", type=click.Choice(["kl", "mse"]), default="kl", show_default=True, help="Distillation."
)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Of the KL on logits.")
@click.option(
    "--margin-term",
    type=click.Choice(["none", "margin", "topk"]),  # = trtbuild.qat.margin_loss.TERMS (no torch import here)
    default="none",  # = margin_loss.DEFAULT_TERM
    show_default=True,
    help="Top-1-aimed term added to the KL on logits (trtbuild/qat/margin_loss.py).",
)
@click.option(
    "--margin-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Its weight (margin_loss.DEFAULT_WEIGHT).",
)
@click.option(
    "--select",
    type=click.Choice(["kl", "top1-kl"]),  # = trtbuild.qat.selection.SELECTIONS (no torch import here)
    default="kl",  # = selection.DEFAULT_SELECTION
    show_default=True,
    help="Rank held-out QAT steps by KL, or by decisive top-1 first and KL second.",
)
@click.option(
    "--select-on",
    type=click.Choice(["student", "graph"]),  # = trtbuild.qat.graph_score.SELECT_ON (no torch import here)
    default="student",  # = graph_score.DEFAULT_SELECT_ON
    show_default=True,
    help="Score held-out QAT steps on the torch student, or on the exported Q/DQ graph that ships "
    "(one export per evaluation).",
)
@click.option(
    "--augment",
    type=click.Choice(["auto", "off"]),
    default="off",
    show_default=True,
    help="QAT on fresh augmented views of the training samples (image models) or on the fixed samples.",
)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "constant"]),
    default="constant",
    show_default=True,
    help="QAT learning-rate schedule over --steps.",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True)
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def qat_command(
    source: str,
    inputs: tuple[str, ...],
    data_path: Path,
    dynamic_batch: bool,
    weights: str | None,
    out_dir: Path | None,
    sparsity: str | None,
    sparse_budget: float | None,
    sparse_max_dense: int | None,
    sparse_lr: float,
    steps: int,
    batch_size: int,
    lr: float,
    step_lr: float,
    eval_every: int,
    patience: int,
    checkpoint_every: int,
    resume: bool,
    holdout: int,
    samples: int | None,
    min_fidelity: tuple[str, ...],
    method: str,
    exclude: tuple[str, ...],
    exclude_op_type: tuple[str, ...],
    output_names: tuple[str, ...],
    trt_version: str,
    start: str,
    smooth_quant: str,
    loss: str,
    temperature: float,
    margin_term: str,
    margin_weight: float,
    select: str,
    select_on: str,
    augment: str,
    schedule: str,
    device: str,
    seed: int,
    preprocess: Preprocess,
    as_json: bool,
) -> None:
    """Fine-tune SOURCE (module:attr or file.py:attr) for INT8 by distillation against its FP32 self on the
    unlabeled --data, then write the fine-tuned ONNX plus quantize's Q/DQ ONNX, cache, ranges and report."""
    from calibrators import cache
    from export.sources import resolve_source
    from trtbuild.qat import qat

    cache.header(trt_version)
    name = resolve_source(source).name
    target = out_dir or Path("engines") / name / "qat"
    with console.progress() as bar:
        task = bar.add_task("export + calibrate", total=None)

        def on_step(stage: str, step: int, total: int, loss: float, evaluation: object) -> None:
            shown = f"{stage}: loss {loss:.3g}"
            if evaluation is not None:
                shown += f", held-out {getattr(evaluation, 'summary', '')}"
            bar.update(task, completed=step, total=total, description=shown)

        try:
            result = qat(
                source,
                list(inputs),
                data_path,
                target,
                weights=weights,
                dynamic_batch=dynamic_batch,
                sparsity=sparsity,
                sparse_budget=sparse_budget,
                sparse_max_dense=sparse_max_dense,
                sparse_lr=sparse_lr,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                step_lr=step_lr,
                eval_every=eval_every,
                patience=patience,
                checkpoint_every=checkpoint_every,
                resume=resume,
                holdout=holdout,
                samples=samples,
                min_fidelity=list(min_fidelity) or None,
                method=method,
                exclude=exclude,
                exclude_op_types=exclude_op_type,
                output_names=list(output_names) or None,
                preprocess=preprocess,
                trt_version=trt_version,
                seed=seed,
                device=device,
                start=start,
                smooth_quant=smooth_quant,
                loss=loss,
                temperature=temperature,
                margin_term=margin_term,
                margin_weight=margin_weight,
                select=select,
                select_on=select_on,
                augment=augment,
                schedule=schedule,
                on_step=None if as_json else on_step,
            )
        except FidelityGateError as exc:
            console.err.print(exc.report.table())
            raise
    if as_json:
        console.emit_json(result.to_json())
        return
    table = Table(title=f"QAT {name}: held-out fidelity vs the original FP32")
    table.add_column("model")
    table.add_column("fidelity")
    table.add_row("PTQ (calibrated ranges)", result.ptq.summary())
    table.add_row("QAT (learned ranges)", result.qat.summary())
    console.out.print(table)
    info = result.to_json()
    if info["sparsity"]:
        s = info["sparsity"]
        skipped = "; ".join(f"{x['module']}: {x['reason']}" for x in s["skipped"][:3]) or "-"
        console.out.print(
            f"2:4: {s['pruned_layers']} layers pruned ({s['pruned_weights']:,} weights zeroed); "
            f"{len(s['skipped'])} skipped (e.g. {skipped})"
        )
    console.out.print(
        f"wrote {result.onnx_path}, {result.quantized.onnx_path}, {result.quantized.cache_path}, "
        f"{result.quantized.ranges_path}, {result.quantized.report_path}, {result.report_path} "
        f"in {result.seconds:.0f}s"
    )


COMMANDS = [qat_command]
