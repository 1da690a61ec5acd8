"""DeepStream facts trtbuild writes against: the DeepStream release of each JetPack, and the documented keys
of the `nvinfer` config file ([property] and [class-attrs-*] groups, gstnvinfer_property_parser.h) and of
the `deepstream-app` groups we write. Unknown keys are only a warning in nvinfer, so our tests check every
key we write against these lists instead of trusting that a typo would fail on the device.
"""

from __future__ import annotations

from trtbuild.core.errors import TrtbuildError

# JetPack -> DeepStream release built for it (DeepStream's Jetson install guide / release notes).
DEEPSTREAM_FOR_JETPACK = {"5.1": "6.2", "6.0": "7.0", "6.1": "7.1", "6.2": "7.1", "7.x": "8.0"}

# [property] keys nvinfer parses (DeepStream 6.x and later).
PROPERTY_KEYS = frozenset(
    {
        "gie-unique-id",
        "process-mode",
        "interval",
        "labelfile-path",
        "gpu-id",
        "secondary-reinfer-interval",
        "output-tensor-meta",
        "enable-dla",
        "use-dla-core",
        "batch-size",
        "tensor-meta-pool-size",
        "network-mode",
        "model-engine-file",
        "int8-calib-file",
        "workspace-size",
        "output-blob-names",
        "is-classifier",
        "network-type",
        "force-implicit-batch-dim",
        "infer-dims",
        "output-io-formats",
        "layer-device-precision",
        "model-color-format",
        "net-scale-factor",
        "offsets",
        "mean-file",
        "maintain-aspect-ratio",
        "symmetric-padding",
        "scaling-filter",
        "scaling-compute-hw",
        "network-input-order",
        "input-tensor-from-meta",
        "custom-lib-path",
        "parse-bbox-func-name",
        "parse-bbox-instance-mask-func-name",
        "engine-create-func-name",
        "parse-classifier-func-name",
        "custom-network-config",
        "tlt-encoded-model",
        "tlt-model-key",
        "onnx-file",
        "num-detected-classes",
        "enable-dbscan",
        "cluster-mode",
        "classifier-type",
        "classifier-threshold",
        "classifier-async-mode",
        "segmentation-threshold",
        "segmentation-output-order",
        "output-instance-mask",
        "input-object-min-width",
        "input-object-min-height",
        "input-object-max-width",
        "input-object-max-height",
        "operate-on-gie-id",
        "operate-on-class-ids",
        "filter-out-class-ids",
        # Caffe and UFF models: gone with TensorRT 10's parsers (DeepStream 7.1 and later)
        "model-file",
        "proto-file",
        "uff-file",
        "uff-input-order",
        "input-dims",
        "uff-input-dims",
        "uff-input-blob-name",
    }
)
_CAFFE_UFF = frozenset(
    {
        "model-file",
        "proto-file",
        "uff-file",
        "uff-input-order",
        "input-dims",
        "uff-input-dims",
        "uff-input-blob-name",
    }
)

# [class-attrs-all] / [class-attrs-<id>] keys.
CLASS_ATTRS_KEYS = frozenset(
    {
        "threshold",
        "pre-cluster-threshold",
        "post-cluster-threshold",
        "eps",
        "group-threshold",
        "minBoxes",
        "dbscan-min-score",
        "roi-top-offset",
        "roi-bottom-offset",
        "detected-min-w",
        "detected-min-h",
        "detected-max-w",
        "detected-max-h",
        "border-color",
        "bg-color",
        "nms-iou-threshold",
        "topk",
    }
)

# deepstream-app groups and the keys we write in each (a subset of the documented ones).
APP_KEYS = {
    "application": frozenset({"enable-perf-measurement", "perf-measurement-interval-sec"}),
    "source0": frozenset({"enable", "type", "uri", "num-sources", "gpu-id", "cudadec-memtype"}),
    "streammux": frozenset(
        {"gpu-id", "batch-size", "batched-push-timeout", "width", "height", "live-source", "enable-padding"}
    ),
    "primary-gie": frozenset({"enable", "gpu-id", "gie-unique-id", "config-file", "batch-size"}),
    "sink0": frozenset({"enable", "type", "sync", "source-id", "gpu-id"}),
    "osd": frozenset({"enable", "gpu-id"}),
    "tests": frozenset({"file-loop"}),
}

NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}
NETWORK_TYPE = {"detector": 0, "classifier": 1, "segmentation": 2, "other": 100}
COLOR_FORMAT = {"rgb": 0, "bgr": 1, "gray": 2}
INPUT_ORDER = {"NCHW": 0, "NHWC": 1}


def deepstream_version(jetpack: str | None) -> str:
    try:
        return DEEPSTREAM_FOR_JETPACK[str(jetpack)]
    except KeyError:
        raise TrtbuildError(
            f"no DeepStream release is known for JetPack {jetpack}",
            f"use a Jetson target with JetPack {', '.join(DEEPSTREAM_FOR_JETPACK)}",
        ) from None


def property_keys(ds_version: str) -> frozenset[str]:
    """The [property] keys DeepStream ``ds_version`` parses."""
    major, minor = (int(p) for p in ds_version.split(".")[:2])
    return PROPERTY_KEYS - _CAFFE_UFF if (major, minor) >= (7, 1) else PROPERTY_KEYS
