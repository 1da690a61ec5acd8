"""Defaults every stage shares, in one place: the CLI's option defaults and the API's keyword defaults
both read them, so a new release or output folder is one edit."""

from __future__ import annotations

from pathlib import Path

# The TensorRT release data-center plans, calibration caches and quantize metadata assume when none is given
# (docs/tensorrt-versions.md): the newest release that still has calibrators and precision flags.
DEFAULT_TRT_VERSION = "10.13"

# Where artifacts go: <root>/<model>/ (engines/README.md).
OUTPUT_ROOT = Path("engines")

# Export verification, FP32: max |a - b| <= atol + rtol * |b|. ONNX Runtime against PyTorch (two runtimes,
# different kernels) gets more room than a prepared graph against its original in ONNX Runtime.
EXPORT_ATOL = 1e-4
EXPORT_RTOL = 1e-3
PREPARE_ATOL = 1e-5
PREPARE_RTOL = 1e-4
