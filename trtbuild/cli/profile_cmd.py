"""`trtbuild profile`: latency percentiles, throughput, memory and accuracy of models side by side."""

from __future__ import annotations

from pathlib import Path

import click

from trtbuild.core import console
from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.cuda_backend import BACKENDS
from trtbuild.harness.profile import profile_models
from trtbuild.harness.runner import RunnerTensor
from trtbuild.harness.settings import DEVICES, RUNTIMES, ProfileSettings

P = ProfileSettings  # the defaults of the profile flags live in the settings object


def _torch_inputs(specs: tuple[str, ...]) -> list[RunnerTensor] | None:
    if not specs:
        return None
    import numpy as np

    from trtbuild.core.inputs import parse_input_spec

    infos = []
    for text in specs:
        spec = parse_input_spec(text)
        infos.append(RunnerTensor(spec.name, np.dtype(spec.dtype), ("batch", *spec.opt_shape[1:])))
    return infos


def _check_output(path: Path | None, suffix: str, option: str) -> None:
    if path is None:
        return
    if path.suffix.lower() != suffix:
        raise TrtbuildError(f"{option} {path} does not end in {suffix}", f"name the file like report{suffix}")
    if path.exists() and path.is_dir():
        raise TrtbuildError(f"{option} {path} is a folder", f"give a file path ending in {suffix}")


@click.command("profile")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default=P.runtime,
    show_default=True,
    help="Runtime for every model; auto picks by suffix (.onnx ort, .engine trt, .pt/.pt2 torch).",
)
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size; repeat to profile several.")
@click.option(
    "--iterations",
    type=int,
    default=P.iterations,
    show_default=True,
    help="Run at least this many iterations.",
)
@click.option(
    "--warmup-s", type=float, default=P.warmup_s, show_default=True, help="Warm up for this many seconds."
)
@click.option(
    "--duration-s", type=float, default=P.duration_s, show_default=True, help="Also run at least this long."
)
@click.option(
    "--max-s", type=float, default=P.max_s, show_default=True, help="Stop one model after this long."
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads for ONNX Runtime / torch (default: all)."
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=P.device,
    show_default=True,
    help="Where ort/torch run (cuda: ORT CUDA provider / torch CUDA). Engines always run on CUDA.",
)
@click.option(
    "--cuda-backend",
    type=click.Choice(BACKENDS),
    default=P.cuda_backend,
    show_default=True,
    help="CUDA layer for buffers, streams and events.",
)
@click.option("--cuda-graph", is_flag=True, help="Capture and replay a CUDA graph (trt, torch on cuda).")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Inputs: .npy (one input) or .npz (arrays named like the inputs). "
    "Default: real photos for image inputs, seeded random otherwise.",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME:SHAPE",
    help="Input of a PyTorch model, e.g. images:1x3x224x224 (batch replaced by --batch).",
)
@click.option(
    "--baseline",
    type=click.Path(path_type=Path),
    default=None,
    help="The FP32 reference for ratios and accuracy (default: the first model).",
)
@click.option(
    "--accuracy-samples",
    type=int,
    default=P.accuracy_samples,
    show_default=True,
    help="Samples compared against the baseline with Polygraphy.",
)
@click.option("--no-accuracy", is_flag=True, help="Skip the accuracy comparison.")
@click.option(
    "--seed", type=int, default=P.seed, show_default=True, help="Seed for photo crops / random inputs."
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Save the full report (with every latency) as JSON.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Save a latency histogram + percentile plot as PNG.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (for CI).")
def profile(
    models: tuple[Path, ...],
    runtime: str,
    batches: tuple[int, ...],
    iterations: int,
    warmup_s: float,
    duration_s: float,
    max_s: float,
    threads: int | None,
    device: str,
    cuda_backend: str,
    cuda_graph: bool,
    data: Path | None,
    inputs: tuple[str, ...],
    baseline: Path | None,
    accuracy_samples: int,
    no_accuracy: bool,
    seed: int,
    report_path: Path | None,
    plot_path: Path | None,
    as_json: bool,
) -> None:
    """Profile MODELS (ONNX, TensorRT engines, PyTorch) and compare them with the FP32 baseline."""
    _check_output(report_path, ".json", "--report")
    _check_output(plot_path, ".png", "--plot")
    settings = ProfileSettings(
        runtime=runtime,
        batches=batches or P.batches,
        iterations=iterations,
        warmup_s=warmup_s,
        duration_s=duration_s,
        max_s=max_s,
        threads=threads,
        device=device,
        cuda_backend=cuda_backend,
        cuda_graph=cuda_graph,
        data=data,
        baseline=baseline,
        accuracy=not no_accuracy,
        accuracy_samples=accuracy_samples,
        seed=seed,
    )
    report = profile_models(
        list(models), settings, torch_inputs=_torch_inputs(inputs), show_progress=not as_json
    )
    written = report.save(report_path, plot_path)
    if as_json:
        console.emit_json(report.to_dict())
        return
    report.print()
    for path in written:
        console.out.print(f"wrote {path}")


COMMANDS: list[click.Command] = [profile]
