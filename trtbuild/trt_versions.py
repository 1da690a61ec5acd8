"""TensorRT version rules as data: which API feature and which trtexec flag exists in which version.

Every decision that depends on the TensorRT version (in the plan, the Python-API builder and the trtexec
renderer) asks :func:`has` / :func:`trtexec_flag_exists` instead of comparing numbers inline, so one table
says what changed when. Sources: TensorRT release notes, API docs and ``trtexec --help`` per version
(summarised in shared/DESIGN.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from trtbuild.errors import TrtbuildError


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
    "builder_optimization_level": _span("8.6"),
    "hardware_compat_ampere_plus": _span("8.6"),
    "hardware_compat_same_compute_capability": _span("10.9"),
    "version_compatible": _span("8.6"),
    "timing_cache": _span("8.0"),
    "sparse_weights": _span("8.0"),
    "device_memory_size_v2": _span("10.1"),
    "device_memory_size": _span("7.0", "11.0"),
    "parser_error_node_name": _span("8.6"),  # ParserError.node_name(); older ones give the index only
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
    "--memPoolSize": _span("8.4"),  # workspace:<N>; unit suffixes (M) accepted from 8.6
    "--builderOptimizationLevel": _span("8.6"),
    "--hardwareCompatibilityLevel": _span("8.6"),  # "ampere+" since 8.6, "sameComputeCapability" since 10.9
    "--versionCompatible": _span("8.6"),
    "--timingCacheFile": _span("8.0"),
    "--useDLACore": _span("7.0"),
    "--allowGPUFallback": _span("7.0"),
    "--sparsity": _span("8.0"),
}

# Below this, --memPoolSize takes a bare number of MiB; from here on it accepts a unit suffix.
MEMPOOL_SUFFIX_SINCE = V("8.6")

# Versions trtbuild knows how to plan for. 9.x was a limited LLM-only release, so it is left out.
KNOWN_MAJORS = (8, 10, 11)


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
