"""TUF metadata files stored in the registry as one-layer OCI artifacts, one tag per file:
``tuf.timestamp`` and the versioned ``tuf.root.N``, ``tuf.snapshot.N``, ``tuf.targets.N`` (consistent
snapshots: a client never sees a half-published release)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import oci

ROLES = ("root", "targets", "snapshot", "timestamp")


def tag(role: str, version: int | None = None) -> str:
    return f"tuf.{role}" if version is None else f"tuf.{role}.{version}"


def tag_for_filename(name: str) -> str | None:
    """``timestamp.json`` / ``3.snapshot.json`` (the names python-tuf asks for) -> tag, or None."""
    if not name.endswith(".json"):
        return None
    stem = name[: -len(".json")]
    if stem in ROLES:
        return tag(stem)
    version, _, role = stem.partition(".")
    if version.isdigit() and role in ROLES:
        return tag(role, int(version))
    return None


def push(reg: oci.Registry, role: str, data: bytes, version: int | None) -> str:
    with tempfile.TemporaryDirectory(prefix="trtbuild-tuf-") as tmp:
        name = f"{version}.{role}.json" if version is not None else f"{role}.json"
        path = Path(tmp) / name
        path.write_bytes(data)
        return oci.push_file(
            reg,
            path,
            tag(role, version),
            oci.TUF_MEDIA_TYPE,
            oci.TUF_CONFIG_MEDIA_TYPE,
            {"org.opencontainers.image.title": name},
        )


def fetch(reg: oci.Registry, role: str, version: int | None = None, max_bytes: int = 8 << 20) -> bytes | None:
    """A metadata file by tag (publisher side; the device side goes through python-tuf's fetcher)."""
    doc = oci.manifest(reg, tag(role, version))
    if doc is None:
        return None
    out = bytearray()
    for chunk in oci.stream_blob(reg, str(doc["layers"][0]["digest"])):
        out += chunk
        if len(out) > max_bytes:
            raise TrtbuildError(
                f"{tag(role, version)} is larger than {max_bytes} bytes", "check the registry"
            )
    return bytes(out)
