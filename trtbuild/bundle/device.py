"""Which device is this? Jetson from /etc/nv_tegra_release (L4T release -> JetPack), data-center GPU from
nvidia-smi. On a machine that is neither, nothing is guessed: the caller must name the device."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

TEGRA_RELEASE = Path("/etc/nv_tegra_release")

# L4T release -> JetPack (docs/tensorrt-versions.md), most specific first: (major, revision, min patch).
# R35.1 is JetPack 5.0.2 (TensorRT 8.4), R35.2+ the 5.1.x line (8.5.2); R36.2/36.3 = 6.0 (8.6.2); R36.4 = 6.1
# before patch 3 and 6.2 from 36.4.3, and R36.5 is 6.2.1/6.2.2 (all TensorRT 10.3, reported as the "6.2"
# family the targets use); R38 = 7.0/7.1 (Thor only, TensorRT 10.13); R39 = 7.2 (Orin's first JetPack 7).
_L4T_TO_JETPACK: tuple[tuple[tuple[int, ...], str], ...] = (
    ((35, 1), "5.0.2"),
    ((35,), "5.1"),
    ((36, 2), "6.0"),
    ((36, 3), "6.0"),
    ((36, 4, 3), "6.2"),
    ((36, 4), "6.1"),
    ((36, 5), "6.2"),
    ((38,), "7.0/7.1"),
    ((39,), "7.2"),
)


@dataclass(frozen=True)
class Device:
    kind: str  # "jetson", "datacenter"
    description: str
    jetpack: str | None = None
    sm: str | None = None  # e.g. "sm90"


def jetpack_from_l4t(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' -> '6.2'; None when the release is unknown."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    if not match:
        return None
    release = tuple(int(g) for g in match.groups())
    for key, jetpack in _L4T_TO_JETPACK:
        # Leading parts equal, and a patch bound (third part) met from below.
        if release[: min(len(key), 2)] == key[:2] and (len(key) < 3 or release[2] >= key[2]):
            return jetpack
    return None


def detect_device() -> Device | None:
    if TEGRA_RELEASE.is_file():
        text = TEGRA_RELEASE.read_text(errors="replace")
        return Device(
            "jetson", text.strip().splitlines()[0] if text.strip() else "Jetson", jetpack_from_l4t(text)
        )
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        first = out.strip().splitlines()[0] if out.strip() else ""
        if "," in first:
            name, cap = (s.strip() for s in first.split(",", 1))
            return Device("datacenter", name, sm="sm" + cap.replace(".", ""))
    return None
