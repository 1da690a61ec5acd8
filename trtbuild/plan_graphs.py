"""Write the graph a build plan parses when the plan derives it from another one.

`make_plan` is pure: it only decides which graph to parse. Two plans name a graph that may not exist yet:
an FP16 plan on a strongly typed TensorRT (the FP16 graph of the source model), and a strongly typed
INT8/FP8 plan whose Q/DQ graph has FP32 float parts (the same Q/DQ graph with FP16 float parts, see
`trtbuild.plan.fp16_qdq_path`). This module writes them with `export.fp16.convert_fp16` (overflow-prone
ops kept FP32) and checks the result against its source in ONNX Runtime on seeded inputs of the plan's
shapes, so a graph that breaks in FP16 is refused here and not on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec
from trtbuild.core.output_set import check_writable_folder
from trtbuild.core.trt_versions import strongly_typed_only
from trtbuild.memory_plan import check_fits, for_build_plan
from trtbuild.plan import (
    BuildPlan,
    PlanSettings,
    check_precision_supported,
    fp16_qdq_source,
    make_plan,
    model_dir,
)
from trtbuild.targets import Target, check_precision, get_target

MIN_COSINE = 0.99  # FP16 float parts against FP32 ones, same Q/DQ: measured 0.9989 on EfficientNet-Lite0


def derived_source(plan: BuildPlan, base: Path | None = None) -> Path | None:
    """The graph ``plan.onnx`` is converted from, or None when the plan parses a graph as given."""
    graph = Path(plan.onnx) if base is None else base / plan.onnx
    if plan.onnx_kind == "qdq":
        return fp16_qdq_source(graph)
    if plan.onnx_kind == "fp16":
        return Path(plan.source_onnx) if base is None else base / plan.source_onnx
    return None


def write_plan_graph(plan: BuildPlan, base: Path | None = None, seed: int = 0) -> Path | None:
    """Write ``plan.onnx`` from its source if it is a derived graph that does not exist yet; return its
    path (None when the plan parses a given graph). ``base``: folder the plan's paths are relative to."""
    graph = Path(plan.onnx) if base is None else base / plan.onnx
    source = derived_source(plan, base)
    if source is None or graph.exists():
        return None if source is None else graph
    if not source.is_file():
        raise TrtbuildError(f"the plan's graph {graph.name} derives from {source}, which does not exist")
    from export.fp16 import convert_fp16, verify_fp16

    convert_fp16(source, graph)
    feeds, batch = seeded_feeds(plan.inputs, seed)
    try:
        check = verify_fp16(source, graph, feeds, min_cosine=MIN_COSINE, batch=batch)
    except BaseException:  # an unverified graph must not stay: the next plan would take it as written
        graph.unlink(missing_ok=True)
        raise
    if not check.passed:
        graph.unlink(missing_ok=True)
        fix = (
            "re-run with --high-precision fp32 (the unquantized layers run in FP32: slower, no FP16 "
            "drift), or give --qdq-onnx a Q/DQ graph whose float parts are already FP16"
            if plan.onnx_kind == "qdq"
            else "plan --precision fp32, or give --fp16-onnx an FP16 graph with the drifting ops kept FP32"
        )
        raise TrtbuildError(
            f"the FP16 version of {source.name} drifts from it (min cosine {check.cosine_min:.4f} < "
            f"{MIN_COSINE} on {check.samples} seeded inputs)",
            fix,
        )
    return graph


def seeded_feeds(inputs: Sequence[InputSpec], seed: int, runs: int = 4) -> tuple[dict[str, np.ndarray], int]:
    """``runs`` batches of each input's optimum shape (standard-normal floats, integers in [0, 8)), and
    that batch size: a graph with a fixed batch only takes batches of it. ``inputs``: a plan's, or a graph's
    own input specs (Triton ONNX Runtime models, Qualcomm graphs)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    batch = max(1, inputs[0].opt_shape[0]) if inputs and inputs[0].opt_shape else 1
    for spec in inputs:
        # a scalar, or an input whose axis 0 is not the batch (Silero VAD's `sr`, `state` [2, batch, 128]),
        # is fed as its optimum shape every run: stacking runs along its axis 0 broke its fixed size
        stacked = bool(spec.opt_shape) and spec.opt_shape[0] == batch
        shape = (batch * runs, *spec.opt_shape[1:]) if stacked else spec.opt_shape
        if np.issubdtype(spec.np_dtype, np.integer):
            feeds[spec.name] = np.asarray(rng.integers(0, 8, shape), spec.np_dtype)
        else:
            feeds[spec.name] = np.asarray(rng.standard_normal(shape), spec.np_dtype)
    return feeds, batch


def plan_model(model: str | Path, settings: PlanSettings) -> BuildPlan:
    """Make the plan and write the graph it derives: a strongly typed FP16 build (TensorRT 11) gets the
    FP16 graph converted here when none was given; a strongly typed INT8 build gets the Q/DQ graph with FP16
    float parts (see :func:`write_plan_graph`)."""
    check_writable_folder(settings.out_root, "--out")
    fp16_onnx = settings.fp16_onnx
    if fp16_onnx is not None and not Path(fp16_onnx).is_file():
        raise TrtbuildError(f"FP16 graph '{fp16_onnx}' does not exist", "check the path, or omit --fp16-onnx")
    target = get_target(settings.target)
    qdq_onnx = settings.qdq_onnx
    if settings.data is not None:
        if qdq_onnx is not None:
            raise TrtbuildError(
                "--data and --qdq-onnx were both given", "give one: --data quantizes at FP8 itself"
            )
        qdq_onnx = str(_quantize_fp8(model, target, settings))
    if (
        settings.precision.lower() == "fp16"
        and fp16_onnx is None
        and strongly_typed_only(target.resolve_trt(settings.trt_version))
    ):
        from export.fp16 import fp16_path

        fp16_onnx = str(fp16_path(model_dir(model, settings.out_root) / Path(model).name))
    plan = make_plan(
        model,
        target,
        settings.precision,
        trt_version=settings.trt_version,
        shapes=list(settings.shapes) or None,
        workspace_mib=settings.workspace_mib,
        opt_level=settings.opt_level,
        timing_cache=settings.timing_cache,
        hardware_compat=settings.hardware_compat,
        version_compat=settings.version_compat,
        sparsity=settings.sparsity,
        dla_core=settings.dla_core,
        gpu_fallback=settings.gpu_fallback,
        calib_cache=settings.calib_cache,
        qdq_onnx=qdq_onnx,
        fp16_onnx=fp16_onnx,
        out_root=settings.out_root,
        high_precision=settings.high_precision,
    )
    write_plan_graph(plan)  # the FP16 graph, or the Q/DQ graph with FP16 float parts, when derived
    check_fits(for_build_plan(plan), plan.model)  # refuse an engine that cannot fit the device
    return plan


def _quantize_fp8(model: str | Path, target: Target, settings: PlanSettings) -> Path:
    """The FP8 Q/DQ graph of ``model`` from ``settings.data``, in the plan's model folder (refused first on a
    GPU or TensorRT without FP8, before the data pass)."""
    from calibrators.quantize import quantize
    from calibrators.quantize_settings import QuantizeSettings

    precision = check_precision(settings.precision)
    if precision != "fp8":
        raise TrtbuildError(
            f"--data quantizes an FP8 graph; for {precision} it does not apply",
            "drop --data (int8: pass --qdq-onnx from `trtbuild quantize`)",
        )
    check_precision_supported(target, precision, target.resolve_trt(settings.trt_version))
    result = quantize(
        model,
        Path(settings.data or ""),
        model_dir(model, settings.out_root),
        QuantizeSettings(
            activation_type="fp8", min_fidelity=list(settings.min_fidelity) or None, auto_fallback=True
        ),
        show_progress=False,
    )
    return result.onnx_path
