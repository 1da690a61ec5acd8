"""Triton model repositories: `REPO/<name>/config.pbtxt` + `REPO/<name>/<version>/` for one build plan.

TensorRT (`tensorrt_plan`): an engine is tied to the GPU and TensorRT version, so the repository carries
the graph the plan parses and `trtbuild/build.sh`, which runs the plan's trtexec command on the server
(inside the Triton container, whose TensorRT must be the plan's) and writes `<version>/model.plan`.
ONNX Runtime on CPU (`onnxruntime_onnx`, target ``ort-cpu``): `<version>/model.onnx` is the FP32 graph or
the ORT-CPU INT8 graph, ready to serve. Config dims, dtypes and batching come from the plan's profile and
the graph; model warmup replays one recorded real input from `warmup/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibrators import cache as calib_cache
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet
from export.meta import fixed_inputs_not_given, graph_inputs, graph_outputs, model_input_specs
from trtbuild import trtexec
from trtbuild.core.atomic import atomic_dir
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec
from trtbuild.core.onnx_file import model_name
from trtbuild.core.trt_versions import V
from trtbuild.plan import BuildPlan, make_plan
from trtbuild.plan_graphs import write_plan_graph
from trtbuild.ship import calibration_preprocess
from trtbuild.ship.jetson import _copy_onnx
from trtbuild.ship.triton_config import (
    DEFAULT_QUEUE_DELAY_US,
    Batching,
    TritonConfig,
    Warmup,
    batching,
    check_model_name,
    preferred_sizes,
)
from trtbuild.targets import get_target

ORT_CPU = "ort-cpu"  # the target id of the ONNX Runtime CPU repository
BUILD_DIR = "trtbuild"  # non-numeric, so Triton does not take it for a version folder
WARMUP_DIR = "warmup"  # Triton reads model_warmup input files from here
LABELS = "labels.txt"


@dataclass(frozen=True)
class TritonRepository:
    root: Path  # the repository (REPO)
    model_dir: Path  # REPO/<name>
    config_path: Path
    config: TritonConfig
    version: int
    plan: BuildPlan | None  # paths relative to model_dir; None for ONNX Runtime
    build_script: Path | None
    notes: tuple[str, ...]

    def requires(self) -> dict[str, Any]:
        """What the server must have (for a signed bundle manifest)."""
        if self.plan is None:
            return {"kind": "cpu", "runtime": "onnxruntime", "serving": "triton"}
        target = get_target(self.plan.target)
        return {
            "kind": "datacenter",
            "serving": "triton",
            "tensorrt": self.plan.trt_version,
            "sm": target.sm_text,
            "device": target.name,
        }


def export_triton(
    onnx_path: str | os.PathLike[str],
    target: str,
    precision: str,
    repo: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: int = 1,
    ranges: RangeSet | None = None,
    qdq_onnx: str | os.PathLike[str] | None = None,
    fp16_onnx: str | os.PathLike[str] | None = None,
    trt_version: str | None = None,
    shapes: Sequence[InputSpec] | None = None,
    max_batch: int | None = None,
    dynamic_batching: bool | None = None,
    preferred_batch: Sequence[int] | None = None,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instances: int = 1,
    gpus: Sequence[int] = (),
    warmup_data: Any = None,
    preprocess: Preprocess | None = None,
    labels: Sequence[str] | None = None,
    high_precision: str = "fp16",
) -> TritonRepository:
    """Write (atomically) the Triton model folder ``repo/<name>`` for ``target`` x ``precision``.

    ``target``: a data-center GPU id (TensorRT) or ``ort-cpu``. INT8 on TensorRT takes ``qdq_onnx``
    (explicit) or ``ranges`` (implicit, TensorRT <= 10.x); INT8 on ``ort-cpu`` takes the ORT-CPU Q/DQ
    graph as ``qdq_onnx``. ``dynamic_batching``: None = on when the model has a batch axis.
    ``warmup_data``: anything calibration reads (images with ``preprocess``, .npy/.npz); its first sample
    becomes the warmup request. Images take the preprocessing the calibration recorded when ``preprocess``
    is None (trtbuild/ship/calibration_preprocess.py).
    """
    src = Path(onnx_path)
    if not src.is_file():
        raise TrtbuildError(f"ONNX file '{src}' does not exist", "check the path")
    model = check_model_name(name or model_name(src))
    if version < 1:
        raise TrtbuildError(f"model version must be >= 1, got {version}", "pass --version 1 or higher")
    if instances < 1:
        raise TrtbuildError(f"--instances must be >= 1, got {instances}", "pass a positive count")
    if any(g < 0 for g in gpus):
        raise TrtbuildError(f"GPU ids must be >= 0, got {list(gpus)}", "pass ids like 0,1")
    if ranges is not None and qdq_onnx is not None:
        raise TrtbuildError("both ranges (implicit INT8) and a Q/DQ graph were given", "give one of them")
    ort = target.lower() == ORT_CPU
    if ort and gpus:
        raise TrtbuildError("--gpus applies to GPU targets, not ort-cpu", "drop --gpus")
    if not ort:
        tgt = get_target(target)
        if tgt.kind != "datacenter":
            raise TrtbuildError(
                f"target '{tgt.id}' is a Jetson; this Triton repository is for data-center GPUs",
                "pick a data-center target or ort-cpu (Jetson: `trtbuild export-deepstream`)",
            )
    final = Path(repo).resolve() / model
    with atomic_dir(final) as tmp:
        if ort:
            plan = None
            graph, specs, notes = _ort_model(
                src, precision, qdq_onnx, fp16_onnx, ranges, shapes, tmp, version
            )
            platform, kind = "onnxruntime_onnx", "KIND_CPU"
        else:
            plan = _tensorrt_model(
                src,
                target,
                precision,
                tmp,
                version,
                ranges,
                qdq_onnx,
                fp16_onnx,
                trt_version,
                shapes,
                high_precision,
            )
            graph, specs, notes = tmp / plan.onnx, list(plan.inputs), list(plan.notes)
            platform, kind = "tensorrt_plan", "KIND_GPU"
        proto = onnx.load(str(graph), load_external_data=False)
        dtypes = _input_dtypes(proto, plan)
        batch = batching(
            specs,
            dtypes,
            graph_outputs(proto),
            max_batch=max_batch,
            want_dynamic_batching=bool(dynamic_batching),
        )
        outputs = batch.outputs
        if labels:
            (tmp / LABELS).write_text("\n".join(labels) + "\n", encoding="utf-8")
            outputs = (dataclasses.replace(outputs[0], label_filename=LABELS), *outputs[1:])
        batched = batch.max_batch_size > 0 and dynamic_batching is not False
        config = TritonConfig(
            name=model,
            platform=platform,
            max_batch_size=batch.max_batch_size,
            inputs=batch.inputs,
            outputs=outputs,
            instance_kind=kind,
            instance_count=instances,
            gpus=tuple(gpus),
            dynamic_batching=batched,
            preferred_batch_sizes=preferred_sizes(
                specs[0].opt_shape[0], batch.max_batch_size, preferred_batch
            )
            if batched
            else (),
            max_queue_delay_us=max_queue_delay_us,
            warmup=_warmup(
                warmup_data,
                calibration_preprocess.resolve(preprocess, ranges, (qdq_onnx, src), notes),
                graph,
                specs,
                batch,
                tmp,
            )
            if warmup_data is not None
            else None,
        )
        (tmp / "config.pbtxt").write_text(config.to_pbtxt(), encoding="utf-8")
        script = None
        if plan is not None:
            script = tmp / BUILD_DIR / "build.sh"
            _write_script(script, build_script(plan, version))
            (tmp / BUILD_DIR / "plan.json").write_text(
                json.dumps(plan.to_json(), indent=2) + "\n", encoding="utf-8"
            )
    return TritonRepository(
        final.parent,
        final,
        final / "config.pbtxt",
        config,
        version,
        plan,
        final / BUILD_DIR / "build.sh" if script else None,
        tuple(notes),
    )


def _tensorrt_model(
    src: Path,
    target: str,
    precision: str,
    folder: Path,
    version: int,
    ranges: RangeSet | None,
    qdq_onnx: str | os.PathLike[str] | None,
    fp16_onnx: str | os.PathLike[str] | None,
    trt_version: str | None,
    shapes: Sequence[InputSpec] | None,
    high_precision: str = "fp16",
) -> BuildPlan:
    tgt = get_target(target)
    trt = tgt.resolve_trt(trt_version)
    build = folder / BUILD_DIR
    build.mkdir()
    (folder / str(version)).mkdir()
    if ranges is not None and precision != "int8":
        raise TrtbuildError(f"calibrated ranges only apply to int8, not {precision}", "drop --ranges")
    local = _copy_onnx(src, build)
    if ranges is not None:
        ranges.check_fits(onnx.load(str(local), load_external_data=False), f"'{Path(src).name}'")
    cache = calib_cache.write_cache(ranges, build / "calib.cache", str(trt)) if ranges is not None else None
    plan = make_plan(
        local,
        tgt,
        precision,
        trt_version=str(trt),
        shapes=shapes,
        calib_cache=cache,
        qdq_onnx=_copy_onnx(Path(qdq_onnx), build) if qdq_onnx is not None else None,
        fp16_onnx=_copy_onnx(Path(fp16_onnx), build) if fp16_onnx is not None else None,
        engine_path=folder / str(version) / "model.plan",
        timing_cache=build / "timing.cache",
        high_precision=high_precision,
    )
    write_plan_graph(plan)  # a derived graph (FP16 float parts) lands beside its source
    return _relative(plan, folder)


def _ort_model(
    src: Path,
    precision: str,
    qdq_onnx: str | os.PathLike[str] | None,
    fp16_onnx: str | os.PathLike[str] | None,
    ranges: RangeSet | None,
    shapes: Sequence[InputSpec] | None,
    folder: Path,
    version: int,
) -> tuple[Path, list[InputSpec], list[str]]:
    if precision not in ("fp32", "int8"):
        raise TrtbuildError(f"ort-cpu serves fp32 or int8, not {precision}", "use --precision fp32 or int8")
    if ranges is not None or fp16_onnx is not None:
        raise TrtbuildError(
            "ort-cpu takes a ready graph, not ranges or an FP16 graph",
            "pass the ORT-CPU INT8 graph as --qdq-onnx (calibrators.quantize.write_variant)",
        )
    if precision == "int8" and qdq_onnx is None:
        raise TrtbuildError(
            "INT8 on ort-cpu needs the ORT-CPU Q/DQ graph", "pass --qdq-onnx <model>.int8.ortcpu.onnx"
        )
    if precision == "fp32" and qdq_onnx is not None:
        raise TrtbuildError("a Q/DQ graph only applies to int8", "drop --qdq-onnx or use --precision int8")
    graph = Path(qdq_onnx) if qdq_onnx is not None else src
    if not graph.is_file():
        raise TrtbuildError(f"ONNX file '{graph}' does not exist", "check the path")
    specs = list(shapes) if shapes is not None else model_input_specs(src)
    proto = onnx.load(str(graph), load_external_data=False)
    specs += fixed_inputs_not_given(graph_inputs(proto), specs)
    names = sorted(i.name for i in graph_inputs(proto))
    if sorted(s.name for s in specs) != names:
        raise TrtbuildError(
            f"the shapes name inputs {[s.name for s in specs]} but {graph.name} has inputs {names}",
            "pass the graph made from this model, or one --shape per input",
        )
    dest = folder / str(version)
    dest.mkdir()
    shutil.copy2(graph, dest / "model.onnx")
    data = graph.with_name(graph.name + ".data")
    if data.is_file():  # external weights keep the file name the graph refers to
        shutil.copy2(data, dest / data.name)
    notes = [
        "ONNX Runtime on CPU: " + ("the ORT-CPU INT8 (uint8 activations) graph" if qdq_onnx else "FP32 graph")
    ]
    return dest / "model.onnx", specs, notes


def _relative(plan: BuildPlan, folder: Path) -> BuildPlan:
    def rel(path: str | None) -> str | None:
        return None if path is None else Path(path).relative_to(folder).as_posix()

    return dataclasses.replace(
        plan,
        onnx=rel(plan.onnx) or "",
        source_onnx=rel(plan.source_onnx) or "",
        calib_cache=rel(plan.calib_cache),
        engine=rel(plan.engine) or "",
        timing_cache=rel(plan.timing_cache) or "",
    )


def _input_dtypes(proto: onnx.ModelProto, plan: BuildPlan | None) -> dict[str, str]:
    """Binding dtypes: the graph's, except INT64 inputs, which TensorRT before 10.0 binds as INT32."""
    dtypes = {}
    for value in graph_inputs(proto):
        elem = value.type.tensor_type.elem_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else "unknown"
        if plan is not None and dtype == "int64" and plan.version.major < 10:
            dtype = "int32"
        dtypes[value.name] = dtype
    return dtypes


def _warmup(
    data: Any,
    preprocess: Preprocess | None,
    graph: Path,
    specs: Sequence[InputSpec],
    batch: Batching,
    folder: Path,
) -> Warmup:
    """Write the first recorded sample of ``data`` as raw row-major files under `warmup/`."""
    from calibrators.data import model_inputs, open_data

    inputs = model_inputs(onnx.load(str(graph), load_external_data=False))
    _, sample = next(open_data(data, inputs, preprocess).sample(1).samples())
    by_name = {s.name: s for s in specs}
    types = {t.name: t.data_type for t in batch.inputs}
    out = folder / WARMUP_DIR
    out.mkdir()
    files = {}
    for index, (name, array) in enumerate(sample.items()):
        spec = by_name[name]
        if array.ndim == len(spec.opt_shape) - 1:
            array = array[None]
        shape = array.shape
        bad = array.ndim != len(spec.opt_shape) or any(
            not lo <= d <= hi for d, lo, hi in zip(shape, spec.min, spec.max, strict=True)
        )
        if bad or (batch.max_batch_size and shape[0] != 1):
            raise TrtbuildError(
                f"warmup sample for '{name}' has shape {list(shape)}, outside the profile "
                f"{list(spec.min)}..{list(spec.max)}",
                "pass warmup data shaped like the model input (one sample)",
            )
        np_type = "int32" if types[name] == "TYPE_INT32" else str(array.dtype)
        file_name = f"input{index}.bin"  # tensor names may hold characters a file name cannot
        (out / file_name).write_bytes(np.ascontiguousarray(array.astype(np_type)).tobytes())
        files[name] = file_name
    return Warmup(files)


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


# The server's TensorRT must be the plan's: Triton's TensorRT backend only loads engines of its own version.
_BUILD = """#!/usr/bin/env bash
# Build {model} for {gpu} ({sm}): {precision}, TensorRT {trt}. Written by trtbuild.
# Run it on the Triton server (e.g. inside the tritonserver container whose TensorRT is {trt}).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")/.." && pwd)"
cd "$HERE"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
[ -x "$TRTEXEC" ] || {{ echo "error: trtexec not found; set TRTEXEC=/path/to/trtexec" >&2; exit 2; }}
WANT="{want}"
have="${{TRT_VERSION:-}}"
if [ -z "$have" ] && command -v python3 >/dev/null; then
  have="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
fi
if [ -z "$have" ] && command -v dpkg-query >/dev/null; then
  have="$(dpkg-query -W -f='${{Version}}\\n' 'libnvinfer[0-9]*' 2>/dev/null | head -n1 || true)"
fi
have="$(printf '%s\\n' "$have" | grep -m1 -oE '^[0-9]+\\.[0-9]+' || true)"
if [ -z "$have" ]; then
  echo "error: cannot find this server's TensorRT version; set TRT_VERSION=x.y if you know it" >&2; exit 2
fi
if [ "$have" != "$WANT" ]; then
  echo "error: the plan is for TensorRT $WANT, this server has $have; re-export with --trt-version $have" >&2
  exit 2
fi
mkdir -p {version}
"""


def build_script(plan: BuildPlan, version: int) -> str:
    argv = trtexec.render(plan)
    cmd = '"$TRTEXEC" ' + " \\\n    ".join(shlex.quote(a) for a in argv[1:]) + ' "$@"\n'
    head = _BUILD.format(
        model=plan.model,
        gpu=plan.gpu,
        sm=f"sm{plan.compute_capability.replace('.', '')}",
        precision=plan.precision.upper(),
        trt=plan.trt_version,
        want=V(plan.trt_version).short,
        version=version,
    )
    return head + cmd + f'echo "engine: $HERE/{plan.engine}"\n'
