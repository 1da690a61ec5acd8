"""`bundle verify`: signature, every hash, and the bundle's target against the device, then (optionally)
extraction. Every failure is a TrtbuildError with a one-line reason; nothing is extracted unless all pass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trtbuild.bundle.archive import Limits, read_bundle
from trtbuild.bundle.device import Device, detect_device
from trtbuild.bundle.manifest import Manifest
from trtbuild.core.atomic import atomic_dir
from trtbuild.core.errors import TrtbuildError

SKIP = "skip"


@dataclass(frozen=True)
class VerifyReport:
    manifest: Manifest
    key_id: str
    files_checked: int
    bytes_checked: int
    device_check: str  # what was compared, in words
    extracted_to: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "bundle": self.manifest.name,
            "target": self.manifest.target,
            "precision": self.manifest.precision,
            "requires": self.manifest.requires,
            "key_id": self.key_id,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "device_check": self.device_check,
            "extracted_to": str(self.extracted_to) if self.extracted_to else None,
        }


def jetpack_compatible(want: str, have: str | None) -> bool:
    """Same JetPack, or "7.x" vs any 7.y, or 6.1 vs 6.2 (both ship TensorRT 10.3)."""
    if have is None:
        return False
    if want == have or {want, have} == {"6.1", "6.2"}:
        return True
    return (want.endswith(".x") or have.endswith(".x")) and want.split(".")[0] == have.split(".")[0]


def check_device(manifest: Manifest, device: str | None, detected: Device | None) -> str:
    """Compare the bundle's target with the device; return what was checked, or raise on a mismatch.

    ``device``: a target id the user states for this machine, ``"skip"`` to skip it, None to detect.
    """
    if device == SKIP:
        return f"skipped on request (bundle targets {manifest.target})"
    if device is not None:
        if device.lower() != manifest.target.lower():
            raise TrtbuildError(
                f"bundle targets '{manifest.target}' but the device is '{device}'",
                f"use the bundle built for {device}",
            )
        return f"stated device '{device}' matches target"
    req = manifest.requires
    kind = req.get("kind")
    if kind == "qualcomm":
        return "not device-bound (Qualcomm handoff converts on any host with the QAIRT SDK)"
    if detected is None:
        raise TrtbuildError(
            f"cannot check target '{manifest.target}' on this machine: no Jetson (/etc/nv_tegra_release) and "
            "no NVIDIA GPU (nvidia-smi) found",
            f"pass --device {manifest.target} to state the device, or --device skip to skip the check",
        )
    if kind == "jetson":
        if detected.kind != "jetson":
            raise TrtbuildError(
                f"bundle targets Jetson '{manifest.target}' but this machine is {detected.description}",
                "copy the bundle to the Jetson it was built for",
            )
        want, have = str(req.get("jetpack", "")), detected.jetpack
        if want and not jetpack_compatible(want, have):
            raise TrtbuildError(
                f"bundle needs JetPack {want} but this Jetson runs JetPack {have or 'unknown'}",
                f"use the bundle built for JetPack {have}"
                if have
                else f"pass --device {manifest.target} if you know the JetPack matches",
            )
        return f"Jetson, JetPack {detected.jetpack or 'unknown'} (bundle needs {want or 'any'})"
    if kind == "datacenter":
        if detected.kind != "datacenter":
            raise TrtbuildError(
                f"bundle targets GPU '{manifest.target}' but this machine is {detected.description}",
                "use the bundle built for this device",
            )
        want_sm = req.get("sm")
        if want_sm and detected.sm != want_sm:
            raise TrtbuildError(
                f"bundle targets {manifest.target} ({want_sm}) but this GPU is "
                f"{detected.description} ({detected.sm})",
                "use the bundle built for this GPU",
            )
        return f"{detected.description} ({detected.sm}) matches {want_sm or manifest.target}"
    raise TrtbuildError(f"bundle has an unknown device kind {kind!r}", "rebuild the bundle")


def verify_bundle(
    path: str | os.PathLike[str],
    public: Ed25519PublicKey,
    device: str | None = None,
    extract_to: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
) -> VerifyReport:
    """Check the bundle and, if ``extract_to`` is given, extract it there (all or nothing)."""
    checked: list[str] = []

    def device_gate(manifest: Manifest) -> None:
        checked.append(check_device(manifest, device, None if device else detect_device()))

    if extract_to is None:
        contents = read_bundle(path, public, None, limits or Limits(), device_gate)
        dest = None
    else:
        dest = Path(extract_to)
        try:
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                raise TrtbuildError(f"{dest} exists and is not a folder", "extract into a new folder")
            if dest.exists() and any(dest.iterdir()):
                raise TrtbuildError(f"{dest} exists and is not empty", "extract into a new folder")
        except OSError as exc:
            raise TrtbuildError(
                f"cannot use {dest}: {exc.strerror}", "pick a destination you can write"
            ) from exc
        try:
            # a private temp folder beside dest (stale ones of killed runs are removed first); it becomes
            # dest, with the umask's mode, only when every check passed; folders made for it are removed
            # again on failure
            with atomic_dir(dest) as tmp:
                contents = read_bundle(path, public, tmp, limits or Limits(), device_gate)
        except OSError as exc:
            raise TrtbuildError(
                f"cannot extract to {dest}: {exc.strerror} ({exc.filename})",
                "pick a writable destination folder",
            ) from exc
    return VerifyReport(
        contents.manifest, contents.key_id, contents.files_checked, contents.bytes_checked, checked[0], dest
    )
