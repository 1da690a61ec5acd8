"""`fleet publish`: each signed bundle becomes an OCI artifact (tagged per model/target/precision/version,
annotated from its manifest) and a target in the TUF targets metadata, all in one new release version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trtbuild.bundle.manifest import Manifest
from trtbuild.bundle.verify import SKIP, verify_bundle
from trtbuild.fleet import oci, repository
from trtbuild.fleet.repository import EXPIRY, RoleKeys


@dataclass(frozen=True)
class Published:
    path: str  # the TUF target path
    tag: str
    digest: str
    length: int


def oci_annotations(manifest: Manifest, path: Path) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": path.name,
        "org.opencontainers.image.version": manifest.model_version,
        "org.opencontainers.image.created": manifest.created,
        "dev.trtbuild.model": manifest.model,
        "dev.trtbuild.target": manifest.target,
        "dev.trtbuild.precision": manifest.precision,
        "dev.trtbuild.requires.kind": str(manifest.requires.get("kind", "")),
    }


def custom(manifest: Manifest, tag: str) -> dict[str, Any]:
    """What devices select on; the bundle itself is checked against it after download (no mix-and-match)."""
    return {
        "trtbuild": {
            "model": manifest.model,
            "version": manifest.model_version,
            "target": manifest.target,
            "precision": manifest.precision,
            "requires": manifest.requires,
            "tag": tag,
        }
    }


def publish(
    reg: oci.Registry,
    bundles: Sequence[Path],
    bundle_key: Ed25519PublicKey,
    keys: RoleKeys,
    timestamp_ttl: timedelta = EXPIRY["timestamp"],
) -> tuple[int, list[Published]]:
    """Verify every bundle first (nothing is pushed if one is bad), push them, then sign one new release."""
    manifests = [verify_bundle(path, bundle_key, device=SKIP).manifest for path in bundles]
    entries: list[tuple[str, Path, dict[str, Any]]] = []
    done: list[Published] = []
    for path, manifest in zip(bundles, manifests, strict=True):
        tag = oci.tag_for(manifest.model, manifest.target, manifest.precision, manifest.model_version)
        notes = oci_annotations(manifest, path)
        digest = oci.push_file(reg, path, tag, oci.BUNDLE_MEDIA_TYPE, oci.BUNDLE_CONFIG_MEDIA_TYPE, notes)
        target = repository.target_path(manifest.model, manifest.target, manifest.precision, path.name)
        entries.append((target, path, custom(manifest, tag)))
        done.append(Published(target, tag, digest, path.stat().st_size))
    version = repository.add_targets(reg, keys, entries, timestamp_ttl)
    return version, done
