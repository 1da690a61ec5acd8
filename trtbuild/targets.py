"""Deployment targets as data: GPU architecture, TensorRT versions it ships with, precisions, DLA, defaults.

Data-center GPUs accept any TensorRT a user installs (8.6, 10.x, 11.x); a Jetson's TensorRT is fixed by
its JetPack, and engines must be built on the device with that version. Which JetPack ships which TensorRT,
and where DLA exists: docs/tensorrt-versions.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtbuild.core.defaults import DEFAULT_TRT_VERSION
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.trt_versions import TrtVersion, V, dla_supported, has, known_version

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4-weights")


@dataclass(frozen=True)
class Target:
    id: str
    name: str
    kind: str  # "datacenter" or "jetson"
    sm: tuple[int, int]
    default_trt: str
    trt_versions: tuple[str, ...] = ()  # Jetson: the exact versions its JetPack ships; empty = any known
    min_trt: str = "8.6"  # data center: oldest TensorRT that supports the architecture and that we plan for
    jetpack: str | None = None
    dla_cores: int = 0  # DLA engines in the hardware; usable only where the TensorRT supports DLA
    workspace_mib: int = 4096
    opt_level: int = 3
    note: str = ""
    memory_gib: float = 0.0  # GPU memory; on Jetson the DRAM it shares with the OS (trtbuild/memory_plan.py)

    @property
    def sm_text(self) -> str:
        return f"sm{self.sm[0]}{self.sm[1]}"

    @property
    def compute_capability(self) -> str:
        return f"{self.sm[0]}.{self.sm[1]}"

    @property
    def precisions(self) -> tuple[str, ...]:
        """What the GPU can run: BF16 and INT4 weight-only need sm80+ (Ampere); FP8 sm89+ (Ada/Hopper)."""
        out = ["fp32", "fp16"]
        if self.sm >= (8, 0):
            out.append("bf16")
        out.append("int8")
        if self.sm >= (8, 9):
            out.append("fp8")
        if self.sm >= (8, 0):
            out.append(
                "int4-weights"
            )  # TensorRT's INT4 weight-only GEMMs: Ampere+ (docs/int4-weight-only.md)
        return tuple(out)

    @property
    def supports_sparsity(self) -> bool:
        return self.sm >= (8, 0)  # 2:4 structured sparsity Tensor Cores arrived with Ampere

    def dla_cores_for(self, version: TrtVersion | str) -> int:
        """DLA cores usable with this TensorRT: none where the version has no DLA support (10.8-11.4.0)."""
        return self.dla_cores if dla_supported(version) else 0

    def resolve_trt(self, version: str | None) -> TrtVersion:
        """The TensorRT version to plan for, checked against the release table and what this target runs."""
        if version is None:
            return V(self.default_trt)
        v = known_version(version)
        if self.trt_versions:
            allowed = [V(t) for t in self.trt_versions]
            if not any(v.short == a.short for a in allowed):
                raise TrtbuildError(
                    f"target '{self.id}' (JetPack {self.jetpack}) ships TensorRT "
                    f"{' or '.join(self.trt_versions)}, not {version}",
                    "drop --trt-version or pick another Jetson target (see `trtbuild targets`)",
                )
            shipped = next(t for t in self.trt_versions if V(t).short == v.short)
            # A JetPack pins its patch (8.6.2 on 6.0): another patch of that line is not on the device.
            if shipped.count(".") >= 2 and str(version).count(".") >= 2 and V(shipped) != v:
                raise TrtbuildError(
                    f"target '{self.id}' (JetPack {self.jetpack}) ships TensorRT {shipped}, not {version}",
                    f"drop --trt-version or pass {shipped}",
                )
            return V(shipped) if v.patch == 0 else v
        if v < V(self.min_trt):
            raise TrtbuildError(
                f"TensorRT {version} is not supported for {self.name}",
                f"use {self.min_trt}, 10.x or 11.x (default {self.default_trt})",
            )
        return v

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "sm": self.sm_text,
            "compute_capability": self.compute_capability,
            "jetpack": self.jetpack,
            "trt_versions": list(self.trt_versions) or [f">={self.min_trt}", "10.x", "11.x"],
            "default_trt": self.default_trt,
            "precisions": list(self.precisions),
            "dla_cores": self.dla_cores_for(self.default_trt),
            "dla_hardware_cores": self.dla_cores,
            "sparsity": self.supports_sparsity,
            "workspace_mib": self.workspace_mib,
            "opt_level": self.opt_level if has("builder_optimization_level", self.default_trt) else None,
            "memory_gib": self.memory_gib,
            "note": self.note,
        }


_DC = "datacenter"
_JET = "jetson"

TARGETS: dict[str, Target] = {
    t.id: t
    for t in (
        Target(
            "a100", "NVIDIA A100", _DC, (8, 0), DEFAULT_TRT_VERSION, note="no FP8; 80 GB part", memory_gib=80
        ),
        Target("h100", "NVIDIA H100", _DC, (9, 0), DEFAULT_TRT_VERSION, memory_gib=80),
        Target("l4", "NVIDIA L4", _DC, (8, 9), DEFAULT_TRT_VERSION, memory_gib=24),
        Target("l40s", "NVIDIA L40S", _DC, (8, 9), DEFAULT_TRT_VERSION, memory_gib=48),
        Target(
            "xavier-jp5",
            "Jetson AGX Xavier (JetPack 5.1)",
            _JET,
            (7, 2),
            "8.5.2",
            ("8.5.2",),
            jetpack="5.1",
            dla_cores=2,
            workspace_mib=1024,
            memory_gib=32,
            note="DLA v1; implicit INT8 from a calibration cache works",
        ),
        Target(
            "orin-jp6.0",
            "Jetson AGX Orin (JetPack 6.0)",
            _JET,
            (8, 7),
            "8.6.2",
            ("8.6.2",),
            jetpack="6.0",
            dla_cores=2,
            workspace_mib=2048,
            memory_gib=64,
            note="DLA v2 (Orin NX has 1 DLA, Orin Nano none)",
        ),
        Target(
            "orin-jp6.1",
            "Jetson AGX Orin (JetPack 6.1)",
            _JET,
            (8, 7),
            "10.3",
            ("10.3",),
            jetpack="6.1",
            dla_cores=2,
            workspace_mib=2048,
            memory_gib=64,
            note="calibrators deprecated but present",
        ),
        Target(
            "orin-jp6.2",
            "Jetson AGX Orin (JetPack 6.2)",
            _JET,
            (8, 7),
            "10.3",
            ("10.3",),
            jetpack="6.2",
            dla_cores=2,
            workspace_mib=2048,
            memory_gib=64,
            note="calibrators deprecated but present",
        ),
        # JetPack 7.0/7.1 (L4T R38) are Thor-only: Orin's first JetPack 7 is 7.2 (L4T R39.2, TensorRT 10.16).
        Target(
            "orin-jp7",
            "Jetson AGX Orin (JetPack 7.2)",
            _JET,
            (8, 7),
            "10.16",
            ("10.16",),
            jetpack="7.2",
            dla_cores=2,
            workspace_mib=2048,
            memory_gib=64,
            note="no DLA in TensorRT 10.16 (10.7 was the last 10.x with it; back in 11.4.1, JetPack 7.2.2+)",
        ),
        Target(
            "thor",
            "Jetson AGX Thor (JetPack 7.x)",
            _JET,
            (11, 0),
            "10.13",
            ("10.13", "10.16"),
            jetpack="7.x",
            workspace_mib=4096,
            memory_gib=128,
            note="no DLA; TensorRT 10.13 on JetPack 7.0/7.1 (L4T R38), 10.16 on 7.2 (L4T R39)",
        ),
    )
}


def get_target(target_id: str) -> Target:
    try:
        return TARGETS[target_id.lower()]
    except KeyError:
        raise TrtbuildError(
            f"unknown target '{target_id}'", f"use one of {', '.join(TARGETS)} (see `trtbuild targets`)"
        ) from None


def check_precision(precision: str) -> str:
    p = precision.lower()
    if p not in PRECISIONS:
        raise TrtbuildError(f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    return p
