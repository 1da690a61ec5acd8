"""Which device is this? Jetson from /etc/nv_tegra_release (L4T release -> JetPack), data-center GPU from
nvidia-smi. On a machine that is neither, nothing is guessed: the caller must name the device."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

TEGRA_RELEASE = Path("/etc/nv_tegra_release")

# L4T release -> JetPack (NVIDIA's JetPack release notes): R35.x = 5.1.x, R36.2/36.3 = 6.0, R36.4 = 6.1/6.2,
# R38 = 7.x.
_L4T_TO_JETPACK = (((35,), "5.1"), ((36, 2), "6.0"), ((36, 3), "6.0"), ((36, 4), "6.1"), ((38,), "7.x"))


@dataclass(frozen=True)
class Device:
    kind: str  # "jetson", "datacenter"
    description: str
    jetpack: str | None = None
    sm: str | None = None  # e.g. "sm90"


def jetpack_from_l4t(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' -> '6.1'/'6.2' family; None when unknown."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    if not match:
        return None
    major, rev, patch = (int(g) for g in match.groups())
    if (major, rev) == (36, 4) and patch >= 3:
        return "6.2"
    for key, jetpack in _L4T_TO_JETPACK:
        if (major, rev)[: len(key)] == key:
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
