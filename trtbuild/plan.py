"""BuildPlan: everything a TensorRT build will do, decided up front by a pure function and saved as JSON.

``make_plan`` reads only the ONNX input specs (export sidecar, or the graph) and never touches
TensorRT; the Python-API builder (``trt_backend``) and the trtexec renderer (``trtexec``) both render
the same plan, so what the user reviews is what runs.

Precision strategy per TensorRT version:
- FP16/BF16 on 8.5-10.x: builder flags on the FP32 graph (weakly typed: TensorRT keeps layers that would
  lose accuracy in FP32 itself). An FP16 graph, when given, is built strongly typed on 10.x.
- INT8/FP8 from a Q/DQ graph (explicit): strongly typed on 10.x/11.x, as TensorRT's docs advise; with the
  INT8 (+FP16) flags on 8.x and for DLA. INT8 from our calibration cache (implicit, 8.5-10.x only) goes
  through the calibrator adapter in trt_backend.
- 11.x: precision flags and calibrators are gone; every network is strongly typed, so the precision must
  be in the graph: the FP16 graph (export/fp16.py) or a Q/DQ graph. A calibration cache cannot be used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from trtbuild.core.atomic import write_text
from trtbuild.core.defaults import OUTPUT_ROOT
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec
from trtbuild.core.onnx_file import fixed_size, model_name
from trtbuild.core.trt_versions import TrtVersion, has, known_version, strongly_typed_only
from trtbuild.plan_sparsity import decide_sparsity
from trtbuild.targets import Target, check_precision, get_target

PLAN_FORMAT = 1
HARDWARE_COMPAT = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
_PRECISION_FLAG = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}


@dataclass(frozen=True)
class BuildPlan:
    model: str
    source_onnx: str  # the FP32 model the user planned for
    onnx: str  # the graph TensorRT parses: FP32, the FP16 graph, or a Q/DQ graph
    onnx_kind: str  # "fp32" | "fp16" | "qdq"
    target: str
    gpu: str
    compute_capability: str
    trt_version: str
    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # trt.BuilderFlag member names
    calib_cache: str | None  # implicit INT8 (TensorRT <= 10.x) only
    inputs: tuple[InputSpec, ...]  # one optimization profile: min/opt/max per input
    workspace_mib: int
    opt_level: int | None
    hardware_compat: str | None  # trt.HardwareCompatibilityLevel member name
    version_compatible: bool
    sparsity: bool
    dla_core: int | None
    gpu_fallback: bool
    timing_cache: str
    engine: str
    notes: tuple[str, ...] = ()
    format: int = PLAN_FORMAT
    # the graph declares a dynamic input dim: TensorRT needs the profile even when min == max, and trtexec
    # given none silently builds those dims at 1 (a --shape x:8x3x224x224 plan made a batch-1 engine)
    graph_dynamic: bool = False

    @property
    def version(self) -> TrtVersion:
        return TrtVersion.parse(self.trt_version)

    @property
    def dynamic(self) -> bool:
        """The engine needs an optimization profile: shapes vary, or the graph leaves a dim open."""
        return self.graph_dynamic or any(spec.min != spec.max for spec in self.inputs)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [spec.to_json() for spec in self.inputs]
        data["builder_flags"] = list(self.builder_flags)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildPlan:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown or data.get("format") != PLAN_FORMAT:
            raise TrtbuildError(
                f"not a trtbuild build plan (format {data.get('format')!r}, unknown keys {sorted(unknown)})",
                "re-create it with `trtbuild plan`",
            )
        known_version(str(data["trt_version"]))  # a hand-edited plan gets the same check as --trt-version
        values = dict(data)
        values["inputs"] = tuple(InputSpec.from_json(s) for s in data["inputs"])
        values["builder_flags"] = tuple(data["builder_flags"])
        values["notes"] = tuple(data.get("notes", ()))
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BuildPlan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrtbuildError(
                f"cannot read build plan '{path}' ({exc})", "re-create it with `trtbuild plan`"
            ) from exc
        if not isinstance(data, dict):
            raise TrtbuildError(f"'{path}' is not a build plan", "re-create it with `trtbuild plan`")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise TrtbuildError(
                f"build plan '{path}' is malformed ({exc})", "re-create it with `trtbuild plan`"
            ) from exc


def plan_stem(plan_or_target: BuildPlan | str, precision: str = "", trt_version: str = "") -> str:
    """`h100-int8-trt10.13`: names the plan, its trtexec script and its engine."""
    if isinstance(plan_or_target, BuildPlan):
        p = plan_or_target
        return f"{p.target}-{p.precision}-trt{p.version.short}"
    return f"{plan_or_target}-{precision}-trt{TrtVersion.parse(trt_version).short}"


def model_dir(onnx_path: str | os.PathLike[str], out_root: str | os.PathLike[str] = OUTPUT_ROOT) -> Path:
    """`engines/<model>/`; an ONNX already inside such a folder keeps it."""
    onnx_path = Path(onnx_path)
    stem = model_name(onnx_path)
    if onnx_path.parent.name == stem:
        return onnx_path.parent
    return Path(out_root) / stem


FP16_QDQ_SUFFIX = ".fp16.onnx"


def fp16_qdq_path(qdq_onnx: str | os.PathLike[str]) -> Path:
    """`m.int8.onnx` -> `m.int8.fp16.onnx`: the same Q/DQ graph with FP16 float parts."""
    path = Path(qdq_onnx)
    return path.with_name(path.name.removesuffix(".onnx") + FP16_QDQ_SUFFIX)


def fp16_qdq_source(graph: str | os.PathLike[str]) -> Path | None:
    """The FP32-float Q/DQ graph an FP16-float one is derived from (by name), or None."""
    path = Path(graph)
    if not path.name.endswith(FP16_QDQ_SUFFIX):
        return None
    return path.with_name(path.name.removesuffix(FP16_QDQ_SUFFIX) + ".onnx")


def _qdq_float_is_fp32(qdq_onnx: str | os.PathLike[str]) -> bool:
    """True unless the Q/DQ graph's scales (and so its float parts) are FP16 already."""
    import onnx

    from trtbuild.core.onnx_file import qdq_scale_type

    return qdq_scale_type(onnx.load(str(qdq_onnx), load_external_data=False)) != onnx.TensorProto.FLOAT16


@dataclass(frozen=True)
class PlanSettings:
    """Every choice of one build plan, with its default; `trtbuild plan` and `build` fill it from flags."""

    target: str
    precision: str
    trt_version: str | None = None  # None: the target's default (data-center targets: DEFAULT_TRT_VERSION)
    shapes: tuple[InputSpec, ...] = ()  # empty: the export sidecar, else the graph
    workspace_mib: int | None = None
    opt_level: int | None = None
    timing_cache: str | None = None
    hardware_compat: str = "none"
    version_compat: bool = False
    sparsity: bool = False
    dla_core: int | None = None
    gpu_fallback: bool = True
    calib_cache: str | None = None
    qdq_onnx: str | None = None
    fp16_onnx: str | None = None  # None: derived (converted) where the plan needs one
    # A strongly typed Q/DQ build: the type of the unquantized layers (ModelOpt's high_precision_dtype).
    # fp16 (default) derives the Q/DQ graph with FP16 float parts; fp32 builds the Q/DQ graph as given,
    # for a model whose float parts drift in FP16 (slower, as accurate as its Q/DQ).
    high_precision: str = "fp16"
    data: str | None = None  # FP8 without qdq_onnx: calibration data the FP8 Q/DQ graph is quantized from
    min_fidelity: tuple[str, ...] = ()  # with data: the FP8 graph's fidelity gate (as `trtbuild quantize`)
    out_root: str = str(OUTPUT_ROOT)


def _has_int4_weights(graph: str | os.PathLike[str]) -> bool:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)


def _has_fp8_qdq(graph: str | os.PathLike[str]) -> bool:
    """Whether any Q/DQ of the graph is FP8 (an FP8 graph, or a mixed INT8/FP8 one)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)


HIGH_PRECISIONS = ("fp16", "fp32")  # the unquantized layers of a strongly typed Q/DQ build


def make_plan(
    onnx_path: str | os.PathLike[str],
    target: str | Target,
    precision: str,
    *,
    trt_version: str | None = None,
    shapes: Sequence[InputSpec] | None = None,
    workspace_mib: int | None = None,
    opt_level: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    hardware_compat: str | None = None,
    version_compat: bool = False,
    sparsity: bool | None = None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    calib_cache: str | os.PathLike[str] | None = None,
    qdq_onnx: str | os.PathLike[str] | None = None,
    fp16_onnx: str | os.PathLike[str] | None = None,
    engine_path: str | os.PathLike[str] | None = None,
    out_root: str | os.PathLike[str] = OUTPUT_ROOT,
    high_precision: str = "fp16",
) -> BuildPlan:
    """Decide the whole build. Raises TrtbuildError with a one-line reason for any invalid combination."""
    tgt = target if isinstance(target, Target) else get_target(target)
    prec = check_precision(precision)
    version = tgt.resolve_trt(trt_version)
    notes: list[str] = []

    check_precision_supported(tgt, prec, version)
    if high_precision not in HIGH_PRECISIONS:
        raise TrtbuildError(
            f"unknown high precision '{high_precision}'", f"use one of {', '.join(HIGH_PRECISIONS)}"
        )
    onnx, kind, strongly_typed, flags, cache = _choose_graph_and_flags(
        tgt,
        prec,
        version,
        onnx_path,
        calib_cache,
        qdq_onnx,
        fp16_onnx,
        dla_core is not None,
        notes,
        high_precision,
    )
    flags += _dla_flags(tgt, prec, version, dla_core, gpu_fallback, notes)
    hw = _hardware_compat(tgt, version, hardware_compat, dla_core)
    if version_compat:
        if not has("version_compatible", version):
            raise TrtbuildError(
                f"version-compatible engines need TensorRT 8.6+, not {version}", "drop --version-compat"
            )
        flags.append("VERSION_COMPATIBLE")
    # None: on by itself when the weights follow 2:4 (trtbuild/plan_sparsity.py)
    sparsity = decide_sparsity(sparsity, tgt, [onnx, onnx_path], notes)
    if sparsity:
        flags.append("SPARSE_WEIGHTS")
    level = _opt_level(tgt, version, opt_level)
    workspace = tgt.workspace_mib if workspace_mib is None else workspace_mib
    if workspace <= 0:
        raise TrtbuildError(
            f"workspace must be positive, got {workspace} MiB", "pass --workspace in MiB, e.g. 4096"
        )

    inputs, graph_dynamic = _input_specs(onnx_path, shapes)
    if cache is not None:
        notes += _check_cache(cache, version, onnx_path)
    base = model_dir(onnx_path, out_root)
    stem = plan_stem(tgt.id, prec, str(version))
    return BuildPlan(
        model=model_name(onnx_path),
        source_onnx=str(onnx_path),
        onnx=str(onnx),
        onnx_kind=kind,
        target=tgt.id,
        gpu=tgt.name,
        compute_capability=tgt.compute_capability,
        trt_version=str(version),
        precision=prec,
        strongly_typed=strongly_typed,
        builder_flags=tuple(flags),
        calib_cache=cache,
        inputs=tuple(inputs),
        workspace_mib=workspace,
        opt_level=level,
        hardware_compat=hw,
        version_compatible=version_compat,
        sparsity=sparsity,
        dla_core=dla_core,
        gpu_fallback=dla_core is not None and gpu_fallback,
        timing_cache=str(timing_cache or base / "timing" / f"{tgt.id}-trt{version.short}.cache"),
        engine=str(engine_path or base / f"{stem}.engine"),
        notes=tuple(notes),
        graph_dynamic=graph_dynamic,
    )


def check_precision_supported(tgt: Target, prec: str, version: TrtVersion) -> None:
    """Refuse a precision the GPU or the TensorRT version lacks (before any calibration work is spent)."""
    if prec not in tgt.precisions:
        why = {
            "bf16": "BF16 needs sm80+ (Ampere or newer)",
            "int4-weights": "TensorRT's INT4 weight-only GEMMs need sm80+ (Ampere or newer)",
        }.get(prec, "FP8 needs sm89+ (Ada, Hopper or newer)")
        raise TrtbuildError(
            f"{tgt.name} ({tgt.sm_text}) cannot run {prec.upper()}: {why}",
            f"pick one of {', '.join(tgt.precisions)}",
        )
    if prec == "bf16" and not has("bf16", version):
        raise TrtbuildError(
            f"BF16 needs TensorRT 9.0+, the plan is for {version}", "use fp16 or a newer TensorRT"
        )
    if prec == "fp8" and not has("fp8", version):
        raise TrtbuildError(
            f"FP8 needs TensorRT 10.0+, the plan is for {version}", "use int8 or a newer TensorRT"
        )
    if prec == "int4-weights" and not has("int4_weight_only", version):
        raise TrtbuildError(
            f"INT4 weight-only needs TensorRT 10.0+ (block-quantized INT4 DequantizeLinear), the plan is for "
            f"{version}",
            "use int8 or fp16, or a target whose TensorRT is 10.x (e.g. orin-jp6.1, thor)",
        )


def _choose_graph_and_flags(
    tgt: Target,
    prec: str,
    version: TrtVersion,
    onnx_path: str | os.PathLike[str],
    calib_cache: str | os.PathLike[str] | None,
    qdq_onnx: str | os.PathLike[str] | None,
    fp16_onnx: str | os.PathLike[str] | None,
    dla: bool,
    notes: list[str],
    high_precision: str = "fp16",
) -> tuple[str, str, bool, list[str], str | None]:
    """(graph to parse, its kind, strongly typed?, precision builder flags, calibration cache)."""
    typed_only = strongly_typed_only(version)
    # A graph that carries its precision (FP16 graph, Q/DQ) is built strongly typed from 10.0 on, as
    # TensorRT's docs advise ("precision-control build flags are not required and should not be
    # specified"); 8.x needs the flags, and DLA layers are placed by the FP16/INT8 flags, so DLA plans on
    # 10.x stay weakly typed.
    typed_graph = typed_only or (version.major >= 10 and has("strongly_typed", version) and not dla)
    for label, given in (("calibration cache", calib_cache), ("Q/DQ ONNX", qdq_onnx)):
        if given is not None and not Path(given).is_file():
            raise TrtbuildError(f"{label} '{given}' does not exist", "check the path")
    if calib_cache is not None and prec != "int8":
        raise TrtbuildError(f"a calibration cache only applies to int8, not {prec}", "drop --calib-cache")
    if qdq_onnx is not None and prec not in ("int8", "fp8", "int4-weights"):
        raise TrtbuildError(
            f"a Q/DQ graph only applies to int8/fp8/int4-weights, not {prec}", "drop --qdq-onnx"
        )
    if fp16_onnx is not None and prec != "fp16":
        raise TrtbuildError(f"an FP16 graph only applies to fp16, not {prec}", "drop --fp16-onnx")

    if prec == "fp32":
        notes.append(
            "FP32 graph; TF32 stays allowed for matmul/conv (TensorRT default on sm80+)"
            if tgt.sm >= (8, 0)
            else "FP32 graph"
        )
        return str(onnx_path), "fp32", typed_only, [], None

    if prec == "fp16":
        if fp16_onnx is not None:
            typed = typed_graph
            notes.append(
                "FP16 graph (sensitive ops and I/O kept FP32), "
                + ("strongly typed" if typed else "FP16 flag so TensorRT keeps the graph's FP16 tensors")
            )
            return str(fp16_onnx), "fp16", typed, [] if typed else ["FP16"], None
        if typed_only:
            raise TrtbuildError(
                f"TensorRT {version} is strongly typed only, so FP16 needs an FP16 graph",
                "pass --fp16-onnx, or let `trtbuild plan` convert it (export.fp16.convert_fp16)",
            )
        notes.append(
            "FP32 graph + FP16 builder flag: TensorRT picks FP16 per layer, keeps FP32 where faster/needed"
        )
        return str(onnx_path), "fp32", False, ["FP16"], None

    if prec == "bf16":
        if typed_only:
            # No maintained BF16 graph converter exists, and ORT CPU cannot run BF16 for most ops, so a BF16
            # graph could not be verified here; on 11.x we refuse rather than ship an unchecked graph.
            raise TrtbuildError(
                f"BF16 on TensorRT {version} needs a BF16-typed graph, which trtbuild does not"
                " write (unverifiable on ORT CPU)",
                "use fp16 on TensorRT 11, or bf16 with TensorRT 10.x (builder flag)",
            )
        notes.append("FP32 graph + BF16 builder flag")
        return str(onnx_path), "fp32", False, ["BF16"], None

    # int8 / fp8 / int4-weights
    if prec == "int4-weights" and (qdq_onnx is None or not _has_int4_weights(qdq_onnx)):
        raise TrtbuildError(
            "int4-weights needs the INT4 weight-only graph",
            "pass --qdq-onnx with the .int4.onnx from `trtbuild quantize --precision int4-weights`",
        )
    if prec == "fp8" and qdq_onnx is not None and not _has_fp8_qdq(qdq_onnx):
        # an INT8 or INT4 graph planned as FP8 would build as that graph's own precision, labelled FP8
        raise TrtbuildError(
            f"-p fp8 needs an FP8 Q/DQ graph, and {Path(qdq_onnx).name} has no FP8 Q/DQ",
            "pass the .fp8.onnx from `trtbuild quantize --precision fp8` (or --data), or plan this graph "
            "with -p int8 / -p int4-weights",
        )
    if qdq_onnx is not None and calib_cache is not None:
        raise TrtbuildError(
            "both a Q/DQ graph and a calibration cache were given",
            "give --qdq-onnx (explicit, preferred) or --calib-cache (implicit), not both",
        )
    if qdq_onnx is not None and prec == "int8" and _has_fp8_qdq(qdq_onnx):
        # A mixed INT8/FP8 graph (`quantize --precision int8,fp8`): its FP8 layers need what FP8 needs.
        check_precision_supported(tgt, "fp8", version)
        if not typed_graph:
            raise TrtbuildError(
                f"the Q/DQ graph has FP8 layers, which need a strongly typed build; TensorRT {version}"
                + (" with DLA" if dla else "")
                + " builds it weakly typed",
                "plan it for TensorRT 10.x or newer without DLA, or quantize with --precision int8",
            )
        notes.append("mixed INT8/FP8 Q/DQ graph: each layer runs in the precision of its own Q/DQ")
    if qdq_onnx is not None and prec == "int8" and _has_int4_weights(qdq_onnx):
        # A mixed INT4/INT8 graph (`quantize --precision int4-weights,int8`): its INT4 weight-only layers
        # need what int4-weights needs; DLA runs only FP16/INT8.
        check_precision_supported(tgt, "int4-weights", version)
        if dla:
            raise TrtbuildError(
                "the Q/DQ graph has INT4 weight-only layers, which DLA cannot run (FP16/INT8 only)",
                "drop --dla-core, or quantize with --precision int8",
            )
        notes.append("mixed INT4 weight-only / INT8 Q/DQ graph: each weight layer runs as its own pattern")
    if qdq_onnx is not None:
        if typed_graph:
            # A strongly typed build takes every tensor's type from the graph: FP32 float parts would run
            # unquantized layers in FP32/TF32. Build from the same Q/DQ graph with FP16 float parts
            # (written by trtbuild.plan_graphs.write_plan_graph; ModelOpt's high_precision_dtype=fp16).
            if high_precision == "fp32" or not _qdq_float_is_fp32(qdq_onnx):
                float_type = "FP32" if _qdq_float_is_fp32(qdq_onnx) else "FP16"
                notes.append(
                    f"Q/DQ graph as given, strongly typed: quantized layers from the Q/DQ nodes, the "
                    f"unquantized ones in {float_type}"
                )
                return str(qdq_onnx), "qdq", True, [], None
            notes.append(
                "Q/DQ graph with FP16 float parts, strongly typed: quantized layers from the Q/DQ nodes, "
                "the unquantized ones in FP16"
            )
            return str(fp16_qdq_path(qdq_onnx)), "qdq", True, [], None
        # TensorRT 8.x (or DLA): the INT8 flag enables Q/DQ processing; FP16 lets unquantized layers use FP16.
        flag = _PRECISION_FLAG[prec]
        notes.append(
            f"Q/DQ graph (explicit {prec.upper()}) + {flag}/FP16 flags: unquantized layers may use FP16"
        )
        return str(qdq_onnx), "qdq", False, [flag, "FP16"], None
    if prec == "fp8":
        raise TrtbuildError(
            "FP8 needs an FP8 Q/DQ graph",
            "pass --data with calibration samples (trtbuild quantizes at FP8 itself), or --qdq-onnx with "
            "the graph from `trtbuild quantize --precision fp8`",
        )
    if calib_cache is not None:
        if typed_only:
            raise TrtbuildError(
                f"TensorRT {version} removed calibrators, so an INT8 calibration cache cannot be used",
                "pass --qdq-onnx with the Q/DQ graph from `trtbuild quantize`",
            )
        if version.major == 10:
            notes.append("implicit INT8 from the calibration cache (calibrators are deprecated since 10.1)")
        else:
            notes.append("implicit INT8 from the calibration cache")
        return str(onnx_path), "fp32", False, ["INT8", "FP16"], str(calib_cache)
    raise TrtbuildError(
        "INT8 needs a Q/DQ graph or a calibration cache",
        "pass --qdq-onnx (from `trtbuild quantize`)" + ("" if typed_only else " or --calib-cache"),
    )


def _dla_flags(
    tgt: Target, prec: str, version: TrtVersion, dla_core: int | None, gpu_fallback: bool, notes: list[str]
) -> list[str]:
    if dla_core is None:
        return []
    if tgt.dla_cores == 0:
        raise TrtbuildError(
            f"{tgt.name} has no DLA", "drop --dla-core (DLA exists on Jetson Xavier and Orin)"
        )
    if tgt.dla_cores_for(version) == 0:  # docs/tensorrt-versions.md: DLA gone in 10.8-11.4.0
        raise TrtbuildError(
            f"TensorRT {version} has no DLA support (10.7 was the last 10.x with DLA; it returns in 11.4.1)",
            "drop --dla-core, or use a JetPack 6 target (TensorRT 10.3) for DLA on Orin",
        )
    if not 0 <= dla_core < tgt.dla_cores:
        raise TrtbuildError(
            f"{tgt.name} has DLA cores 0..{tgt.dla_cores - 1}, not {dla_core}",
            f"use --dla-core 0..{tgt.dla_cores - 1}",
        )
    if prec not in ("fp16", "int8"):
        raise TrtbuildError(f"DLA runs only FP16 or INT8, not {prec.upper()}", "use --precision fp16 or int8")
    notes.append(
        f"layers on DLA core {dla_core}"
        + (
            ", unsupported ones fall back to the GPU"
            if gpu_fallback
            else ", no GPU fallback (build fails on unsupported layers)"
        )
    )
    return ["GPU_FALLBACK"] if gpu_fallback else []


def _hardware_compat(tgt: Target, version: TrtVersion, mode: str | None, dla_core: int | None) -> str | None:
    if mode is None or mode == "none":
        return None
    if mode not in HARDWARE_COMPAT:
        raise TrtbuildError(
            f"unknown hardware compatibility '{mode}'", f"use one of none, {', '.join(HARDWARE_COMPAT)}"
        )
    if tgt.kind != "datacenter":
        raise TrtbuildError(
            f"hardware-compatible engines are not supported on {tgt.name} (Jetson)", "drop --hardware-compat"
        )
    if dla_core is not None:
        raise TrtbuildError(
            "hardware-compatible engines cannot use DLA", "drop --hardware-compat or --dla-core"
        )
    if mode == "ampere_plus":
        if not has("hardware_compat_ampere_plus", version):
            raise TrtbuildError(
                f"hardware compatibility needs TensorRT 8.6+, not {version}", "drop --hardware-compat"
            )
        if tgt.sm < (8, 0):
            raise TrtbuildError(
                f"ampere_plus engines need an sm80+ GPU, {tgt.name} is {tgt.sm_text}",
                "drop --hardware-compat",
            )
    if mode == "same_compute_capability" and not has("hardware_compat_same_compute_capability", version):
        raise TrtbuildError(
            f"same_compute_capability needs TensorRT 10.9+, not {version}",
            "use ampere_plus or a newer TensorRT",
        )
    return HARDWARE_COMPAT[mode]


def _opt_level(tgt: Target, version: TrtVersion, opt_level: int | None) -> int | None:
    if not has("builder_optimization_level", version):
        if opt_level is not None:
            raise TrtbuildError(
                f"builder optimization level needs TensorRT 8.6+, the plan is for {version}",
                "drop --opt-level",
            )
        return None
    level = tgt.opt_level if opt_level is None else opt_level
    if not 0 <= level <= 5:
        raise TrtbuildError(f"builder optimization level must be 0..5, got {level}", "use --opt-level 0..5")
    return level


def _input_specs(
    onnx_path: str | os.PathLike[str], shapes: Sequence[InputSpec] | None
) -> tuple[list[InputSpec], bool]:
    """The profile's inputs (explicit shapes win; else the export sidecar; else the graph), and whether the
    graph leaves any input dim open (named, unset or -1)."""
    from export.meta import fixed_inputs_not_given, graph_inputs, model_input_specs
    from trtbuild.core.onnx_file import load_model_file

    model = load_model_file(onnx_path, external_data=False)  # one line for empty/truncated/invalid files
    specs = list(shapes) if shapes is not None else model_input_specs(onnx_path)
    graph = {v.name: v for v in graph_inputs(model)}
    specs += fixed_inputs_not_given(list(graph.values()), specs)
    names = [s.name for s in specs]
    if sorted(names) != sorted(graph):
        raise TrtbuildError(
            f"shapes name inputs {names} but the model's inputs are {list(graph)}",
            "give one --shape per model input",
        )
    for spec in specs:
        dims = [fixed_size(d) for d in graph[spec.name].type.tensor_type.shape.dim]
        fixed_ok = all(
            d is None or lo == hi == d for d, lo, hi in zip(dims, spec.min, spec.max, strict=False)
        )
        if len(dims) != len(spec.opt_shape) or not fixed_ok:
            shown = "x".join("?" if d is None else str(d) for d in dims)
            raise TrtbuildError(
                f"shape of input '{spec.name}' does not fit the model's {shown} (rank or fixed dims)",
                "give shapes that match the model's input",
            )
    # Normalise so the plan carries explicit min/opt/max (and JSON round-trips to an equal object). The
    # dtype is the graph's: --shape carries none (it read as float32, and the FP16 check of a BERT plan fed
    # float input_ids to an int64 input: ORT's traceback).
    specs = [
        InputSpec(s.name, s.opt_shape, _graph_dtype(graph[s.name], s.dtype), s.min, s.max) for s in specs
    ]
    declared = (d for v in graph.values() for d in v.type.tensor_type.shape.dim)
    return specs, any(fixed_size(d) is None for d in declared)


def _graph_dtype(value: Any, fallback: str) -> str:
    from export.meta import value_dtype
    from trtbuild.core.inputs import DTYPES

    name = value_dtype(value)
    return name if name in DTYPES else fallback


def _check_cache(cache_path: str, version: TrtVersion, onnx_path: str | os.PathLike[str]) -> list[str]:
    """The cache must carry the plan's TensorRT version: TensorRT skips a cache whose header it finds
    incompatible and calibrates again (on random data under trtexec). We refuse rather than rewrite it: the
    file the user reviews is the file that runs, and this function stays pure. Returns notes (input scales
    missing). See docs/tensorrt-versions.md."""
    import onnx

    from calibrators.cache import header, read_cache_with_header
    from export.meta import graph_inputs

    found, scales = read_cache_with_header(cache_path)
    want = header(str(version))
    if found != want:
        raise TrtbuildError(
            f"calibration cache '{cache_path}' has header {found}, but the plan is for TensorRT {version} "
            f"({want}); TensorRT would ignore it and calibrate on random data",
            f"write the cache for this version (`trtbuild calibrate ... --trt-version {version}`), "
            "or pass --qdq-onnx",
        )
    model = onnx.load(str(onnx_path), load_external_data=False)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    missing = [
        i.name
        for i in graph_inputs(model)
        if i.type.tensor_type.elem_type in float_types and i.name not in scales
    ]
    if not missing:
        return []
    return [
        f"calibration cache has no scale for input(s) {', '.join(missing)}: TensorRT keeps the first layer(s)"
        " out of INT8 ('Missing scale'); re-create it with `trtbuild calibrate`"
    ]
