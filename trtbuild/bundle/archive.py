"""Bundle archives (tar.gz): atomic creation, and one streaming pass that verifies and safely extracts.

Layout: ``manifest.json`` and ``manifest.sig`` are the first two members, then the payload files in sorted
order. Reading checks the signature before any payload byte is trusted, refuses absolute paths, ``..``,
links, device files, sparse and oversized members, hashes every file while streaming it, and extracts into
a temp folder that replaces the destination only when everything checked out: on any failure nothing is
extracted.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trtbuild import atomic
from trtbuild.bundle import signing
from trtbuild.bundle.manifest import (
    MANIFEST_NAME,
    RESERVED,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    canonical_bytes,
    parse_manifest_bytes,
)
from trtbuild.errors import TrtbuildError

_CHUNK = 1 << 20
MAX_MEMBER_BYTES = 8 << 30  # 8 GiB: bigger than any edge model we ship, smaller than a zip bomb's claim
MAX_TOTAL_BYTES = 16 << 30
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 16 << 20


@dataclass(frozen=True)
class Limits:
    member_bytes: int = MAX_MEMBER_BYTES
    total_bytes: int = MAX_TOTAL_BYTES
    members: int = MAX_MEMBERS


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def collect_files(folder: Path) -> dict[str, Path]:
    """Regular files under ``folder`` by POSIX relative path; links and special files are refused."""
    if not folder.is_dir():
        raise TrtbuildError(f"bundle source {folder} is not a folder", "pass the folder an export wrote")
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise TrtbuildError(f"bundle source holds a symlink ({rel})", "replace it with the real file")
        if path.is_dir():
            continue
        if not path.is_file():
            raise TrtbuildError(f"bundle source holds a special file ({rel})", "remove it")
        if rel in RESERVED:
            raise TrtbuildError(
                f"bundle source already holds {rel}", "bundle the export folder, not a bundle"
            )
        files[rel] = path
    if not files:
        raise TrtbuildError(f"bundle source {folder} is empty", "export the model into it first")
    return files


def _tarinfo(name: str, size: int, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def create_bundle(
    folder: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    key: Ed25519PrivateKey,
    *,
    model: str,
    model_version: str,
    target: str,
    precision: str,
    requires: Mapping[str, Any],
    io_spec: Mapping[str, Any],
    fidelity: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Manifest]:
    """Pack ``folder`` into a signed ``.tar.gz`` at ``out_path`` (written atomically)."""
    files = collect_files(Path(folder))
    entries = {rel: FileEntry(sha256_file(p), p.stat().st_size) for rel, p in files.items()}
    manifest = Manifest(
        model=model,
        model_version=model_version,
        target=target,
        precision=precision,
        requires=dict(requires),
        io=dict(io_spec),
        files=entries,
        fidelity=dict(fidelity) if fidelity else None,
        profile=dict(profile) if profile else None,
        extra=dict(extra or {}),
    )
    doc = manifest.to_json()
    manifest_bytes = (canonical_json_pretty(doc)).encode()
    signature = signing.signature_document(key, canonical_bytes(doc))
    out = Path(out_path)
    mtime = 0  # fixed member times and owners: the payload says nothing about the build machine
    with (
        atomic.atomic_path(out, suffix=".partial") as tmp,
        tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature)):
            tar.addfile(_tarinfo(name, len(data), 0o644, mtime), io.BytesIO(data))
        for rel, path in files.items():
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with path.open("rb") as fh:
                tar.addfile(_tarinfo(rel, entries[rel].size, mode, mtime), fh)
            if sha256_file(path) != entries[rel].sha256:
                raise TrtbuildError(f"{rel} changed while it was being bundled", "re-run `bundle create`")
    return out, manifest


def canonical_json_pretty(doc: Mapping[str, Any]) -> str:
    import json

    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


# ---- reading ----


def check_member(member: tarfile.TarInfo, limits: Limits) -> str:
    """The member's safe relative path, or TrtbuildError saying why it is refused."""
    name = member.name
    if not name or "\x00" in name or "\\" in name:
        raise TrtbuildError(f"bundle member {name!r} has an invalid name", "do not deploy this bundle")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise TrtbuildError(f"bundle member '{name}' has an absolute path", "do not deploy this bundle")
    if ".." in path.parts:
        raise TrtbuildError(
            f"bundle member '{name}' escapes the bundle with '..'", "do not deploy this bundle"
        )
    if member.issym() or member.islnk():
        raise TrtbuildError(f"bundle member '{name}' is a link", "do not deploy this bundle")
    if member.isdev() or member.isfifo():
        raise TrtbuildError(f"bundle member '{name}' is a device or FIFO file", "do not deploy this bundle")
    if member.issparse() or not (member.isreg() or member.isdir()):
        raise TrtbuildError(f"bundle member '{name}' is not a regular file", "do not deploy this bundle")
    if member.size > limits.member_bytes:
        raise TrtbuildError(
            f"bundle member '{name}' is oversized ({member.size} bytes > {limits.member_bytes})",
            "do not deploy this bundle",
        )
    return path.as_posix()


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_MANIFEST_BYTES:
        raise TrtbuildError(
            f"bundle {member.name} is oversized ({member.size} bytes)", "do not deploy this bundle"
        )
    fh = tar.extractfile(member)
    if fh is None:
        raise TrtbuildError(f"bundle {member.name} is not a regular file", "do not deploy this bundle")
    data = fh.read()
    if len(data) != member.size:
        raise EOFError("short read")
    return data


@dataclass(frozen=True)
class BundleContents:
    manifest: Manifest
    document: dict[str, Any]
    key_id: str
    files_checked: int
    bytes_checked: int


def read_bundle(
    path: str | os.PathLike[str],
    public: Ed25519PublicKey,
    extract_to: Path | None = None,
    limits: Limits | None = None,
    before_payload: Callable[[Manifest], None] | None = None,
) -> BundleContents:
    """Verify the bundle in one streaming pass (signature, then every member and hash); optionally write the
    payload under ``extract_to`` (which must be an empty temp folder the caller discards on failure).
    ``before_payload`` runs after the signature check and before any payload is read (the device check)."""
    bundle = Path(path)
    if not bundle.is_file():
        raise TrtbuildError(f"bundle {bundle} does not exist", "pass the .tar.gz that `bundle create` wrote")
    try:
        with tarfile.open(bundle, "r|gz") as tar:
            return _scan(tar, public, extract_to, limits or Limits(), before_payload)
    except (tarfile.ReadError, EOFError, zlib.error, tarfile.CompressionError) as exc:
        raise TrtbuildError(
            f"bundle {bundle.name} is truncated or corrupt ({exc or type(exc).__name__})",
            "download the bundle again",
        ) from exc
    except OSError as exc:  # gzip.BadGzipFile and short reads
        raise TrtbuildError(
            f"bundle {bundle.name} is truncated or corrupt ({exc})", "download the bundle again"
        ) from exc


def _scan(
    tar: tarfile.TarFile,
    public: Ed25519PublicKey,
    extract_to: Path | None,
    limits: Limits,
    before_payload: Callable[[Manifest], None] | None,
) -> BundleContents:
    members = iter(tar)
    head: dict[str, bytes] = {}
    for expected in (MANIFEST_NAME, SIGNATURE_NAME):
        member = next(members, None)
        if member is None or member.name != expected:
            got = "end of archive" if member is None else f"'{member.name}'"
            raise TrtbuildError(
                f"bundle does not start with {expected} (found {got})",
                "pass an archive written by `trtbuild bundle create`",
            )
        check_member(member, limits)
        head[expected] = _read_small(tar, member)
    doc, manifest = parse_manifest_bytes(head[MANIFEST_NAME])
    signer = signing.check_signature(public, head[SIGNATURE_NAME], canonical_bytes(doc))
    if before_payload is not None:
        before_payload(manifest)
    seen: set[str] = set()
    total = count = 0
    for member in members:
        count += 1
        if count > limits.members:
            raise TrtbuildError(f"bundle has more than {limits.members} members", "do not deploy this bundle")
        rel = check_member(member, limits)
        if member.isdir():
            continue
        entry = manifest.files.get(rel)
        if entry is None:
            raise TrtbuildError(
                f"bundle holds '{rel}', which its signed manifest does not list", "do not deploy this bundle"
            )
        if rel in seen:
            raise TrtbuildError(f"bundle holds '{rel}' twice", "do not deploy this bundle")
        if member.size != entry.size:
            raise TrtbuildError(
                f"'{rel}' is {member.size} bytes, the signed manifest says {entry.size} (tampered)",
                "do not deploy this bundle",
            )
        total += member.size
        if total > limits.total_bytes:
            raise TrtbuildError(
                f"bundle payload exceeds {limits.total_bytes} bytes", "do not deploy this bundle"
            )
        digest = _copy_member(tar, member, extract_to / rel if extract_to else None)
        if digest != entry.sha256:
            raise TrtbuildError(
                f"'{rel}' does not match its sha256 in the signed manifest (tampered)",
                "do not deploy this bundle",
            )
        seen.add(rel)
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise TrtbuildError(
            f"bundle is missing {len(missing)} file(s) its manifest lists ({missing[0]}, ...)",
            "download the bundle again",
        )
    return BundleContents(manifest, doc, signer, len(seen), total)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path | None) -> str:
    src = tar.extractfile(member)
    if src is None:
        raise TrtbuildError(
            f"bundle member '{member.name}' is not a regular file", "do not deploy this bundle"
        )
    digest = hashlib.sha256()
    out: IO[bytes] | None = None
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = dest.open("xb")  # never follow or overwrite anything already there
    try:
        remaining = member.size
        while remaining:
            chunk = src.read(min(_CHUNK, remaining))
            if not chunk:
                raise EOFError(f"'{member.name}' ends early")
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
            remaining -= len(chunk)
    finally:
        if out is not None:
            out.close()
    if dest is not None and member.mode & 0o111:
        dest.chmod(0o755)
    return digest.hexdigest()


def read_manifest_unverified(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest document, for display only: the signature and hashes are NOT checked here."""
    bundle = Path(path)
    if not bundle.is_file():
        raise TrtbuildError(f"bundle {bundle} does not exist", "pass the .tar.gz that `bundle create` wrote")
    try:
        with tarfile.open(bundle, "r|gz") as tar:
            member = next(iter(tar), None)
            if member is None or member.name != MANIFEST_NAME:
                raise TrtbuildError(
                    f"bundle does not start with {MANIFEST_NAME}",
                    "pass an archive written by `trtbuild bundle create`",
                )
            check_member(member, Limits())
            doc, _ = parse_manifest_bytes(_read_small(tar, member))
            return doc
    except (tarfile.ReadError, EOFError, zlib.error, OSError) as exc:
        raise TrtbuildError(
            f"bundle {bundle.name} is truncated or corrupt ({exc})", "download the bundle again"
        ) from exc
