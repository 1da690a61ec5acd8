"""TensorRT's legacy calibration cache (implicit INT8, TensorRT <= 10.x): write and read.

Format: a header ``TRT-<version int>-EntropyCalibration2``, then ``<tensor>: <8 hex digits>`` per tensor,
the hex being the big-endian IEEE-754 bits of the float32 scale = amax / 127.

The version int is TensorRT's ``getInferLibVersion()`` (``NV_TENSORRT_VERSION``), whose encoding changed:
  - TensorRT 8.x:  major*1000  + minor*100 + patch   (8.5.2 -> 8502, 8.6.1 -> 8601)
  - TensorRT 10.x: major*10000 + minor*100 + patch   (10.3.0 -> 100300, 10.13.0 -> 101300, 10.16.0 -> 101600)
    (NvInferRuntimeBase.h: NV_TENSORRT_VERSION_INT; the change was needed once minors reached two digits.)
TensorRT 11 has no calibrators and no cache: we refuse to write one for it. TensorRT's own caches also list
the network inputs; ours do too when the ranges include them (calibrators.collect measures the float inputs).
Version table and sources: docs/tensorrt-versions.md.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from pathlib import Path

from calibrators.ranges import TensorRange
from trtbuild.core import atomic
from trtbuild.core.defaults import DEFAULT_TRT_VERSION
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.trt_versions import calibration_cache_version_tag, known_version

ALGORITHM = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_LINE = re.compile(r"^(?P<name>.+): (?P<hex>[0-9a-fA-F]{8})$")


def version_int(trt_version: str) -> int:
    """``8.5.2`` -> 8502, ``10.13`` -> 101300 (see module docstring). Only releases in the version table are
    accepted: an impossible one (``8.10.0``, ``10.100``) would encode as another version's header."""
    version = known_version(trt_version)
    if version.major >= 11:
        raise TrtbuildError(
            f"TensorRT {trt_version} has no calibrators, so it reads no calibration cache",
            "use the Q/DQ ONNX from `trtbuild quantize` for TensorRT 11",
        )
    return int(calibration_cache_version_tag(version))


def header(trt_version: str) -> str:
    return f"TRT-{version_int(trt_version)}-{ALGORITHM}"


def scale_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_scale(text: str) -> float:
    return float(struct.unpack(">f", bytes.fromhex(text))[0])


def render(scales: Mapping[str, float], version_tag: str | int) -> str:
    """The cache text: ``TRT-<tag>-EntropyCalibration2``, then ``<tensor>: <hex>`` per tensor, hex being the
    big-endian float32 bits of the scale (amax / 127). The one codec: files we write and the bytes the
    TensorRT backend serves to a calibrator both come from here."""
    lines = [f"TRT-{version_tag}-{ALGORITHM}"]
    for name, scale in scales.items():
        if ": " in name or "\n" in name:
            raise TrtbuildError(
                f"tensor name {name!r} cannot be written to a calibration cache",
                "rename the tensor in the ONNX model",
            )
        lines.append(f"{name}: {scale_hex(float(scale))}")
    return "\n".join(lines) + "\n"


def cache_text(ranges: Mapping[str, TensorRange], trt_version: str = DEFAULT_TRT_VERSION) -> str:
    return render({name: r.amax / 127.0 for name, r in ranges.items()}, version_int(trt_version))


def write_cache(
    ranges: Mapping[str, TensorRange], path: str | Path, trt_version: str = DEFAULT_TRT_VERSION
) -> Path:
    """Write the cache atomically for the given TensorRT version."""
    return atomic.write_text(path, cache_text(ranges, trt_version))


def read_cache_with_header(path: str | Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) from a cache file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrtbuildError(
            f"cannot read calibration cache {path}: {exc}", "pass a cache written by trtbuild or TensorRT"
        ) from exc
    if not lines or not _HEADER.match(lines[0].strip()):
        raise TrtbuildError(
            f"{path} is not a TensorRT calibration cache (no TRT-<version>-<algorithm> header)",
            "pass a cache written by `trtbuild calibrate` or TensorRT",
        )
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        match = _LINE.match(line.rstrip())
        if not match:
            raise TrtbuildError(f"{path}:{number} is not '<tensor>: <8 hex digits>'", "regenerate the cache")
        scales[match["name"]] = hex_scale(match["hex"])
    return lines[0].strip(), scales


def read_cache(path: str | Path) -> dict[str, float]:
    """{tensor: scale} (scale = amax / 127) from a cache file."""
    return read_cache_with_header(path)[1]
