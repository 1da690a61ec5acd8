"""Render a BuildPlan as a `trtexec` command for the plan's TensorRT version (run it on the device itself)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from trtbuild.core.atomic import atomic_path
from trtbuild.core.inputs import InputSpec, fmt_shape
from trtbuild.core.trt_versions import MEMPOOL_SUFFIX_SINCE, trtexec_flag_exists
from trtbuild.plan import BuildPlan, plan_stem

_PRECISION_FLAGS = {"FP16": "--fp16", "INT8": "--int8", "BF16": "--bf16", "FP8": "--fp8"}
_HW_COMPAT = {"AMPERE_PLUS": "ampere+", "SAME_COMPUTE_CAPABILITY": "sameComputeCapability"}


def render(plan: BuildPlan, trtexec: str = "trtexec") -> list[str]:
    """The argv of a trtexec build for ``plan``; every flag is checked against the plan's TensorRT version."""
    v = plan.version
    args = [f"--onnx={plan.onnx}", f"--saveEngine={plan.engine}"]
    if plan.dynamic:
        for flag, pick in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            # a scalar input has no dims to profile (and no way to write them)
            spec = ",".join(f"{s.name}:{fmt_shape(_shape(s, pick))}" for s in plan.inputs if s.opt_shape)
            args.append(f"{flag}={spec}")
    for name in plan.builder_flags:
        if name in _PRECISION_FLAGS:
            args.append(_PRECISION_FLAGS[name])
    if plan.calib_cache:
        args.append(f"--calib={plan.calib_cache}")
    # 11.x networks are always strongly typed; the flag is a no-op there, so it is left out.
    if plan.strongly_typed and v.major < 11:
        args.append("--stronglyTyped")
    # A bare number is MiB in every version; 10.0 mis-scales a suffixed one (docs/tensorrt-versions.md).
    unit = "M" if v >= MEMPOOL_SUFFIX_SINCE else ""
    args.append(f"--memPoolSize=workspace:{plan.workspace_mib}{unit}")
    if plan.opt_level is not None:
        args.append(f"--builderOptimizationLevel={plan.opt_level}")
    args.append(f"--timingCacheFile={plan.timing_cache}")
    if plan.hardware_compat:
        args.append(f"--hardwareCompatibilityLevel={_HW_COMPAT[plan.hardware_compat]}")
    if plan.version_compatible:
        args.append("--versionCompatible")
    if plan.dla_core is not None:
        args.append(f"--useDLACore={plan.dla_core}")
        if plan.gpu_fallback:
            args.append("--allowGPUFallback")
    if plan.sparsity:
        args.append("--sparsity=enable")
    missing = [a for a in args if not trtexec_flag_exists(a, v)]
    if missing:  # a bug in the plan or this renderer, never a user error
        raise AssertionError(f"trtexec {v} has no flag(s) {missing}")
    return [trtexec, *args]


def command_line(plan: BuildPlan, trtexec: str = "trtexec") -> str:
    return shlex.join(render(plan, trtexec))


def write_script(plan: BuildPlan, path: str | os.PathLike[str]) -> Path:
    """A runnable `.sh` (atomic, executable) that builds the engine with trtexec on the device."""
    argv = render(plan)
    lines = [
        "#!/usr/bin/env bash",
        f"# trtbuild plan: {plan.target} ({plan.gpu}, sm{plan.compute_capability.replace('.', '')}), "
        f"{plan.precision.upper()}, TensorRT {plan.trt_version}",
        "# Run on the target device with this TensorRT version: engines are tied to GPU arch and version.",
        "set -euo pipefail",
        "mkdir -p " + shlex.join([str(Path(plan.engine).parent), str(Path(plan.timing_cache).parent)]),
        " \\\n    ".join(shlex.quote(a) for a in argv) + ' "$@"',
        "",
    ]
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.chmod(0o755)
    return path


def save_plan_files(plan: BuildPlan) -> tuple[Path, Path]:
    """Write `<engine dir>/plans/<stem>.plan.json` and `<stem>.trtexec.sh` (atomically); return both paths."""
    plans = Path(plan.engine).parent / "plans"
    stem = plan_stem(plan)
    return plan.save(plans / f"{stem}.plan.json"), write_script(plan, plans / f"{stem}.trtexec.sh")


def _shape(spec: InputSpec, pick: str) -> tuple[int, ...]:
    return {"min": spec.min, "opt": spec.opt_shape, "max": spec.max}[pick]
