"""TensorRT version rules as data: which API feature and which trtexec flag exists in which version.

Every decision that depends on the TensorRT version (in the plan, the Python-API builder and the trtexec
renderer) asks :func:`has` / :func:`trtexec_flag_exists` instead of comparing numbers inline, so one table
says what changed when. Sources: TensorRT release notes, API docs and ``trtexec --help`` per version,
summarised with their reasons in docs/tensorrt-versions.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from trtbuild.core.errors import TrtbuildError


@total_ordering
@dataclass(frozen=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str | TrtVersion) -> TrtVersion:
        if isinstance(text, TrtVersion):
            return text
        match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*", str(text).strip())
        if not match:
            raise TrtbuildError(f"cannot parse TensorRT version '{text}'", "write it like 10.13 or 8.6.2")
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, TrtVersion):
            return NotImplemented
        return (self.major, self.minor, self.patch) < (other.major, other.minor, other.patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch else "")

    @property
    def short(self) -> str:
        """Major.minor: what decides API and flag availability."""
        return f"{self.major}.{self.minor}"


V = TrtVersion.parse


@dataclass(frozen=True)
class Span:
    """Available from ``since`` (inclusive) until ``removed`` (exclusive; None = still there)."""

    since: TrtVersion
    removed: TrtVersion | None = None

    def contains(self, version: TrtVersion) -> bool:
        return version >= self.since and (self.removed is None or version < self.removed)


def _span(since: str, removed: str | None = None) -> Span:
    return Span(V(since), V(removed) if removed else None)


# Builder API features (Python API and C++ alike).
FEATURES: dict[str, Span] = {
    "memory_pool_limit": _span("8.4"),  # set_memory_pool_limit(WORKSPACE, n); max_workspace_size gone in 10.0
    "explicit_batch_flag": _span("7.0", "10.0"),  # required before 10.0; ignored in 10.x, gone in 11
    "strongly_typed": _span("9.0"),  # NetworkDefinitionCreationFlag.STRONGLY_TYPED; the only mode in 11
    "precision_flags": _span("7.0", "11.0"),  # BuilderFlag.FP16/INT8/BF16/FP8 (deprecated 10.12)
    "int8_calibrator": _span("7.0", "11.0"),  # IInt8EntropyCalibrator2, config.int8_calibrator (depr. 10.1)
    "bf16": _span("9.0"),  # DataType.BF16 / BuilderFlag.BF16
    "fp8": _span("10.0"),  # FP8 Q/DQ conv+gemm are production-ready from 10.0 (8.6/9.x: preview, LLM-only)
    "int4_weight_only": _span("10.0"),  # INT4 block-quantized DequantizeLinear into GEMM
    "builder_optimization_level": _span("8.6"),
    "hardware_compat_ampere_plus": _span("8.6"),
    "hardware_compat_same_compute_capability": _span("10.9"),
    "version_compatible": _span("8.6"),
    "timing_cache": _span("8.0"),
    "sparse_weights": _span("8.0"),
    "device_memory_size_v2": _span("10.1"),
    "device_memory_size": _span("7.0", "11.0"),
    # ParserError.node_name() is in the Python bindings from 9.1 (8.6 has node() only: calling it there raised
    # AttributeError and hid the parser's message). See docs/tensorrt-versions.md.
    "parser_error_node_name": _span("9.1"),
}

# trtexec flags and the versions whose trtexec accepts them.
TRTEXEC_FLAGS: dict[str, Span] = {
    "--onnx": _span("7.0"),
    "--saveEngine": _span("7.0"),
    "--minShapes": _span("7.0"),
    "--optShapes": _span("7.0"),
    "--maxShapes": _span("7.0"),
    "--fp16": _span("7.0", "11.0"),
    "--int8": _span("7.0", "11.0"),
    "--calib": _span("7.0", "11.0"),
    "--bf16": _span("9.0", "11.0"),
    "--fp8": _span("9.0", "11.0"),
    "--stronglyTyped": _span("9.0"),  # accepted but implied (a no-op) in 11.x, so we omit it there
    "--memPoolSize": _span("8.4"),  # workspace:<N MiB>; unit suffixes parsed correctly only from 10.1
    "--builderOptimizationLevel": _span("8.6"),
    "--hardwareCompatibilityLevel": _span("8.6"),  # "ampere+" since 8.6, "sameComputeCapability" since 10.9
    "--versionCompatible": _span("8.6"),
    "--timingCacheFile": _span("8.0"),
    "--useDLACore": _span("7.0"),
    "--allowGPUFallback": _span("7.0"),
    "--sparsity": _span("8.0"),
}

# From here on --memPoolSize parses a unit suffix. 10.0 multiplies a suffixed value by 2^20 twice (the cap is
# silently lost) and older versions take MiB, so before 10.1 we write a bare MiB number.
MEMPOOL_SUFFIX_SINCE = V("10.1")

# Every TensorRT release trtbuild plans for: (major, minor) -> the patch releases that exist (GA, EA and the
# JetPack-only ones). 9.x was a limited LLM-only release, and 8.4 (JetPack 5.0.2) predates what we support,
# so both are left out. Sources per entry: docs/tensorrt-versions.md.
RELEASES: dict[tuple[int, int], tuple[int, ...]] = {
    (8, 5): (1, 2, 3),  # 8.5.2: JetPack 5.1.x
    (8, 6): (0, 1, 2),  # 8.6.0 EA; 8.6.2: JetPack 6.0
    (10, 0): (0, 1),  # 10.0.0 EA, 10.0.1 GA
    **{(10, minor): (0,) for minor in range(1, 13)},  # 10.3.0: JetPack 6.1/6.2
    (10, 13): (0, 2, 3),  # JetPack 7.0/7.1 (Thor)
    (10, 14): (1,),
    (10, 15): (1,),
    (10, 16): (0, 1),  # JetPack 7.2
    (11, 0): (0,),
    (11, 1): (0,),
    (11, 2): (1,),
    (11, 3): (0,),
    (11, 4): (0, 1),  # 11.4.1: JetPack 7.2.2+
}
KNOWN_MAJORS = tuple(sorted({major for major, _ in RELEASES}))

# DLA support by TensorRT version: 10.7 was the last 10.x with DLA; it returns in 11.4.1 (JetPack 7.2.2+).
DLA_SPANS = (_span("7.0", "10.8"), _span("11.4.1"))


def known_versions_text() -> str:
    """`8.5, 8.6, 10.0, ..., 11.4` for error messages."""
    return ", ".join(f"{major}.{minor}" for major, minor in RELEASES)


def known_version(text: str | TrtVersion) -> TrtVersion:
    """Parse a user-given version and accept it only if that TensorRT release exists (``RELEASES``).

    ``10.13`` names the release line (any patch); ``10.13.3`` (optionally with a build number, ``10.13.3.9``)
    must be a patch release that exists. Without this, ``8.10.0`` wrote a ``TRT-9000`` cache header (9.0)
    and ``10.100`` one that reads as 11.0."""
    if isinstance(text, TrtVersion):
        raw, version = str(text), text
    else:
        raw, version = str(text).strip(), TrtVersion.parse(text)
    patches = RELEASES.get((version.major, version.minor))
    explicit_patch = raw.count(".") >= 2
    if patches is None or (explicit_patch and version.patch not in patches):
        raise TrtbuildError(
            f"TensorRT {raw} is not a release trtbuild knows",
            f"use one of {known_versions_text()} (major.minor, or a patch release that exists)",
        )
    return version


def dla_supported(version: TrtVersion | str) -> bool:
    """Whether this TensorRT version can build for DLA at all (the device must have DLA cores too)."""
    v = V(version)
    return any(span.contains(v) for span in DLA_SPANS)


def has(feature: str, version: TrtVersion | str) -> bool:
    return FEATURES[feature].contains(V(version))


def trtexec_flag_exists(flag: str, version: TrtVersion | str) -> bool:
    name = flag.split("=", 1)[0]
    span = TRTEXEC_FLAGS.get(name)
    return span is not None and span.contains(V(version))


def strongly_typed_only(version: TrtVersion | str) -> bool:
    """11.x removed precision flags and calibrators: every network is strongly typed."""
    return not has("precision_flags", version)


def calibration_cache_version_tag(version: TrtVersion | str) -> str:
    """The number TensorRT writes in a calibration cache header (``TRT-<tag>-EntropyCalibration2``):
    major*1000 + minor*100 + patch before 10.0 (8.5.2 -> 8502), major*10000 + minor*100 + patch from 10.0."""
    v = V(version)
    if v.major >= 10:
        return str(v.major * 10000 + v.minor * 100 + v.patch)
    return str(v.major * 1000 + v.minor * 100 + v.patch)
