"""CLI: `export-triton` (Triton model repository) and `export-deepstream` (Jetson nvinfer handoff)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from calibrators.preprocess import Preprocess
from trtbuild.cli.data_options import recorded_preprocess_options
from trtbuild.core.console import emit_json, out
from trtbuild.core.errors import TrtbuildError


def _ints(text: str | None, what: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise TrtbuildError(
            f"cannot parse {what} '{text}'", "write comma-separated integers, e.g. 4,8"
        ) from None


def _labels(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrtbuildError(
            f"cannot read labels file {path} ({exc})", "pass a text file, one class a line"
        ) from exc
    labels = [line.strip() for line in lines if line.strip()]
    if not labels:
        raise TrtbuildError(f"labels file {path} is empty", "write one class name a line")
    return labels


def _ranges(path: str | None) -> Any:
    if path is None:
        return None
    from calibrators.ranges import RangeSet

    return RangeSet.load(path)


def _shapes(values: tuple[str, ...]) -> Any:
    if not values:
        return None
    from trtbuild.core.inputs import parse_profile_spec

    return [parse_profile_spec(v) for v in values]


def _key(path: str | None) -> Any:
    from trtbuild.bundle.signing import load_private_key

    return load_private_key(path)


_graph_options = [
    click.option("--ranges", type=click.Path(dir_okay=False), help="Ranges JSON: implicit INT8 cache."),
    click.option("--qdq-onnx", type=click.Path(dir_okay=False), help="Q/DQ graph for explicit INT8."),
    click.option("--fp16-onnx", type=click.Path(dir_okay=False), help="FP16 graph."),
    click.option("--trt-version", help="TensorRT version (default: the target's)."),
    click.option("--shape", "shapes", multiple=True, help="name:MIN,OPT,MAX profile (default: the sidecar)."),
    click.option("--labels", type=click.Path(dir_okay=False), help="Class names, one a line."),
    click.option("--sign", "sign_key", type=click.Path(dir_okay=False), help="Also write a signed bundle."),
    click.option("--bundle-out", default="bundles", show_default=True, type=click.Path(file_okay=False)),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
]


def _with(options: list[Any]) -> Any:
    def wrap(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


@click.command("export-triton")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="Data-center target id, or ort-cpu (ONNX Runtime on CPU).")
@click.option("--precision", required=True, help="fp32, fp16, bf16, int8 or fp8 (ort-cpu: fp32, int8).")
@click.option("--out", "repo", required=True, type=click.Path(file_okay=False), help="Model repository.")
@click.option("--name", help="Model name [ONNX file stem].")
@click.option("--version", "model_version", type=int, default=1, show_default=True)
@click.option("--max-batch", type=int, help="max_batch_size [the profile's max batch].")
@click.option("--dynamic-batching/--no-dynamic-batching", default=None, help="[on when batchable]")
@click.option("--preferred-batch", help="Preferred batch sizes, e.g. 8,32 [profile opt and max].")
@click.option("--queue-delay-us", type=int, default=100, show_default=True)
@click.option("--instances", type=int, default=1, show_default=True, help="Instances per GPU (or CPU).")
@click.option("--gpus", help="GPU ids for the instance group, e.g. 0,1 [all].")
@click.option("--warmup-data", type=click.Path(exists=True), help="Real input(s) to warm up with.")
@_with(_graph_options)
@recorded_preprocess_options
def export_triton_cmd(
    onnx_path: str,
    target: str,
    precision: str,
    repo: str,
    name: str | None,
    model_version: int,
    max_batch: int | None,
    dynamic_batching: bool | None,
    preferred_batch: str | None,
    queue_delay_us: int,
    instances: int,
    gpus: str | None,
    warmup_data: str | None,
    ranges: str | None,
    qdq_onnx: str | None,
    fp16_onnx: str | None,
    trt_version: str | None,
    shapes: tuple[str, ...],
    labels: str | None,
    sign_key: str | None,
    bundle_out: str,
    as_json: bool,
    preprocess: Preprocess | None,
) -> None:
    """Write a Triton model repository folder (config.pbtxt, version folder, build script, warmup)."""
    from trtbuild.ship.serving_bundle import sign_folder
    from trtbuild.ship.triton import export_triton

    key = _key(sign_key) if sign_key else None  # fail before any export work
    result = export_triton(
        onnx_path,
        target,
        precision,
        repo,
        name=name,
        version=model_version,
        ranges=_ranges(ranges),
        qdq_onnx=qdq_onnx,
        fp16_onnx=fp16_onnx,
        trt_version=trt_version,
        shapes=_shapes(shapes),
        max_batch=max_batch,
        dynamic_batching=dynamic_batching,
        preferred_batch=_ints(preferred_batch, "--preferred-batch") or None,
        max_queue_delay_us=queue_delay_us,
        instances=instances,
        gpus=_ints(gpus, "--gpus"),
        warmup_data=warmup_data,
        preprocess=preprocess,
        labels=_labels(labels),
    )
    bundle = None
    if key is not None:
        graph = result.model_dir / (result.plan.onnx if result.plan else f"{model_version}/model.onnx")
        bundle = sign_folder(
            result.model_dir,
            bundle_out,
            key,
            model=result.config.name,
            model_version=str(model_version),
            target=f"triton-{target.lower()}",
            precision=precision,
            requires=result.requires(),
            graph=graph,
        )
    info = {
        "repository": str(result.root),
        "model": result.config.name,
        "config": str(result.config_path),
        "platform": result.config.platform,
        "max_batch_size": result.config.max_batch_size,
        "build": str(result.build_script) if result.build_script else None,
        "bundle": str(bundle) if bundle else None,
        "notes": list(result.notes),
    }
    if as_json:
        emit_json(info)
        return
    out.print(f"Triton model {result.config.name} ({result.config.platform}): {result.model_dir}")
    if result.build_script:
        out.print(f"on the server: {result.build_script} && tritonserver --model-repository {result.root}")
    else:
        out.print(f"serve: tritonserver --model-repository {result.root}")
    if bundle:
        out.print(f"signed bundle: {bundle}")


@click.command("export-deepstream")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="Jetson target id (see `trtbuild targets`).")
@click.option("--precision", required=True, help="fp32, fp16 or int8.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--dla-core", type=int, help="Run on this DLA core (with GPU fallback).")
@click.option(
    "--network-type",
    type=click.Choice(["classifier", "detector", "segmentation", "other"]),
    help="[classifier for one [batch, classes] output, else other]",
)
@click.option("--num-classes", type=int, help="Class count (detectors, segmentation).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="nvinfer batch size.")
@click.option("--video", type=click.Path(dir_okay=False), help="Video for the pipeline [DeepStream sample].")
@click.option("--parse-bbox-func", help="Detectors: the custom parser function (parse-bbox-func-name).")
@click.option("--custom-lib", help="Detectors: the parser's library path on the device (custom-lib-path).")
@_with(_graph_options)
@recorded_preprocess_options
def export_deepstream_cmd(
    onnx_path: str,
    target: str,
    precision: str,
    out_dir: str,
    dla_core: int | None,
    network_type: str | None,
    num_classes: int | None,
    batch_size: int,
    video: str | None,
    parse_bbox_func: str | None,
    custom_lib: str | None,
    ranges: str | None,
    qdq_onnx: str | None,
    fp16_onnx: str | None,
    trt_version: str | None,
    shapes: tuple[str, ...],
    labels: str | None,
    sign_key: str | None,
    bundle_out: str,
    as_json: bool,
    preprocess: Preprocess | None,
) -> None:
    """Write a Jetson folder with the nvinfer config, labels and a deepstream-app pipeline.

    net-scale-factor and offsets come from the image options the model was calibrated with (recorded by
    `trtbuild quantize` in the ranges and the Q/DQ graph); pass --mean/--std/--scale/--layout only for
    a model calibrated elsewhere.
    """
    from trtbuild.ship.deepstream import BboxParser, export_deepstream
    from trtbuild.ship.serving_bundle import sign_folder

    if (parse_bbox_func is None) != (custom_lib is None):
        raise TrtbuildError(
            "--parse-bbox-func and --custom-lib go together", "pass both: the function and its library"
        )

    key = _key(sign_key) if sign_key else None
    result = export_deepstream(
        onnx_path,
        target,
        precision,
        out_dir,
        preprocess=preprocess,
        ranges=_ranges(ranges),
        qdq_onnx=qdq_onnx,
        fp16_onnx=fp16_onnx,
        trt_version=trt_version,
        shapes=_shapes(shapes),
        dla_core=dla_core,
        labels=_labels(labels),
        network_type=network_type,
        num_classes=num_classes,
        batch_size=batch_size,
        video=video,
        bbox_parser=BboxParser(parse_bbox_func, custom_lib) if parse_bbox_func and custom_lib else None,
    )
    jb = result.jetson
    bundle = None
    if key is not None:
        bundle = sign_folder(
            result.folder,
            bundle_out,
            key,
            model=jb.plan.model,
            model_version="1",
            target=jb.target.id,
            precision=jb.plan.precision,
            requires={**jb.requires(), "deepstream": result.deepstream},
            graph=result.folder / jb.plan.onnx,
        )
    info = {
        "folder": str(result.folder),
        "target": jb.target.id,
        "deepstream": result.deepstream,
        "tensorrt": jb.trt_version,
        "infer_config": str(result.infer_config),
        "app_config": str(result.app_config),
        "labels": str(result.labels) if result.labels else None,
        "network_type": result.network_type,
        "bundle": str(bundle) if bundle else None,
        "notes": list(result.notes),
    }
    if as_json:
        emit_json(info)
        return
    out.print(f"DeepStream {result.deepstream} handoff for {jb.target.name}: {result.folder}")
    out.print(f"on the Jetson: ./build.sh && deepstream-app -c {result.app_config.name}")
    for note in result.notes:
        out.print(f"  - {note}")
    if bundle:
        out.print(f"signed bundle: {bundle}")


COMMANDS: list[click.Command] = [export_triton_cmd, export_deepstream_cmd]
