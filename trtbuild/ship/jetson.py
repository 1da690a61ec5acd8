"""Jetson bundle folder: what a Jetson needs to build and profile the engine on the device itself.

Engines are tied to GPU architecture and TensorRT version, so a Jetson engine is built on the Jetson. The
folder holds the ONNX the plan parses (FP32, the FP16 graph or a Q/DQ graph), the calibration cache with the
header of that JetPack's TensorRT when implicit INT8 applies, ``build.sh`` (refuses to run on another
TensorRT), ``profile.sh``, ``plan.json`` and ``jetson.json``; all paths in the scripts are relative to the
folder, so it can be copied anywhere. `trtbuild bundle create` signs and packs it.
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

import onnx

from calibrators import cache as calib_cache
from calibrators.ranges import RangeSet
from export.meta import meta_path
from trtbuild import trtexec
from trtbuild.core.atomic import atomic_dir
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec, fmt_shape
from trtbuild.core.trt_versions import V
from trtbuild.plan import BuildPlan, make_plan
from trtbuild.plan_graphs import write_plan_graph
from trtbuild.targets import Target, get_target

ENGINE = "model.engine"
TIMING_CACHE = "timing.cache"
CALIB_CACHE = "calib.cache"


@dataclass(frozen=True)
class JetsonBundle:
    folder: Path
    plan: BuildPlan  # paths relative to ``folder``
    target: Target
    trt_version: str
    build_script: Path
    profile_script: Path
    calib_cache: Path | None

    def requires(self) -> dict[str, Any]:
        """What the device must have (goes into the signed manifest)."""
        return {
            "kind": "jetson",
            "jetpack": self.target.jetpack,
            "tensorrt": self.trt_version,
            "sm": self.target.sm_text,
            "device": self.target.name,
        }

    def io_spec(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.plan.inputs]}


def export_jetson(
    onnx_path: str | os.PathLike[str],
    target: str,
    precision: str,
    out_dir: str | os.PathLike[str],
    *,
    ranges: RangeSet | None = None,
    qdq_onnx: str | os.PathLike[str] | None = None,
    fp16_onnx: str | os.PathLike[str] | None = None,
    trt_version: str | None = None,
    shapes: Sequence[InputSpec] | None = None,
    dla_core: int | None = None,
    high_precision: str = "fp16",
) -> JetsonBundle:
    """Write the Jetson bundle folder for ``target`` (a Jetson id from `trtbuild targets`).

    INT8 takes either ``qdq_onnx`` (explicit, preferred) or ``ranges`` (implicit INT8: a calibration cache
    with the target TensorRT's header; TensorRT <= 10.x only).
    """
    tgt = get_target(target)
    if tgt.kind != "jetson":
        raise TrtbuildError(
            f"target '{tgt.id}' is not a Jetson", "pick a Jetson target (see `trtbuild targets`)"
        )
    version = tgt.resolve_trt(trt_version)
    src = Path(onnx_path)
    if not src.is_file():
        raise TrtbuildError(f"ONNX file '{src}' does not exist", "check the path")
    if ranges is not None and qdq_onnx is not None:
        raise TrtbuildError("both ranges (implicit INT8) and a Q/DQ graph were given", "give one of them")
    if ranges is not None and precision != "int8":
        raise TrtbuildError(f"calibrated ranges only apply to int8, not {precision}", "drop the ranges")
    if precision == "int8" and ranges is None and qdq_onnx is None:
        raise TrtbuildError(
            "INT8 needs a Q/DQ graph or calibrated ranges",
            "pass --qdq-onnx or --ranges (both from `trtbuild quantize`)",
        )
    final = Path(out_dir).resolve()
    with atomic_dir(final) as tmp:
        local = _copy_onnx(src, tmp)
        qdq_local = _copy_onnx(Path(qdq_onnx), tmp) if qdq_onnx is not None else None
        fp16_local = _copy_onnx(Path(fp16_onnx), tmp) if fp16_onnx is not None else None
        cache_local = None
        if ranges is not None:
            ranges.check_fits(onnx.load(str(src), load_external_data=False), f"'{src.name}'")
            cache_local = calib_cache.write_cache(ranges, tmp / CALIB_CACHE, str(version))
        plan = make_plan(
            local,
            tgt,
            precision,
            trt_version=str(version),
            shapes=shapes,
            dla_core=dla_core,
            calib_cache=cache_local,
            qdq_onnx=qdq_local,
            fp16_onnx=fp16_local,
            engine_path=tmp / ENGINE,
            timing_cache=tmp / TIMING_CACHE,
            high_precision=high_precision,
        )
        write_plan_graph(plan)  # a derived graph (FP16 float parts) lands beside its source
        plan = _relative(plan, tmp)
        # Keep only the graph the plan parses (and the FP32 source for reference when it is another graph).
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n", encoding="utf-8")
        build = tmp / "build.sh"
        _write_script(build, build_script(plan, tgt))
        profile = tmp / "profile.sh"
        _write_script(profile, profile_script(plan))
        info = {
            "format": 1,
            "target": tgt.to_json(),
            "trt_version": str(version),
            "precision": plan.precision,
            "graph": plan.onnx,
            "graph_kind": plan.onnx_kind,
            "calib_cache": plan.calib_cache,
            "notes": list(plan.notes),
        }
        (tmp / "jetson.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return JetsonBundle(
        final,
        plan,
        tgt,
        str(version),
        final / "build.sh",
        final / "profile.sh",
        final / CALIB_CACHE if cache_local else None,
    )


def _copy_onnx(src: Path, folder: Path) -> Path:
    if not src.is_file():
        raise TrtbuildError(f"ONNX file '{src}' does not exist", "check the path")
    dest = folder / src.name
    if dest.exists():
        raise TrtbuildError(f"two graphs are both named {src.name}", "rename one of them")
    shutil.copy2(src, dest)
    data = src.with_name(src.name + ".data")
    if data.is_file():  # external weights travel with the graph
        shutil.copy2(data, folder / data.name)
    sidecar = meta_path(src)
    if sidecar.is_file():  # input shapes for the plan
        shutil.copy2(sidecar, meta_path(dest))
    return dest


def _relative(plan: BuildPlan, folder: Path) -> BuildPlan:
    def rel(path: str | None) -> str | None:
        return None if path is None else Path(path).relative_to(folder).as_posix()

    return dataclasses.replace(
        plan,
        onnx=rel(plan.onnx) or "",
        source_onnx=rel(plan.source_onnx) or "",
        calib_cache=rel(plan.calib_cache),
        engine=ENGINE,
        timing_cache=TIMING_CACHE,
    )


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


_PRELUDE = """#!/usr/bin/env bash
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
cd "$HERE"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
[ -x "$TRTEXEC" ] || {{ echo "error: trtexec not found; set TRTEXEC=/path/to/trtexec" >&2; exit 2; }}
"""

# The device's TensorRT version, first from the Debian packages JetPack installs, then from the Python
# bindings, then from trtexec's banner ("TensorRT v100300"); TRT_VERSION=x.y overrides all three.
_VERSION_CHECK = """WANT="{want}"
majmin() {{ grep -m1 -oE '^[0-9]+\\.[0-9]+' || true; }}
have="$(printf '%s\\n' "${{TRT_VERSION:-}}" | majmin)"
if [ -z "$have" ] && command -v dpkg-query >/dev/null; then
  have="$(dpkg-query -W -f='${{Version}}\\n' 'libnvinfer[0-9]*' 2>/dev/null | majmin)"
fi
if [ -z "$have" ] && command -v python3 >/dev/null; then
  have="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null | majmin)"
fi
if [ -z "$have" ]; then
  tag="$("$TRTEXEC" --help 2>&1 | grep -m1 -oE 'TensorRT v[0-9]+' | grep -oE '[0-9]+' || true)"
  if [ -n "$tag" ]; then
    if [ "$tag" -ge 100000 ]; then have="$((tag / 10000)).$((tag / 100 % 100))"; \\
    else have="$((tag / 1000)).$((tag / 100 % 10))"; fi
  fi
fi
if [ -z "$have" ]; then
  echo "error: cannot find this device's TensorRT version; set TRT_VERSION=x.y if you know it" >&2; exit 2
fi
if [ "$have" != "$WANT" ]; then
  echo "error: this bundle was planned for TensorRT $WANT ({device}), the device has $have;" \\
       "use the bundle for this JetPack" >&2
  exit 2
fi
"""


def build_script(plan: BuildPlan, tgt: Target) -> str:
    argv = trtexec.render(plan)
    cmd = '"$TRTEXEC" ' + " \\\n    ".join(shlex.quote(a) for a in argv[1:]) + ' "$@"\n'
    header = (
        f"# Build {plan.model} for {tgt.name}: {plan.precision.upper()}, TensorRT {plan.trt_version} "
        f"(JetPack {tgt.jetpack}). Written by trtbuild; run it on the Jetson.\n"
    )
    return (
        _PRELUDE.format().replace("set -euo", header + "set -euo", 1)
        + _VERSION_CHECK.format(want=V(plan.trt_version).short, device=f"JetPack {tgt.jetpack}")
        + cmd
        + f'echo "engine: $HERE/{ENGINE}"\n'
    )


def profile_script(plan: BuildPlan) -> str:
    """Latency/throughput with trtexec's own timers on the device (the report users expect)."""
    v = V(plan.trt_version)
    args = [
        f"--loadEngine={ENGINE}",
        "--useCudaGraph",
        "--noDataTransfers",
        "--separateProfileRun",
        "--percentile=90,95,99" if v >= V("8.6") else "--percentile=99",
        "--exportTimes=times.json",
        "--dumpProfile",
        "--exportProfile=layers.json",
    ]
    if plan.dynamic:
        args.append(
            "--shapes=" + ",".join(f"{s.name}:{fmt_shape(s.opt_shape)}" for s in plan.inputs if s.opt_shape)
        )
    if plan.dla_core is not None:
        args.append(f"--useDLACore={plan.dla_core}")
    return (
        _PRELUDE.format()
        + f'[ -f {ENGINE} ] || {{ echo "error: {ENGINE} missing; run ./build.sh first" >&2; exit 2; }}\n'
        + '"$TRTEXEC" '
        + " ".join(shlex.quote(a) for a in args)
        + ' "$@" | tee profile.log\n'
    )
