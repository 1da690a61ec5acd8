"""Bundle archives (tar.gz): atomic creation, and one streaming pass that verifies and safely extracts.

Layout: ``manifest.json`` and ``manifest.sig`` are the first two members, then the payload files in sorted
order. The signature covers the exact bytes of ``manifest.json``.

Reading does not trust :mod:`tarfile` with untrusted input (it reads PAX records and GNU long names of any
size into memory). A strict reader here checks every size before it reads a byte of what it describes:
each header and extended (PAX / long-name) record, name length, member count, the manifest and signature
sizes, every member against the signed manifest, and the total the manifest lists. The gzip stream is read
to its exact end: a truncated stream, data after it (garbage, a second gzip member) or non-zero bytes after
the tar end marker are refused. The signature is checked before any payload byte is trusted; absolute paths,
``..``, links, devices, sparse files, unlisted files and folders are refused; every file is hashed while it
streams into a temp folder that replaces the destination only when everything checked out.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trtbuild.bundle import signing
from trtbuild.bundle.manifest import (
    MANIFEST_NAME,
    MAX_PATH_BYTES,
    RESERVED,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    check_path_set,
    check_relpath,
    manifest_bytes,
    parse_manifest_bytes,
    shown,
)
from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.hashing import sha256_file

_CHUNK = 1 << 20
_IN_CHUNK = 64 << 10
_BLOCK = 512
MAX_MEMBER_BYTES = 8 << 30  # 8 GiB: bigger than any edge model we ship, smaller than a zip bomb's claim
MAX_TOTAL_BYTES = 16 << 30
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = signing.MAX_SIGNATURE_BYTES
MAX_HEADER_BYTES = 64 << 10  # one PAX record set or GNU long name (a 4 KiB path needs ~4.1 KiB)
MAX_PADDING_BYTES = 1 << 20  # zeros after the tar end marker (tar pads to 10 KiB records)
MAX_STALL_BYTES = 1 << 20  # compressed bytes that may pass without a byte of output (gzip header fields)
MAX_RATIO = 1100  # deflate expands at most ~1032:1; a manifest that claims more cannot be in the file
DEFLATE_OVERHEAD = 1 << 16


@dataclass(frozen=True)
class Limits:
    member_bytes: int = MAX_MEMBER_BYTES
    total_bytes: int = MAX_TOTAL_BYTES
    members: int = MAX_MEMBERS
    manifest_bytes: int = MAX_MANIFEST_BYTES
    header_bytes: int = MAX_HEADER_BYTES
    name_bytes: int = MAX_PATH_BYTES


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
    try:  # never write a bundle that `bundle verify` would refuse
        for rel in files:
            check_relpath(rel)
        check_path_set(set(files))
    except TrtbuildError as exc:
        raise TrtbuildError(f"bundle source cannot be bundled: {exc.problem}", "rename the file") from None
    if len(files) > MAX_MEMBERS:
        raise TrtbuildError(f"bundle source holds {len(files)} files (limit {MAX_MEMBERS})", "bundle fewer")
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
    """Pack ``folder`` into a signed ``.tar.gz`` at ``out_path`` (written atomically; stale staging files
    of killed runs beside it are removed)."""
    files = collect_files(Path(folder))
    entries = {rel: FileEntry(sha256_file(p), p.stat().st_size) for rel, p in files.items()}
    oversized = [rel for rel, e in entries.items() if e.size > MAX_MEMBER_BYTES]
    if oversized or sum(e.size for e in entries.values()) > MAX_TOTAL_BYTES:
        raise TrtbuildError(
            f"bundle source is too large (limits: {MAX_MEMBER_BYTES} bytes a file, {MAX_TOTAL_BYTES} in all)",
            "ship the weights another way",
        )
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
    try:
        stored = manifest_bytes(manifest.to_json())
    except ValueError as exc:  # NaN/Infinity in a report: JSON cannot carry them
        raise TrtbuildError(f"bundle manifest cannot be written ({exc})", "pass finite numbers") from exc
    parse_manifest_bytes(stored)  # what verify will check, checked here first
    signature = signing.signature_document(key, stored)
    out = Path(out_path)
    mtime = 0  # fixed member times and owners: the payload says nothing about the build machine
    with (
        atomic.atomic_path(out, suffix=".partial") as tmp,
        tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, data in ((MANIFEST_NAME, stored), (SIGNATURE_NAME, signature)):
            tar.addfile(_tarinfo(name, len(data), 0o644, mtime), io.BytesIO(data))
        for rel, path in files.items():
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with path.open("rb") as fh:
                tar.addfile(_tarinfo(rel, entries[rel].size, mode, mtime), fh)
            if sha256_file(path) != entries[rel].sha256:
                raise TrtbuildError(f"{rel} changed while it was being bundled", "re-run `bundle create`")
    return out, manifest


def canonical_json_pretty(doc: Mapping[str, Any]) -> str:
    return manifest_bytes(doc).decode()


# ---- reading: gzip ----------------------------------------------------------------------------------------


class CorruptBundle(Exception):
    """The archive's bytes are not a well-formed bundle (becomes 'truncated or corrupt')."""


class GzipReader:
    """Exactly one gzip member, read to its exact end (CRC and length are checked by zlib); nothing may
    follow it. ``read(n)`` decompresses no more than it returns, so the caller's size checks bound memory."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in = b""
        self._stall = 0
        self.compressed = 0
        self.produced = 0

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; CorruptBundle if the stream ends before."""
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self._z.decompress(self._in, n - len(out))
            except zlib.error as exc:
                raise CorruptBundle(f"gzip: {exc}") from exc
            self._in = self._z.unconsumed_tail
            out += chunk
            self._stall = 0 if chunk else self._stall
            if len(out) >= n:
                break
            if self._z.eof:
                raise CorruptBundle("the archive ends early")
            # less output than asked: zlib consumed all its input
            more = self._fh.read(_IN_CHUNK)
            if not more:
                raise CorruptBundle("the gzip stream ends early")
            self._feed(more)
        self.produced += len(out)
        return bytes(out)

    def _feed(self, more: bytes) -> None:
        self.compressed += len(more)
        self._stall += len(more)
        if self._stall > MAX_STALL_BYTES:
            raise CorruptBundle(f"{self._stall} compressed bytes decompress to nothing")
        self._in += more

    def padding(self, n: int) -> None:
        """The zeros that fill a tar block (fewer than 512: any other byte is refused)."""
        if self.read(n).count(0) != n:
            raise CorruptBundle("a tar block's padding is not zeros")

    def finish(self, max_padding: int = MAX_PADDING_BYTES) -> None:
        """After the tar end marker: only zeros up to the end of the gzip member, then the end of the file."""
        padding = 0
        while not self._z.eof:
            try:
                chunk = self._z.decompress(self._in, _CHUNK)
            except zlib.error as exc:
                raise CorruptBundle(f"gzip: {exc}") from exc
            self._in = self._z.unconsumed_tail
            if chunk.count(0) != len(chunk):
                raise CorruptBundle("data follows the end of the tar archive")
            padding += len(chunk)
            if padding > max_padding:
                raise CorruptBundle(f"more than {max_padding} bytes of padding follow the tar archive")
            if self._z.eof or len(chunk) == _CHUNK:
                continue
            more = self._fh.read(_IN_CHUNK)
            if not more:
                raise CorruptBundle("the gzip stream ends early")
            self._stall = 0 if chunk else self._stall
            self._feed(more)
        trailing = self._z.unused_data + self._fh.read(1)
        if trailing.startswith(b"\x1f\x8b"):
            raise CorruptBundle("a second gzip stream follows the first")
        if trailing:
            raise CorruptBundle("data follows the end of the gzip stream")


# ---- reading: tar -----------------------------------------------------------------------------------------

_REGULAR = (b"0", b"\0", b"7")
_LINKS = (b"1", b"2")
_DEVICES = (b"3", b"4", b"6")
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"


@dataclass
class Member:
    """One tar entry as the strict reader saw it."""

    name: str
    size: int
    type: bytes
    mode: int
    pax: dict[str, str] = field(default_factory=dict)

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == b"5"


def _number(field_bytes: bytes, what: str) -> int:
    """A tar numeric field: octal text, or GNU base-256 (first byte 0x80, or 0xff for negative)."""
    if field_bytes[:1] == b"\x80":
        return int.from_bytes(field_bytes[1:], "big")
    if field_bytes[:1] == b"\xff":
        raise CorruptBundle(f"tar header has a negative {what}")
    text = field_bytes.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):  # octal digits only
        raise CorruptBundle(f"tar header has an invalid {what}")
    return int(text, 8)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TrtbuildError(f"bundle {what} is not valid UTF-8", "do not deploy this bundle") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse ``<len> <key>=<value>\\n`` records strictly."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space] if space > 0 else b""
        if not length_text.isdigit():
            raise CorruptBundle("malformed PAX header record")
        length = int(length_text)
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n"):
            raise CorruptBundle("malformed PAX header record")
        key, eq, value = record[space - pos + 1 : -1].partition(b"=")
        if not eq:
            raise CorruptBundle("malformed PAX header record")
        records[_text(key, "PAX key")] = _text(value, "PAX value")
        pos += length
    return records


class TarReader:
    """Strict streaming ustar/PAX/GNU reader: every size is checked against ``limits`` before reading."""

    def __init__(self, stream: GzipReader, limits: Limits) -> None:
        self.stream, self.limits = stream, limits
        self.members = 0

    def _extended(self, size: int, kind: str) -> bytes:
        if size > self.limits.header_bytes:
            raise TrtbuildError(
                f"bundle has a {size}-byte {kind} (limit {self.limits.header_bytes})",
                "do not deploy this bundle",
            )
        data = self.stream.read(size)
        self.stream.padding(-size % _BLOCK)
        return data

    def next(self) -> Member | None:
        """The next entry, or None at the end marker (the rest is checked by :meth:`GzipReader.finish`)."""
        pax: dict[str, str] | None = None
        long_name: str | None = None
        while True:
            block = self.stream.read(_BLOCK)
            if block.count(0) == _BLOCK:
                if pax is not None or long_name is not None:
                    raise CorruptBundle("an extended header is not followed by its member")
                return None
            checksum = _number(block[148:156], "checksum")
            unsigned = sum(block[:148]) + 256 + sum(block[156:])
            signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
            if checksum not in (unsigned, signed):
                raise CorruptBundle("a tar header has a bad checksum")
            magic = block[257:265]
            if magic not in (_POSIX_MAGIC, _GNU_MAGIC):
                raise CorruptBundle("a tar header is not ustar/PAX/GNU")
            kind = block[156:157]
            size = _number(block[124:136], "size")
            if kind == b"x":
                if pax is not None:
                    raise CorruptBundle("two PAX headers in a row")
                pax = _pax_records(self._extended(size, "PAX header"))
                continue
            if kind == b"L":
                if long_name is not None:
                    raise CorruptBundle("two GNU long names in a row")
                if size > self.limits.name_bytes + 1:
                    raise TrtbuildError(
                        f"bundle has a {size}-byte member name (limit {self.limits.name_bytes})",
                        "do not deploy this bundle",
                    )
                long_name = _text(self._extended(size, "GNU long name").rstrip(b"\0"), "member name")
                continue
            if kind == b"g":
                raise TrtbuildError("bundle has a global PAX header", "do not deploy this bundle")
            self.members += 1
            if self.members > self.limits.members + 2:
                raise TrtbuildError(
                    f"bundle has more than {self.limits.members} members", "do not deploy this bundle"
                )
            name_raw = block[0:100].split(b"\0", 1)[0]
            if magic == _POSIX_MAGIC:
                prefix = block[345:500].split(b"\0", 1)[0]
                if prefix:
                    name_raw = prefix + b"/" + name_raw
            name = long_name if long_name is not None else _text(name_raw, "member name")
            pax = pax or {}
            if "path" in pax:
                name = pax["path"]
            if len(name.encode("utf-8", "surrogatepass")) > self.limits.name_bytes:
                raise TrtbuildError(
                    f"bundle member name is {len(name.encode('utf-8', 'surrogatepass'))} bytes "
                    f"(limit {self.limits.name_bytes}): '{shown(name)}'",
                    "do not deploy this bundle",
                )
            if "size" in pax:
                if not pax["size"].isdigit() or len(pax["size"]) > 20:
                    raise CorruptBundle("a PAX size is not a number")
                size = int(pax["size"])
            if kind == b"K" or "linkpath" in pax:
                kind = b"2"
            if any(k.startswith("GNU.sparse") for k in pax):
                kind = b"S"
            mode = _number(block[100:108], "mode")
            return Member(name, size, kind, mode, pax)


def check_member(member: Member, limits: Limits) -> str:
    """The member's safe relative path, or TrtbuildError saying why it is refused."""
    name = member.name
    what = f"bundle member '{shown(name)}'"
    if member.isdir() and name.endswith("/"):
        name = name[:-1]
    if not name or "\x00" in name or "\\" in name:
        raise TrtbuildError(f"bundle member {shown(name)!r} has an invalid name", "do not deploy this bundle")
    if name.startswith("/"):
        raise TrtbuildError(f"{what} has an absolute path", "do not deploy this bundle")
    if ".." in name.split("/"):
        raise TrtbuildError(f"{what} escapes the bundle with '..'", "do not deploy this bundle")
    if member.type in _LINKS:
        raise TrtbuildError(f"{what} is a link", "do not deploy this bundle")
    if member.type in _DEVICES:
        raise TrtbuildError(f"{what} is a device or FIFO file", "do not deploy this bundle")
    if not (member.isreg() or member.isdir()):
        raise TrtbuildError(f"{what} is not a regular file", "do not deploy this bundle")
    if member.size > limits.member_bytes:
        raise TrtbuildError(
            f"{what} is oversized ({member.size} bytes > {limits.member_bytes})", "do not deploy this bundle"
        )
    if member.isdir() and member.size:
        raise CorruptBundle(f"folder entry '{shown(name)}' has a size")
    if name in RESERVED:
        return name
    try:
        check_relpath(name)
    except TrtbuildError as exc:
        raise TrtbuildError(f"{exc.problem} (a member name)", "do not deploy this bundle") from None
    return name


def _read_head(reader: TarReader, expected: str, limit: int) -> bytes:
    member = reader.next()
    if member is None or member.name != expected:
        got = "end of archive" if member is None else f"'{shown(member.name)}'"
        raise TrtbuildError(
            f"bundle does not start with {expected} (found {got})",
            "pass an archive written by `trtbuild bundle create`",
        )
    if not member.isreg():
        raise TrtbuildError(f"bundle {expected} is not a regular file", "do not deploy this bundle")
    if member.size > limit:
        raise TrtbuildError(
            f"bundle {expected} is oversized ({member.size} bytes, limit {limit})",
            "do not deploy this bundle",
        )
    data = reader.stream.read(member.size)
    reader.stream.padding(-member.size % _BLOCK)
    return data


@dataclass(frozen=True)
class BundleContents:
    manifest: Manifest
    document: dict[str, Any]
    key_id: str
    files_checked: int
    bytes_checked: int


def _open_stream(bundle: Path) -> BinaryIO:
    if not bundle.is_file():
        raise TrtbuildError(
            f"bundle {shown(bundle)} does not exist", "pass the .tar.gz that `bundle create` wrote"
        )
    try:
        return bundle.open("rb")
    except OSError as exc:
        raise TrtbuildError(
            f"cannot read bundle {shown(bundle)}: {exc.strerror}", "check its permissions"
        ) from exc


def _corrupt(bundle: Path, exc: BaseException) -> TrtbuildError:
    return TrtbuildError(
        f"bundle {shown(bundle.name)} is truncated or corrupt ({shown(exc) or type(exc).__name__})",
        "download the bundle again",
    )


def read_bundle(
    path: str | os.PathLike[str],
    public: Ed25519PublicKey,
    extract_to: Path | None = None,
    limits: Limits | None = None,
    before_payload: Callable[[Manifest], None] | None = None,
) -> BundleContents:
    """Verify the bundle in one streaming pass (signature, then every member and hash, then the exact end
    of the archive); optionally write the payload under ``extract_to`` (which must be an empty temp folder
    the caller discards on failure). ``before_payload`` runs after the signature check and before any
    payload is read (the device check)."""
    bundle = Path(path)
    with _open_stream(bundle) as fh:
        try:
            return _scan(bundle, fh, public, extract_to, limits or Limits(), before_payload)
        except (CorruptBundle, OSError) as exc:  # OSError: reading the bundle file itself
            raise _corrupt(bundle, exc) from exc


def _check_listing(manifest: Manifest, limits: Limits, compressed_size: int) -> int:
    """Bound the payload by the signed manifest before any of it is read; return its total size."""
    if len(manifest.files) > limits.members:
        raise TrtbuildError(
            f"bundle lists {len(manifest.files)} files (limit {limits.members})", "do not deploy this bundle"
        )
    for rel, entry in manifest.files.items():
        if entry.size > limits.member_bytes:
            raise TrtbuildError(
                f"bundle member '{shown(rel)}' is oversized ({entry.size} bytes > {limits.member_bytes})",
                "do not deploy this bundle",
            )
    total = sum(e.size for e in manifest.files.values())
    if total > limits.total_bytes:
        raise TrtbuildError(
            f"bundle payload is {total} bytes (limit {limits.total_bytes})", "do not deploy this bundle"
        )
    if total > compressed_size * MAX_RATIO + DEFLATE_OVERHEAD:
        raise TrtbuildError(
            f"bundle lists {total} bytes of payload, more than its {compressed_size} compressed bytes "
            f"can hold (gzip ratio limit {MAX_RATIO}:1)",
            "download the bundle again",
        )
    return total


def _scan(
    bundle: Path,
    fh: BinaryIO,
    public: Ed25519PublicKey,
    extract_to: Path | None,
    limits: Limits,
    before_payload: Callable[[Manifest], None] | None,
) -> BundleContents:
    stream = GzipReader(fh)
    reader = TarReader(stream, limits)
    stored = _read_head(reader, MANIFEST_NAME, limits.manifest_bytes)
    signature = _read_head(reader, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
    signer = signing.check_signature(public, signature, stored)  # the exact stored bytes
    doc, manifest = parse_manifest_bytes(stored, limits.manifest_bytes)
    _check_listing(manifest, limits, os.fstat(fh.fileno()).st_size)
    if before_payload is not None:
        before_payload(manifest)
    folders = {"/".join(rel.split("/")[:i]) for rel in manifest.files for i in range(1, rel.count("/") + 1)}
    seen: set[str] = set()
    seen_folders: set[str] = set()
    total = 0
    while (member := reader.next()) is not None:
        rel = check_member(member, limits)
        what = f"'{shown(rel)}'"
        if member.isdir():
            if rel in manifest.files:
                raise TrtbuildError(
                    f"bundle holds a folder {what}, which its signed manifest lists as a file",
                    "do not deploy this bundle",
                )
            if rel not in folders:
                raise TrtbuildError(
                    f"bundle holds a folder {what}, which its signed manifest does not list",
                    "do not deploy this bundle",
                )
            if rel in seen_folders:
                raise TrtbuildError(f"bundle holds the folder {what} twice", "do not deploy this bundle")
            seen_folders.add(rel)
            continue
        entry = manifest.files.get(rel)
        if entry is None:
            raise TrtbuildError(
                f"bundle holds {what}, which its signed manifest does not list", "do not deploy this bundle"
            )
        if rel in seen:
            raise TrtbuildError(f"bundle holds {what} twice", "do not deploy this bundle")
        if member.size != entry.size:
            raise TrtbuildError(
                f"{what} is {member.size} bytes, the signed manifest says {entry.size} (tampered)",
                "do not deploy this bundle",
            )
        digest = _copy_member(stream, member, extract_to / rel if extract_to else None)
        if digest != entry.sha256:
            raise TrtbuildError(
                f"{what} does not match its sha256 in the signed manifest (tampered)",
                "do not deploy this bundle",
            )
        total += member.size
        seen.add(rel)
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise TrtbuildError(
            f"bundle is missing {len(missing)} file(s) its manifest lists ('{shown(missing[0])}', ...)",
            "download the bundle again",
        )
    stream.finish()
    return BundleContents(manifest, doc, signer, len(seen), total)


def _copy_member(stream: GzipReader, member: Member, dest: Path | None) -> str:
    digest = hashlib.sha256()
    out: IO[bytes] | None = None
    try:
        if dest is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = dest.open("xb")  # never follow or overwrite anything already there
        try:
            remaining = member.size
            while remaining:
                chunk = stream.read(min(_CHUNK, remaining))
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                remaining -= len(chunk)
            stream.padding(-member.size % _BLOCK)
        finally:
            if out is not None:
                out.close()
        if dest is not None and member.mode & 0o111:
            dest.chmod(0o777 & ~atomic.umask())
    except OSError as exc:
        raise TrtbuildError(
            f"cannot extract '{shown(member.name)}': {exc.strerror}",
            "check the destination's free space and permissions",
        ) from exc
    return digest.hexdigest()


def read_manifest_unverified(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest document, for display only: the signature and hashes are NOT checked here (sizes,
    JSON limits and the manifest schema are)."""
    bundle = Path(path)
    with _open_stream(bundle) as fh:
        try:
            stored = _read_head(TarReader(GzipReader(fh), Limits()), MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except (CorruptBundle, OSError) as exc:
            raise _corrupt(bundle, exc) from exc
    doc, _ = parse_manifest_bytes(stored)
    return doc
