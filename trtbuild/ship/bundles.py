"""Fleet bundles: export a model for each target x precision and pack each into one signed archive."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from calibrators.ranges import RangeSet
from trtbuild.bundle.archive import create_bundle
from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec
from trtbuild.core.onnx_file import fixed_size, load_model_file
from trtbuild.core.onnx_file import model_name as model_file_name

QUALCOMM_TARGETS = ("snpe", "qairt")  # the converter the handoff is written for
TRITON_PREFIX = "triton-"  # triton-<data-center GPU> or triton-ort-cpu: a Triton model repository
WORK_LABEL = "bundle"  # work folders: .bundle.trtbuild-XXXXXXXX.work in the output folder
_LEGACY_WORK = re.compile(r"\.bundle-[a-z0-9_]{8}")  # what versions before the staging names left
_LEGACY_AFTER_S = 24 * 3600.0


def clean_legacy_work(out: Path) -> None:
    """Remove day-old ``.bundle-XXXXXXXX`` work folders that older versions, killed, left in ``out``."""
    now = time.time()
    with os.scandir(out) as entries:
        for entry in entries:
            if (
                _LEGACY_WORK.fullmatch(entry.name)
                and entry.is_dir(follow_symlinks=False)
                and now - entry.stat(follow_symlinks=False).st_mtime > _LEGACY_AFTER_S
            ):
                shutil.rmtree(entry.path, ignore_errors=True)


def bundle_file_name(model: str, version: str, target: str, precision: str) -> str:
    return f"{model}-{version}-{target}-{precision}.tar.gz"


def _onnx_io(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def info(v: onnx.ValueInfoProto) -> dict[str, Any]:
        dims = [
            (d.dim_param or "?") if (size := fixed_size(d)) is None else size
            for d in v.type.tensor_type.shape.dim
        ]
        return {
            "name": v.name,
            "shape": dims,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
        }

    return {
        "inputs": [info(i) for i in model.graph.input if i.name not in inits],
        "outputs": [info(o) for o in model.graph.output],
    }


def _check_combination(target: str, precision: str, ranges: RangeSet | None, calibration: Any) -> None:
    from trtbuild.targets import check_precision, get_target

    if target.startswith(TRITON_PREFIX):
        server = target.removeprefix(TRITON_PREFIX)
        if server != "ort-cpu" and get_target(server).kind == "jetson":
            raise TrtbuildError(
                f"'{target}': Triton bundles are for data-center GPUs or ort-cpu",
                "bundle Jetson targets by their id (add --deepstream for the nvinfer config)",
            )
        check_precision(precision)
        return
    if target in QUALCOMM_TARGETS:
        if precision != "int8":
            raise TrtbuildError(
                f"the Qualcomm handoff is INT8 (AIMET encodings), not {precision}",
                "use --precision int8 for snpe/qairt targets",
            )
        if ranges is None or calibration is None:
            raise TrtbuildError(
                "a Qualcomm bundle needs calibrated ranges and calibration data",
                "pass --ranges and --calib-data",
            )
        return
    tgt = get_target(target)
    if tgt.kind != "jetson":
        raise TrtbuildError(
            f"target '{tgt.id}' is not a Jetson or Qualcomm target",
            f"bundle Jetson targets, snpe/qairt, or {TRITON_PREFIX}{tgt.id} for a Triton model repository",
        )
    check_precision(precision)


def _record_smoke(folder: Path, graph: Path, inputs: Sequence[Any]) -> None:
    """One seeded input at the optimum shapes of ``inputs`` (the plan's, or the graph's own input specs) and
    the graph's ONNX Runtime outputs, recorded in the bundle (so signed with it): the device agent re-runs it
    before switching (trtbuild/fleet/smoke.py). Every bundle kind carries one."""
    from trtbuild.fleet.smoke import write_smoke_record
    from trtbuild.plan_graphs import seeded_feeds

    feeds, _ = seeded_feeds(inputs, seed=0, runs=1)
    write_smoke_record(graph, folder, feeds)


def _triton_smoke(folder: Path, repo: Any, shapes: Sequence[InputSpec] | None) -> None:
    """The graph the repository serves (ONNX Runtime; at ``shapes`` when given) or the one its build.sh
    parses (TensorRT)."""
    from export.meta import model_input_specs

    if repo.plan is not None:
        _record_smoke(folder, repo.model_dir / repo.plan.onnx, repo.plan.inputs)
        return
    graph = repo.model_dir / str(repo.version) / "model.onnx"
    _record_smoke(folder, graph, shapes or model_input_specs(graph))


def create_bundles(
    model_path: str | os.PathLike[str],
    targets: Sequence[str],
    precisions: Sequence[str],
    key: Ed25519PrivateKey,
    out_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    model_version: str = "1",
    ranges: RangeSet | None = None,
    qdq_onnx: str | os.PathLike[str] | None = None,
    fp16_onnx: str | os.PathLike[str] | None = None,
    calibration: Any = None,
    htp_socs: str = "sm8650",
    fidelity: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    deepstream: bool = False,
    shapes: Sequence[InputSpec] | None = None,
    high_precision: str = "fp16",
) -> list[Path]:
    """One signed ``.tar.gz`` per target x precision in ``out_dir``; returns their paths.

    Jetson targets (see `trtbuild targets`) get :func:`trtbuild.ship.jetson.export_jetson` (with
    ``deepstream``,
    :func:`trtbuild.ship.deepstream.export_deepstream`: the same folder plus the nvinfer and deepstream-app
    configs); ``snpe``/``qairt`` get the Qualcomm handoff (INT8 only; needs ``ranges`` and
    ``calibration``); ``triton-<gpu>``/``triton-ort-cpu`` get a Triton model repository
    (:func:`trtbuild.ship.triton.export_triton`). ``shapes`` and ``high_precision`` are the TensorRT
    targets' profile and unquantized-layer type (as `trtbuild plan --shape/--high-precision`).
    """
    from export.meta import model_input_specs
    from trtbuild.ship.deepstream import export_deepstream
    from trtbuild.ship.jetson import export_jetson
    from trtbuild.ship.qualcomm import export_qualcomm
    from trtbuild.ship.triton import export_triton

    src = Path(model_path)
    if Path(out_dir).is_dir():  # what killed runs left is cleaned up even when this run's input is bad
        atomic.clean_stale(Path(out_dir) / WORK_LABEL)
    load_model_file(src, external_data=False)  # empty, truncated or invalid: one line, nothing written
    name = model_name or model_file_name(src)
    for target in targets:  # refuse a bad combination before any bundle is written
        for precision in precisions:
            _check_combination(target, precision, ranges, calibration)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_legacy_work(out)
    except OSError as exc:
        raise TrtbuildError(
            f"cannot write bundles to {out}: {exc.strerror}", "pass a writable folder to --out"
        ) from exc
    written: list[Path] = []
    for target in targets:
        for precision in precisions:
            # a locked work folder; stale ones that killed runs left are removed when the next one starts
            with atomic.staging_dir(out, WORK_LABEL) as work:
                folder = work / "payload"
                if target in QUALCOMM_TARGETS:
                    assert ranges is not None  # _check_combination refused the bundle otherwise
                    handoff = export_qualcomm(
                        src, ranges, calibration, folder, converter=target, htp_socs=htp_socs
                    )
                    requires: dict[str, Any] = {
                        "kind": "qualcomm",
                        "converter": target,
                        "htp_socs": htp_socs,
                        "opset": 17,
                    }
                    io_spec = _onnx_io(handoff.onnx)
                    _record_smoke(folder, handoff.onnx, model_input_specs(handoff.onnx))
                elif target.startswith(TRITON_PREFIX):
                    repo = export_triton(
                        src,
                        target.removeprefix(TRITON_PREFIX),
                        precision,
                        folder,
                        name=name,
                        ranges=ranges if precision == "int8" and qdq_onnx is None else None,
                        qdq_onnx=qdq_onnx if precision == "int8" else None,
                        fp16_onnx=fp16_onnx if precision == "fp16" else None,
                        shapes=shapes,
                        high_precision=high_precision,
                    )
                    requires, io_spec = repo.requires(), _onnx_io(src)
                    _triton_smoke(folder, repo, shapes)
                else:
                    graphs: dict[str, Any] = {
                        "ranges": ranges if precision == "int8" and qdq_onnx is None else None,
                        "qdq_onnx": qdq_onnx if precision == "int8" else None,
                        "fp16_onnx": fp16_onnx if precision == "fp16" else None,
                        "shapes": shapes,
                        "high_precision": high_precision,
                    }
                    jb = (
                        export_deepstream(src, target, precision, folder, **graphs).jetson
                        if deepstream
                        else export_jetson(src, target, precision, folder, **graphs)
                    )
                    requires, io_spec = jb.requires(), {**_onnx_io(src), "profile": jb.io_spec()["inputs"]}
                    _record_smoke(jb.folder, jb.folder / jb.plan.onnx, jb.plan.inputs)
                path, _ = create_bundle(
                    folder,
                    out / bundle_file_name(name, model_version, target, precision),
                    key,
                    model=name,
                    model_version=model_version,
                    target=target,
                    precision=precision,
                    requires=requires,
                    io_spec=io_spec,
                    fidelity=fidelity,
                    profile=profile,
                )
                shutil.rmtree(folder, ignore_errors=True)
            written.append(path)
    return written
