"""`profile_models`: the Python API behind `trtbuild profile`. Validates every input before any work,
then profiles each (model, batch) in turn and compares every candidate's outputs with the ONNX baseline."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtbuild.core import console
from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.accuracy import AccuracyResult, compare_onnx
from trtbuild.harness.inputs import accuracy_feeds, make_feed
from trtbuild.harness.measure import Measurement, measure, measure_interleaved
from trtbuild.harness.memory_probe import probe_peak_rss
from trtbuild.harness.report import CandidateResult, ProfileReport
from trtbuild.harness.runner import Runner, RunnerTensor
from trtbuild.harness.settings import RUNTIMES, ProfileSettings
from trtbuild.harness.torch_runner import TORCH_SUFFIXES
from trtbuild.harness.trt_runner import ENGINE_SUFFIXES, require_tensorrt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    path: Path
    runtime: str  # ort | torch | trt

    @property
    def name(self) -> str:
        return self.path.name


def runtime_for(path: Path, runtime: str) -> str:
    """The runtime for one file: ``auto`` picks by suffix; an explicit one must fit the file."""
    suffix = path.suffix.lower()
    by_suffix = (
        "ort"
        if suffix == ".onnx"
        else "trt"
        if suffix in ENGINE_SUFFIXES
        else "torch"
        if suffix in TORCH_SUFFIXES
        else None
    )
    if by_suffix is None:
        raise TrtbuildError(
            f"cannot tell what {path.name} is from its suffix '{suffix}'",
            f"profile .onnx, {'/'.join(ENGINE_SUFFIXES)} engines or {'/'.join(TORCH_SUFFIXES)} PyTorch files",
        )
    if runtime not in ("auto", by_suffix):
        raise TrtbuildError(
            f"--runtime {runtime} cannot run {path.name} (a {by_suffix} model)",
            f"use --runtime {by_suffix} or --runtime auto",
        )
    return by_suffix


def plan_candidates(paths: Sequence[str | Path], runtime: str = "auto") -> list[Candidate]:
    if runtime not in RUNTIMES:
        raise TrtbuildError(f"unknown runtime '{runtime}'", f"choose one of: {', '.join(RUNTIMES)}")
    if not paths:
        raise TrtbuildError("no model to profile", "pass one or more .onnx / .engine / .pt files")
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise TrtbuildError(f"model file {path} does not exist", "check the path")
        out.append(Candidate(path, runtime_for(path, runtime)))
    if len({c.name for c in out}) != len(out):
        raise TrtbuildError(
            "two models have the same file name", "rename one so the report rows are distinct"
        )
    return out


def _require_cuda_runtimes(runtimes: set[str]) -> None:
    """--device cuda: fail before any work when ONNX Runtime or PyTorch here cannot use a GPU."""
    if "ort" in runtimes:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise TrtbuildError(
                "--device cuda needs onnxruntime-gpu, but this ONNX Runtime has no CUDAExecutionProvider",
                "install onnxruntime-gpu on a CUDA machine, or use --device cpu",
            )
    if "torch" in runtimes:
        import torch

        if not torch.cuda.is_available():
            raise TrtbuildError(
                "--device cuda: PyTorch here has no CUDA device",
                "use a CUDA build of torch on a GPU machine, or --device cpu",
            )


def _make_runner(
    cand: Candidate,
    device: str,
    threads: int | None,
    cuda_backend: str,
    cuda_graph: bool,
    torch_inputs: list[RunnerTensor] | None,
) -> Runner:
    if cand.runtime == "ort":
        from trtbuild.harness.ort_runner import OrtRunner

        return OrtRunner(cand.path, provider=device, threads=threads)
    if cand.runtime == "torch":
        from trtbuild.harness.torch_runner import TorchRunner

        return TorchRunner(
            cand.path,
            torch_inputs or [],
            device=device,
            cuda_graph=cuda_graph,
            threads=threads,
            cuda_backend=cuda_backend,
        )
    from trtbuild.harness.trt_runner import TrtRunner

    return TrtRunner(cand.path, cuda_backend=cuda_backend, cuda_graph=cuda_graph)


def _environment(device: str) -> dict[str, Any]:
    import numpy
    import onnxruntime

    env: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return env


def profile_models(
    paths: Sequence[str | Path],
    settings: ProfileSettings | None = None,
    *,
    torch_inputs: list[RunnerTensor] | None = None,
    show_progress: bool = True,
    **overrides: Any,
) -> ProfileReport:
    """Profile every model at every batch size and compare each to the baseline (default: the first).

    ``settings``: every choice of the run (trtbuild/harness/settings.py, with its defaults); ``overrides``:
    settings fields changed for this call, e.g. ``profile_models(paths, batches=(1, 8), threads=2)``.
    ``runtime`` is ``auto`` (by suffix: .onnx -> ort, .engine/.plan -> trt, .pt/.pt2 -> torch) or forces one.
    ``device`` is cpu or cuda for ort/torch (TensorRT always runs on CUDA). Accuracy (Polygraphy Comparator,
    ONNX Runtime CPU on both sides) is computed for ONNX candidates against an ONNX baseline.
    """
    s = ProfileSettings.from_overrides(settings, overrides)
    candidates = plan_candidates(paths, s.runtime)
    device, threads, cuda_backend, data, seed = s.device, s.threads, s.cuda_backend, s.data, s.seed
    if any(c.runtime == "torch" for c in candidates) and not torch_inputs:
        raise TrtbuildError(
            "a PyTorch model needs its input shapes",
            "give --input name:1x3x224x224 (the batch is replaced by --batch)",
        )
    if device == "cuda":
        _require_cuda_runtimes({c.runtime for c in candidates})
    if any(c.runtime == "trt" for c in candidates):
        require_tensorrt(next(c.name for c in candidates if c.runtime == "trt"))
    base_name = Path(s.baseline).name if s.baseline is not None else candidates[0].name
    if base_name not in {c.name for c in candidates}:
        raise TrtbuildError(
            f"baseline {base_name} is not one of the profiled models",
            "pass --baseline with one of the model paths",
        )
    if data is not None:
        from trtbuild.harness.inputs import load_data

        load_data(data)  # fail on a bad file now, not after profiling the first model

    report = ProfileReport(
        candidates=[],
        baseline=base_name,
        environment=_environment(device),
        settings=s.to_json(),
    )
    bar = console.progress() if show_progress else None
    timing = _Timing(
        device=device,
        threads=threads,
        cuda_backend=cuda_backend,
        cuda_graph=s.cuda_graph,
        torch_inputs=torch_inputs,
        data=data,
        seed=seed,
        iterations=s.iterations,
        warmup_s=s.warmup_s,
        duration_s=s.duration_s,
        max_s=s.max_s,
    )
    results: dict[tuple[int, int], CandidateResult] = {}
    with bar if bar is not None else nullcontext():
        if _interleavable(candidates, device):
            for b in s.batches:
                for index, result in enumerate(_profile_interleaved(candidates, b, bar, timing)):
                    results[(index, b)] = result
        else:
            for index, cand in enumerate(candidates):
                for b in s.batches:
                    results[(index, b)] = _profile_one(cand, b, bar, timing)
    report.candidates.extend(results[(i, b)] for i in range(len(candidates)) for b in s.batches)
    if s.accuracy:
        _add_accuracy(
            report,
            candidates,
            base_name,
            data,
            s.accuracy_samples,
            seed,
            lambda c: _make_runner(
                c, "cuda" if c.runtime == "trt" else device, threads, cuda_backend, False, torch_inputs
            ),
        )
    return report


@dataclass(frozen=True)
class _Timing:
    """How every candidate is run and timed (from ProfileSettings)."""

    device: str
    threads: int | None
    cuda_backend: str
    cuda_graph: bool
    torch_inputs: list[RunnerTensor] | None
    data: str | Path | None
    seed: int
    iterations: int
    warmup_s: float
    duration_s: float
    max_s: float | None

    def runner(self, cand: Candidate) -> Runner:
        device = "cuda" if cand.runtime == "trt" else self.device
        return _make_runner(cand, device, self.threads, self.cuda_backend, self.cuda_graph, self.torch_inputs)

    def guard_s(self) -> float | None:
        return None if self.max_s is None else max(self.max_s, self.duration_s + 1.0)


def _interleavable(candidates: Sequence[Candidate], device: str) -> bool:
    """CPU candidates are timed in alternating rounds (measure_interleaved): the machine they share is the
    noisy part. GPU candidates keep one at a time: each holds device memory, and the GPU is not shared."""
    return len(candidates) > 1 and device == "cpu" and all(c.runtime in ("ort", "torch") for c in candidates)


def _profile_interleaved(
    candidates: Sequence[Candidate], batch: int, bar: Any, timing: _Timing
) -> list[CandidateResult]:
    tasks = [
        bar.add_task(f"{c.name} b{batch}", total=timing.iterations) if bar is not None else None
        for c in candidates
    ]

    def progress(index: int, done: int) -> None:
        if bar is not None:
            bar.update(tasks[index], completed=min(done, timing.iterations))

    with ExitStack() as stack:
        runners = [stack.enter_context(timing.runner(c)) for c in candidates]
        feeds = [make_feed(r.input_info(), batch, timing.data, seed=timing.seed) for r in runners]
        measured = measure_interleaved(
            list(zip(runners, feeds, strict=True)),
            batch=batch,
            warmup_s=timing.warmup_s,
            iterations=timing.iterations,
            duration_s=timing.duration_s,
            max_s=timing.guard_s(),
            on_iteration=progress,
        )
    # Peak memory is probed in a fresh process per model, after every runner here has let go.
    return [
        _result(c, r, f, m, batch, timing)
        for c, r, f, m in zip(candidates, runners, feeds, measured, strict=True)
    ]


def _profile_one(cand: Candidate, batch: int, bar: Any, timing: _Timing) -> CandidateResult:
    task = bar.add_task(f"{cand.name} b{batch}", total=timing.iterations) if bar is not None else None
    with timing.runner(cand) as runner:
        feed = make_feed(runner.input_info(), batch, timing.data, seed=timing.seed)
        m = measure(
            runner,
            feed,
            batch=batch,
            warmup_s=timing.warmup_s,
            iterations=timing.iterations,
            duration_s=timing.duration_s,
            max_s=timing.guard_s(),
            on_iteration=(lambda i: bar.update(task, completed=min(i, timing.iterations))) if bar else None,
        )
    return _result(cand, runner, feed, m, batch, timing)


def _result(
    cand: Candidate, runner: Runner, feed: Any, m: Measurement, batch: int, timing: _Timing
) -> CandidateResult:
    if runner.device == "cpu" and cand.runtime in ("ort", "torch"):
        peak = probe_peak_rss(cand.runtime, cand.path, feed, timing.threads)
        if isinstance(peak, str):
            m.warnings.append(f"{cand.name}: peak memory not measured ({peak})")
        else:
            m.peak_host_bytes = peak
    for w in m.warnings:
        log.warning(w)
    return CandidateResult(
        name=cand.name,
        model=str(cand.path),
        runtime=cand.runtime,
        device=runner.device,
        batch=batch,
        size_bytes=_model_size(cand.path),
        stats=m.stats(),
        latencies_ms=m.latencies_ms().tolist(),
        split=m.split_stats(),
        peak_host_bytes=m.peak_host_bytes,
        device_bytes=m.device_bytes,
        warmup_iterations=m.warmup_iterations,
        wall_s=m.wall_s,
        warnings=m.warnings,
    )


def _model_size(path: Path) -> int:
    """File size plus ONNX external-data files beside it (large models keep weights outside the .onnx)."""
    size = path.stat().st_size
    if path.suffix == ".onnx":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:
            return size
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        size += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return size


def _add_accuracy(
    report: ProfileReport,
    candidates: list[Candidate],
    base_name: str,
    data: str | Path | None,
    samples: int,
    seed: int,
    make_runner: Callable[[Candidate], Runner],
) -> None:
    """Every candidate against the ONNX baseline on the same real samples. ONNX candidates run on ORT CPU
    (Polygraphy's own runner); engines and PyTorch models run on their own runtime, wrapped for Polygraphy."""
    base = next(c for c in candidates if c.name == base_name)
    if base.runtime != "ort":
        report.warnings.append(
            "accuracy is compared against an ONNX baseline; the baseline is not ONNX, skipped"
        )
        return
    from trtbuild.harness.ort_runner import OrtRunner

    with OrtRunner(base.path) as ref:
        feeds = accuracy_feeds(ref.input_info(), samples, data, seed=seed + 1)
    results: dict[str, AccuracyResult] = {}
    for cand in candidates:
        target: Path | Runner = cand.path if cand.runtime == "ort" else make_runner(cand)
        results[cand.name] = compare_onnx(base.path, target, feeds)
        if cand.runtime == "ort":
            import onnx

            from calibrators.ort_cpu import saturation_warning

            warning = saturation_warning(onnx.load(str(cand.path), load_external_data=False))
            if warning:
                report.warnings.append(f"{cand.name}: {warning}")
    for row in report.candidates:
        row.accuracy = results.get(row.name)
