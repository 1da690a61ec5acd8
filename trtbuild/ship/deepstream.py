"""DeepStream handoff for Jetson: the Jetson bundle folder (trtbuild.ship.jetson) plus the `nvinfer` config,
a labels file and a minimal `deepstream-app` pipeline that runs the model on a file source.

All paths in the configs are relative to the folder (nvinfer and deepstream-app resolve them against the
config file), so the folder can be copied anywhere. `build.sh` builds `model.engine`, the file
`model-engine-file` names; without it nvinfer builds its own engine from `onnx-file` (and the calibration
cache for implicit INT8). The pixel math is the calibration's (see trtbuild.ship.deepstream_preprocess); the
geometry is nvinfer's (the frame scaled to the network size), not the calibration's resize + center crop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet, TensorRange
from export.meta import OutputInfo, graph_outputs, model_input_specs
from trtbuild.core.atomic import atomic_dir
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec, fmt_shape
from trtbuild.ship import calibration_preprocess
from trtbuild.ship.deepstream_keys import (
    COLOR_FORMAT,
    INPUT_ORDER,
    NETWORK_MODE,
    NETWORK_TYPE,
    deepstream_version,
)
from trtbuild.ship.deepstream_preprocess import (
    RAW_SUFFIX,
    NvinferPreprocess,
    fold_channel_scale,
    nvinfer_preprocess,
)
from trtbuild.ship.jetson import CALIB_CACHE, ENGINE, JetsonBundle, export_jetson
from trtbuild.targets import check_precision, get_target

INFER_CONFIG = "config_infer_primary.txt"
APP_CONFIG = "deepstream_app_config.txt"
LABELS = "labels.txt"
SAMPLE_STREAM = "/opt/nvidia/deepstream/deepstream/samples/streams/sample_720p.mp4"  # in every DS install


@dataclass(frozen=True)
class DeepStreamBundle:
    folder: Path
    jetson: JetsonBundle  # its paths point into ``folder``
    deepstream: str  # DeepStream release of the target's JetPack
    infer_config: Path
    app_config: Path
    labels: Path | None
    preprocess: NvinferPreprocess
    network_type: str
    notes: tuple[str, ...]


def export_deepstream(
    onnx_path: str | os.PathLike[str],
    target: str,
    precision: str,
    out_dir: str | os.PathLike[str],
    *,
    preprocess: Preprocess | None = None,
    ranges: RangeSet | None = None,
    qdq_onnx: str | os.PathLike[str] | None = None,
    fp16_onnx: str | os.PathLike[str] | None = None,
    trt_version: str | None = None,
    shapes: Sequence[InputSpec] | None = None,
    dla_core: int | None = None,
    labels: Sequence[str] | None = None,
    network_type: str | None = None,
    num_classes: int | None = None,
    batch_size: int = 1,
    video: str | os.PathLike[str] | None = None,
    high_precision: str = "fp16",
    bbox_parser: BboxParser | None = None,
) -> DeepStreamBundle:
    """Write the Jetson + DeepStream folder for ``target`` (a Jetson id) atomically.

    ``preprocess``: the preprocessing used at calibration; None takes the one ``ranges`` or the Q/DQ graph
    recorded (trtbuild/ship/calibration_preprocess.py), else ImageNet's default; one that contradicts the
    record is refused.
    ``network_type``: classifier | detector | segmentation | other (default: classifier for one
    [batch, classes] output, else other with tensor output). ``video``: a file copied into the folder
    for the pipeline (default: DeepStream's sample stream). ``bbox_parser``: a detector's custom nvinfer
    parser (function, library path on the device); required unless the outputs are the DetectNet
    coverage/bbox pair nvinfer's built-in parser reads.
    """
    tgt = get_target(target)
    if tgt.kind != "jetson":
        raise TrtbuildError(
            f"target '{tgt.id}' is not a Jetson; the DeepStream handoff is for Jetson targets",
            "pick a Jetson target (see `trtbuild targets`), or `trtbuild export-triton` for GPU servers",
        )
    prec = check_precision(precision)
    if prec not in tgt.precisions:
        raise TrtbuildError(
            f"{tgt.name} ({tgt.sm_text}) cannot run {prec.upper()}",
            f"pick one of {', '.join(tgt.precisions)}",
        )
    if prec not in NETWORK_MODE:
        raise TrtbuildError(
            f"nvinfer's network-mode has FP32, FP16 and INT8, not {prec.upper()}", "use fp32, fp16 or int8"
        )
    ds = deepstream_version(tgt.jetpack)
    src = Path(onnx_path)
    if not src.is_file():
        raise TrtbuildError(f"ONNX file '{src}' does not exist", "check the path")
    specs = list(shapes) if shapes is not None else model_input_specs(src)
    spec = _image_input(specs)
    notes = [f"DeepStream {ds} (JetPack {tgt.jetpack}); nvinfer scales the whole frame (no center crop)"]
    chosen = calibration_preprocess.resolve(preprocess, ranges, (qdq_onnx, src), notes)
    pre = nvinfer_preprocess(chosen.for_input_shape(spec.opt_shape))
    if not spec.min[0] <= batch_size <= spec.max[0]:
        raise TrtbuildError(
            f"--batch-size {batch_size} is outside the model's batch range {spec.min[0]}..{spec.max[0]}",
            f"pass --batch-size {spec.min[0]}..{spec.max[0]}"
            + ("" if spec.max[0] > 1 else " (export with --dynamic-batch for more)"),
        )
    outputs = graph_outputs(_load(src))
    kind = network_type or _guess_type(outputs)
    if kind not in NETWORK_TYPE:
        raise TrtbuildError(f"unknown network type '{kind}'", f"use one of {', '.join(NETWORK_TYPE)}")
    classes = _classes(kind, outputs, labels, num_classes)
    _check_bbox_parser(kind, outputs, bbox_parser)
    if video is not None and not Path(video).is_file():
        raise TrtbuildError(f"video '{video}' does not exist", "pass a video file, or leave --video out")
    final = Path(out_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp, tempfile.TemporaryDirectory(prefix=".ds-", dir=final.parent) as work:
        graphs = _fold_graphs(src, qdq_onnx, fp16_onnx, spec.name, pre, Path(work), notes)
        if graphs["onnx"] != src:  # the folded graph's input has a new name
            specs = [replace(s, name=s.name + RAW_SUFFIX) if s.name == spec.name else s for s in specs]
            ranges = _raw_input_range(ranges, spec.name, pre)
        jb = export_jetson(
            graphs["onnx"],
            tgt.id,
            prec,
            tmp,
            ranges=ranges,
            qdq_onnx=graphs.get("qdq"),
            fp16_onnx=graphs.get("fp16"),
            trt_version=trt_version,
            shapes=specs,
            dla_core=dla_core,
            high_precision=high_precision,
        )
        label_file = None
        if labels:
            # nvinfer reads a classifier's labels as one ';'-separated line per output layer
            text = ";".join(labels) if kind == "classifier" else "\n".join(labels)
            (tmp / LABELS).write_text(text + "\n", encoding="utf-8")
            label_file = LABELS
        uri = f"file://{SAMPLE_STREAM}"
        if video is not None:
            shutil.copy2(video, tmp / f"video{Path(video).suffix}")
            uri = f"file://video{Path(video).suffix}"
        infer = infer_config(
            jb,
            spec,
            pre,
            kind,
            classes,
            batch_size,
            label_file,
            outputs,
            dla_core,
            header=_header(jb, ds),
            bbox_parser=bbox_parser,
        )
        (tmp / INFER_CONFIG).write_text(infer, encoding="utf-8")
        (tmp / APP_CONFIG).write_text(app_config(uri, batch_size, spec), encoding="utf-8")
    jetson = replace(
        jb,
        folder=final,
        build_script=final / jb.build_script.name,
        profile_script=final / jb.profile_script.name,
        calib_cache=final / CALIB_CACHE if jb.calib_cache else None,
    )
    return DeepStreamBundle(
        final,
        jetson,
        ds,
        final / INFER_CONFIG,
        final / APP_CONFIG,
        final / LABELS if label_file else None,
        pre,
        kind,
        tuple(notes + list(jb.plan.notes)),
    )


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _image_input(specs: Sequence[InputSpec]) -> InputSpec:
    if len(specs) != 1:
        raise TrtbuildError(
            f"nvinfer feeds one image input, this model has {len(specs)} "
            f"({', '.join(s.name for s in specs)})",
            "serve multi-input models with `trtbuild export-triton`",
        )
    spec = specs[0]
    if len(spec.opt_shape) != 4 or spec.min[1:] != spec.max[1:]:
        raise TrtbuildError(
            f"input '{spec.name}' ({fmt_shape(spec.min)}..{fmt_shape(spec.max)}) is not a batch of "
            "fixed-size images, which is what nvinfer feeds",
            "export the model with a fixed N x C x H x W (or N x H x W x C) input and a batch axis",
        )
    return spec


def _guess_type(outputs: Sequence[OutputInfo]) -> str:
    return "classifier" if len(outputs) == 1 and len(outputs[0].shape) == 2 else "other"


@dataclass(frozen=True)
class BboxParser:
    """A custom nvinfer box parser: ``parse-bbox-func-name`` in ``custom-lib-path`` (a device path)."""

    function: str
    library: str


def is_detectnet_pair(outputs: Sequence[OutputInfo]) -> bool:
    """Whether the outputs are what nvinfer's built-in detector parser reads: it finds its two layers by
    name (strstr "cov" and "bbox", DetectPostprocessor::parseBoundingBox), a coverage grid [C, H, W] and
    a bbox grid [4C, H, W]; any other model fails at start-up ("Could not find output coverage layer")."""
    cov = [o for o in outputs if "cov" in o.name]
    bbox = [o for o in outputs if "bbox" in o.name]
    if len(cov) != 1 or len(bbox) != 1:
        return False
    c, b = cov[0].shape[1:], bbox[0].shape[1:]
    if len(c) != 3 or len(b) != 3 or not all(isinstance(d, int) for d in (*c, *b)):
        return len(c) == len(b) == 3  # symbolic grid sizes: the names decide
    return int(b[0]) == 4 * int(c[0]) and tuple(c[1:]) == tuple(b[1:])


def _check_bbox_parser(kind: str, outputs: Sequence[OutputInfo], parser: BboxParser | None) -> None:
    if parser is not None and kind != "detector":
        raise TrtbuildError(
            f"a bbox parser is for detectors, not --network-type {kind}",
            "drop --parse-bbox-func/--custom-lib",
        )
    if kind == "detector" and parser is None and not is_detectnet_pair(outputs):
        shown = ", ".join(
            f"{o.name} [{', '.join(str(d) if isinstance(d, int) else '?' for d in o.shape)}]" for o in outputs
        )
        raise TrtbuildError(
            "nvinfer's built-in detector parser reads only a DetectNet output pair (layers named *cov* "
            f"[C, H, W] and *bbox* [4C, H, W]), not {shown}: the pipeline would fail at start-up",
            "pass the parser built for these outputs (--parse-bbox-func NAME --custom-lib PATH, e.g. "
            "DeepStream-Yolo's NvDsInferParseYolo), or --network-type other (raw outputs as tensor meta)",
        )


def _classes(
    kind: str, outputs: Sequence[OutputInfo], labels: Sequence[str] | None, num_classes: int | None
) -> int | None:
    count: int | None
    if kind == "classifier":
        if len(outputs) != 1 or len(outputs[0].shape) != 2 or not isinstance(outputs[0].shape[1], int):
            shown = ", ".join(f"{o.name} {list(o.shape)}" for o in outputs)
            raise TrtbuildError(
                f"a classifier needs one [batch, classes] output with a fixed class count, not {shown}",
                "pass --network-type other (raw tensor output) or fix the export",
            )
        count = int(outputs[0].shape[1])
    elif kind in ("detector", "segmentation"):
        count = num_classes or (len(labels) if labels else None)
        if count is None:
            raise TrtbuildError(f"a {kind} needs its class count", "pass --num-classes or --labels")
    else:
        return None
    if num_classes is not None and num_classes != count:
        raise TrtbuildError(f"--num-classes {num_classes} but the model outputs {count} classes", "fix it")
    if labels and len(labels) != count:
        raise TrtbuildError(
            f"{len(labels)} labels for a model with {count} classes", f"give exactly {count} class names"
        )
    return count


def _fold_graphs(
    src: Path,
    qdq: str | os.PathLike[str] | None,
    fp16: str | os.PathLike[str] | None,
    input_name: str,
    pre: NvinferPreprocess,
    work: Path,
    notes: list[str],
) -> dict[str, Path]:
    given = {"onnx": src} | {k: Path(v) for k, v in (("qdq", qdq), ("fp16", fp16)) if v is not None}
    if pre.channel_scale is None:
        return given
    for label, path in given.items():
        if not path.is_file():
            raise TrtbuildError(f"ONNX file '{path}' does not exist", "check the path")
        (work / label).mkdir()
        given[label] = fold_channel_scale(path, work / label / path.name, input_name, pre)
    scales = ", ".join(f"{s:.6g}" for s in pre.channel_scale)
    notes.append(
        f"per-channel std folded into the graph: input '{input_name}{RAW_SUFFIX}' x [{scales}]"
        f" -> '{input_name}'"
    )
    return given


def _raw_input_range(ranges: RangeSet | None, name: str, pre: NvinferPreprocess) -> RangeSet | None:
    """Give the new raw input a range too (raw = calibrated / channel_scale), so the cache covers it."""
    if ranges is None or name not in ranges or pre.channel_scale is None:
        return ranges
    r, lowest = ranges[name], min(pre.channel_scale)
    raw = TensorRange(name + RAW_SUFFIX, r.amax / lowest, r.min / lowest, r.max / lowest)
    return RangeSet(ranges.method, {**ranges.ranges, raw.name: raw}, dict(ranges.meta))


def _header(jb: JetsonBundle, ds: str) -> str:
    return (
        f"# nvinfer config written by trtbuild for {jb.target.name}: DeepStream {ds}, "
        f"TensorRT {jb.trt_version}, {jb.plan.precision.upper()}.\n"
        "# Paths are relative to this file. Run ./build.sh first to build "
        f"{ENGINE}; without it nvinfer builds its own engine from onnx-file.\n"
    )


def _num(value: float) -> str:
    return repr(float(value))  # shortest text that reads back as the same double


def infer_config(
    jb: JetsonBundle,
    spec: InputSpec,
    pre: NvinferPreprocess,
    kind: str,
    classes: int | None,
    batch_size: int,
    label_file: str | None,
    outputs: Sequence[OutputInfo],
    dla_core: int | None,
    header: str = "",
    bbox_parser: BboxParser | None = None,
) -> str:
    """The [property] group (and [class-attrs-all] for detectors) for ``jb``'s plan."""
    dims = spec.opt_shape[1:]
    props: list[tuple[str, str]] = [
        ("gpu-id", "0"),
        ("onnx-file", jb.plan.onnx),
        ("model-engine-file", ENGINE),
    ]
    if jb.plan.calib_cache:
        props.append(("int8-calib-file", jb.plan.calib_cache))
    if label_file:
        props.append(("labelfile-path", label_file))
    props += [
        ("batch-size", str(batch_size)),
        ("network-mode", str(NETWORK_MODE[jb.plan.precision])),
        ("network-type", str(NETWORK_TYPE[kind])),
        ("process-mode", "1"),
        ("gie-unique-id", "1"),
        ("infer-dims", ";".join(str(d) for d in dims)),
        ("network-input-order", str(INPUT_ORDER[pre.input_order])),
        ("model-color-format", str(COLOR_FORMAT[pre.color_format])),
        ("net-scale-factor", _num(pre.net_scale_factor)),
        ("offsets", ";".join(_num(o) for o in pre.offsets)),
        ("maintain-aspect-ratio", "0"),
        ("output-blob-names", ";".join(o.name for o in outputs)),
    ]
    if dla_core is not None:
        props += [("enable-dla", "1"), ("use-dla-core", str(dla_core))]
    if kind == "classifier":
        props += [("classifier-threshold", "0.0")]
    elif kind in ("detector", "segmentation"):
        props += [("num-detected-classes", str(classes))]
        if kind == "detector":
            props += [("cluster-mode", "2")]
            if bbox_parser is not None:
                props += [
                    ("parse-bbox-func-name", bbox_parser.function),
                    ("custom-lib-path", bbox_parser.library),
                ]
        else:
            props += [("segmentation-threshold", "0.5")]
    else:
        props += [("output-tensor-meta", "1")]
    lines = [header.rstrip("\n"), "[property]"] if header else ["[property]"]
    lines += [f"{k}={_escape(v)}" for k, v in props]
    if kind == "detector":
        lines += ["", "[class-attrs-all]", "pre-cluster-threshold=0.2", "nms-iou-threshold=0.5", "topk=100"]
    return "\n".join(lines) + "\n"


def app_config(uri: str, batch_size: int, spec: InputSpec) -> str:
    """A deepstream-app config: ``batch_size`` copies of one file source -> nvinfer -> fakesink."""
    groups = {
        "application": {"enable-perf-measurement": "1", "perf-measurement-interval-sec": "5"},
        "source0": {"enable": "1", "type": "3", "uri": uri, "num-sources": str(batch_size), "gpu-id": "0"},
        "streammux": {
            "gpu-id": "0",
            "live-source": "0",
            "batch-size": str(batch_size),
            "batched-push-timeout": "40000",
            "width": "1280",
            "height": "720",
        },
        "primary-gie": {
            "enable": "1",
            "gpu-id": "0",
            "gie-unique-id": "1",
            "batch-size": str(batch_size),
            "config-file": INFER_CONFIG,
        },
        "osd": {"enable": "0"},
        "sink0": {"enable": "1", "type": "1", "sync": "0", "source-id": "0", "gpu-id": "0"},
        "tests": {"file-loop": "0"},
    }
    lines = [
        "# deepstream-app -c " + APP_CONFIG + f"  (input {spec.name} {fmt_shape(spec.opt_shape)}; fakesink,"
        " perf printed every 5 s)"
    ]
    for group, keys in groups.items():
        lines += ["", f"[{group}]", *(f"{k}={_escape(v)}" for k, v in keys.items())]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """GLib key-file value escaping (backslash, leading space, newlines)."""
    text = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return "\\s" + text[1:] if text.startswith(" ") else text
