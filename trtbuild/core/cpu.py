"""Which integer kernels ONNX Runtime's CPU provider runs on this machine, and whether they saturate.

ORT's x86 int8 GEMM/conv kernels (MLAS) multiply uint8 activations by int8 weights. Without VNNI they use
AVX2/AVX-512BW ``VPMADDUBSW``, which adds each pair of u8 x s8 products into a *saturating* int16:
255 x 127 x 2 = 64770 does not fit in 32767, so large activations meeting large weights are clipped. With
AVX-512 VNNI, AVX-VNNI or AMX the products accumulate in int32 and nothing saturates; on ARM the kernels use
widening dot products (SDOT/UDOT) or 16-bit multiplies. See docs/ort-cpu-int8.md for the sources and the
measurements behind this module.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from trtbuild.core.errors import TrtbuildError

# Flags (as /proc/cpuinfo spells them) that give ORT an int8 path with int32 accumulation.
_NON_SATURATING_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Flags of the saturating u8 x s8 path (VPMADDUBSW on 256 or 512 bits).
_SATURATING_FLAGS = ("avx2", "avx512bw")

# Named CPU kinds a user can build the ORT-CPU variant for when it will run on another machine.
CPU_KINDS = ("x86-vnni", "x86-avx2", "x86-avx512", "arm64")


@dataclass(frozen=True)
class CpuInt8:
    """What matters about a CPU for ORT's int8 kernels."""

    kind: str  # one of CPU_KINDS, or "other"
    flags: tuple[str, ...]  # the int8-relevant flags found
    u8s8_saturates: bool  # True where a pair of u8 x s8 products is summed into a saturating int16
    detected: bool  # read from this machine (False: named by the user)

    def describe(self) -> str:
        where = "this machine" if self.detected else "target"
        flags = ", ".join(self.flags) or "no int8 SIMD flags"
        verdict = (
            "u8 x s8 multiply-add saturates in int16"
            if self.u8s8_saturates
            else "u8 x s8 products accumulate in int32"
        )
        return f"{where}: {self.kind} ({flags}): {verdict}"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "flags": list(self.flags),
            "u8s8_saturates": self.u8s8_saturates,
            "detected": self.detected,
        }


def classify(machine: str, flags: set[str]) -> CpuInt8:
    """Classify a CPU from its architecture name and feature flags."""
    arch = machine.lower()
    if arch in ("aarch64", "arm64"):
        return CpuInt8("arm64", tuple(sorted(f for f in flags if f in ("asimddp", "i8mm"))), False, True)
    if arch not in ("x86_64", "amd64", "i686", "x86"):
        return CpuInt8("other", (), False, True)
    relevant = tuple(f for f in (*_SATURATING_FLAGS, *_NON_SATURATING_FLAGS) if f in flags)
    if any(f in flags for f in _NON_SATURATING_FLAGS):
        return CpuInt8("x86-vnni", relevant, False, True)
    if "avx512bw" in flags:
        return CpuInt8("x86-avx512", relevant, True, True)
    # AVX2, and older x86 too: treat as saturating (MLAS's SSE4.1 path is not documented as exact).
    return CpuInt8("x86-avx2", relevant, True, True)


def _linux_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def detect() -> CpuInt8:
    """This machine's CPU (Linux reads /proc/cpuinfo; elsewhere an x86 CPU counts as saturating)."""
    return classify(platform.machine(), _linux_flags())


def named(kind: str) -> CpuInt8:
    """A CPU kind named by the user (``auto`` detects this machine)."""
    if kind == "auto":
        return detect()
    examples = {
        "x86-vnni": ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}),
        "x86-avx2": ("x86_64", {"avx2"}),
        "x86-avx512": ("x86_64", {"avx2", "avx512bw"}),
        "arm64": ("aarch64", set()),
    }
    if kind not in examples:
        raise TrtbuildError(f"unknown CPU kind '{kind}'", f"use auto or one of {', '.join(CPU_KINDS)}")
    machine, flags = examples[kind]
    found = classify(machine, flags)
    return CpuInt8(found.kind, found.flags, found.u8s8_saturates, detected=False)
