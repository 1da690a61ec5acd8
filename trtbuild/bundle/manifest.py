"""The bundle manifest: what the bundle is for, what it needs on the device, and the sha256 of every file.

The signature covers :func:`canonical_bytes` (sorted keys, no whitespace, UTF-8), so the same manifest
always signs to the same bytes whatever JSON formatting the file on disk uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from trtbuild import __version__
from trtbuild.errors import TrtbuildError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED = (MANIFEST_NAME, SIGNATURE_NAME)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    model: str
    model_version: str
    target: str
    precision: str
    requires: dict[str, Any]  # e.g. {"kind": "jetson", "tensorrt": "10.3", "jetpack": "6.1", "sm": "sm87"}
    io: dict[str, Any]  # {"inputs": [...], "outputs": [...]}
    files: dict[str, FileEntry]
    fidelity: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema: int = SCHEMA_VERSION

    @property
    def name(self) -> str:
        return f"{self.model}-{self.model_version}-{self.target}-{self.precision}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "trtbuild": __version__,
            "created": self.created,
            "model": {"name": self.model, "version": self.model_version},
            "target": self.target,
            "precision": self.precision,
            "requires": self.requires,
            "io": self.io,
            "fidelity": self.fidelity,
            "profile": self.profile,
            "extra": self.extra,
            "files": {p: {"sha256": f.sha256, "size": f.size} for p, f in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        schema = data.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise TrtbuildError("bundle manifest has no integer schema version", "rebuild the bundle")
        if schema > SCHEMA_VERSION:
            raise TrtbuildError(
                f"bundle manifest uses schema {schema}, newer than this trtbuild reads ({SCHEMA_VERSION})",
                "upgrade trtbuild on this device",
            )
        try:
            model = data["model"]
            files = {str(p): FileEntry(str(f["sha256"]), int(f["size"])) for p, f in data["files"].items()}
            return cls(
                model=str(model["name"]),
                model_version=str(model["version"]),
                target=str(data["target"]),
                precision=str(data["precision"]),
                requires=dict(data["requires"]),
                io=dict(data["io"]),
                files=files,
                fidelity=data.get("fidelity"),
                profile=data.get("profile"),
                extra=dict(data.get("extra") or {}),
                created=str(data.get("created", "")),
                schema=schema,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrtbuildError(
                f"bundle manifest is malformed ({type(exc).__name__}: {exc})",
                "rebuild the bundle with `trtbuild bundle create`",
            ) from exc


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed and verified."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def parse_manifest_bytes(raw: bytes) -> tuple[dict[str, Any], Manifest]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TrtbuildError(f"bundle manifest is not valid JSON ({exc})", "rebuild the bundle") from exc
    if not isinstance(doc, dict):
        raise TrtbuildError("bundle manifest is not a JSON object", "rebuild the bundle")
    return doc, Manifest.from_json(doc)
