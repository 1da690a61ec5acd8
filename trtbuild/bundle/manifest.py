"""The bundle manifest: what the bundle is for, what it needs on the device, and the sha256 of every file.

The signature covers the exact bytes of ``manifest.json`` as stored in the archive (never a re-serialised
form), so what is verified is what is parsed. Manifests (and every other untrusted JSON: signature
documents, reports passed on the command line) are parsed by :func:`parse_json` with limits checked before
``json.loads`` runs: size, nesting depth, finite numbers only and no duplicate keys; then against a schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from trtbuild import __version__
from trtbuild.core.errors import TrtbuildError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED = (MANIFEST_NAME, SIGNATURE_NAME)

MAX_JSON_DEPTH = 64  # a manifest nests 5 deep; json's C parser recurses per level
MAX_JSON_BYTES = 16 << 20
MAX_FILES = 10_000
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_COMPONENT_BYTES = 255  # NAME_MAX
MAX_ID_CHARS = 200  # model name, version, target, precision
MAX_SHOWN_CHARS = 200  # untrusted text is cut to this in messages
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS = frozenset(
    {"schema", "trtbuild", "created", "model", "target", "precision", "requires", "io", "fidelity",
     "profile", "extra", "files"}
)  # fmt: skip


def shown(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` for an error message: control characters escaped, cut to ``limit`` characters."""
    value = str(text)
    cut = value[:limit]
    cut = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in cut)
    if len(value) > limit:
        cut += f"… ({len(value)} characters)"
    return cut


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
        """Validate ``data`` against the schema (every field's type, file paths, hashes, sizes)."""
        if not isinstance(data, Mapping):
            _malformed("it is not a JSON object")
        schema = data.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise TrtbuildError("bundle manifest has no integer schema version", "rebuild the bundle")
        if schema > SCHEMA_VERSION:
            raise TrtbuildError(
                f"bundle manifest uses schema {schema}, newer than this trtbuild reads ({SCHEMA_VERSION})",
                "upgrade trtbuild on this device",
            )
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            _malformed(f"unknown field '{shown(unknown[0])}'")
        for key in ("model", "target", "precision", "requires", "io", "files"):
            if key not in data:
                _malformed(f"no '{key}' field")
        model = _object(data["model"], "model")
        if set(model) != {"name", "version"}:
            _malformed("'model' must hold exactly 'name' and 'version'")
        files = _object(data["files"], "files")
        if len(files) > MAX_FILES:
            _malformed(f"it lists {len(files)} files (limit {MAX_FILES})")
        entries = {}
        for rel, entry in files.items():
            check_relpath(rel)
            entry = _object(entry, f"files['{shown(rel)}']")
            if set(entry) != {"sha256", "size"}:
                _malformed(f"files['{shown(rel)}'] must hold exactly 'sha256' and 'size'")
            digest, size = entry["sha256"], entry["size"]
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                _malformed(f"files['{shown(rel)}'] has no lowercase hex sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                _malformed(f"files['{shown(rel)}'] has no non-negative integer size")
            entries[rel] = FileEntry(digest, size)
        check_path_set(entries)
        optional = {key: data.get(key) for key in ("fidelity", "profile")}
        for key, value in optional.items():
            if value is not None:
                _object(value, key)
        return cls(
            model=_identifier(model["name"], "model name"),
            model_version=_identifier(model["version"], "model version"),
            target=_identifier(data["target"], "target"),
            precision=_identifier(data["precision"], "precision"),
            requires=dict(_object(data["requires"], "requires")),
            io=dict(_object(data["io"], "io")),
            files=entries,
            fidelity=optional["fidelity"],
            profile=optional["profile"],
            extra=dict(_object(data.get("extra") or {}, "extra")),
            created=_text(data.get("created", ""), "created"),
            schema=schema,
        )


def _malformed(why: str) -> Any:
    raise TrtbuildError(
        f"bundle manifest is malformed: {why}", "rebuild the bundle with `trtbuild bundle create`"
    )


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _malformed(f"'{where}' is not a JSON object")
    return value


def _text(value: Any, where: str, limit: int = MAX_ID_CHARS) -> str:
    if not isinstance(value, str):
        _malformed(f"'{where}' is not a string")
    if len(value) > limit or not value.isprintable():
        _malformed(f"'{where}' is longer than {limit} characters or holds control characters")
    return value


def _identifier(value: Any, where: str) -> str:
    text = _text(value, where)
    if not text.strip():
        _malformed(f"'{where}' is empty")
    return text


def check_relpath(rel: Any) -> str:
    """``rel`` if it is a safe relative POSIX path a bundle may hold, else TrtbuildError saying why."""
    if not isinstance(rel, str) or not rel:
        raise TrtbuildError("bundle lists an empty or non-text file name", "do not deploy this bundle")
    what = f"bundle path '{shown(rel)}'"
    try:
        encoded = rel.encode("utf-8")
    except UnicodeEncodeError:
        raise TrtbuildError(f"{what} is not valid UTF-8", "do not deploy this bundle") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise TrtbuildError(
            f"{what} is {len(encoded)} bytes long (limit {MAX_PATH_BYTES})", "do not deploy this bundle"
        )
    if rel.startswith("/"):
        raise TrtbuildError(f"{what} is an absolute path", "do not deploy this bundle")
    parts = rel.split("/")
    if ".." in parts:
        raise TrtbuildError(f"{what} escapes the bundle with '..'", "do not deploy this bundle")
    if "\\" in rel or not rel.isprintable() or any(p in ("", ".") for p in parts):
        raise TrtbuildError(f"{what} is not a plain relative path", "do not deploy this bundle")
    if any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        raise TrtbuildError(
            f"{what} has a name longer than {MAX_COMPONENT_BYTES} bytes", "do not deploy this bundle"
        )
    if rel in RESERVED:
        raise TrtbuildError(f"bundle lists its own {rel} as payload", "do not deploy this bundle")
    return rel


def check_path_set(paths: Mapping[str, Any] | set[str]) -> None:
    """No path may be a folder of another, nor equal another but for letter case (case-insensitive disks)."""
    folded: dict[str, str] = {}
    for rel in paths:
        key = rel.casefold()
        if key in folded:
            raise TrtbuildError(
                f"bundle lists '{shown(folded[key])}' and '{shown(rel)}', which differ only in case",
                "rename one of them",
            )
        folded[key] = rel
    for rel in folded:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in folded:
                raise TrtbuildError(
                    f"bundle lists '{shown(folded[parent])}' as a file and as the folder of "
                    f"'{shown(folded[rel])}'",
                    "do not deploy this bundle",
                )


# ---- untrusted JSON ---------------------------------------------------------------------------------------


def json_depth(raw: bytes, chunk: int = 1 << 20) -> int:
    """The deepest nesting of ``[``/``{`` outside strings: linear time, no recursion, bounded memory.

    Exact for valid JSON; for invalid JSON exact up to the first error, which is as far as a parser reads
    (outside strings a backslash is already an error)."""
    import numpy as np

    depth = deepest = 0
    in_string = 0  # parity of the unescaped quotes so far
    run = 0  # backslashes just before the current chunk
    for start in range(0, len(raw), chunk):
        c = np.frombuffer(raw, dtype=np.uint8, count=min(chunk, len(raw) - start), offset=start)
        n = c.size
        index = np.arange(n, dtype=np.int64)
        backslash = c == ord("\\")
        last_other = np.maximum.accumulate(np.where(backslash, -1, index))
        before = np.empty(n, dtype=np.int64)  # length of the backslash run ending just before i
        before[0] = run
        prev = last_other[:-1]
        before[1:] = np.where(prev >= 0, index[:-1] - prev, index[1:] + run)
        quote = (c == ord('"')) & (before % 2 == 0)
        quotes = np.cumsum(quote, dtype=np.int64)
        inside = (quotes - quote + in_string) % 2 == 1
        step = np.zeros(n, dtype=np.int64)
        step[(c == ord("[")) | (c == ord("{"))] = 1
        step[(c == ord("]")) | (c == ord("}"))] = -1
        step[inside | quote] = 0
        levels = depth + np.cumsum(step)
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        in_string = (in_string + int(quotes[-1])) % 2
        run = run + n if last_other[-1] < 0 else n - 1 - int(last_other[-1])
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {shown(text, 40)} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key '{shown(key, 60)}'")
        doc[key] = value
    return doc


def parse_json(
    raw: bytes, what: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse untrusted JSON bytes: size and depth are checked before ``json.loads`` runs; NaN, Infinity,
    out-of-range numbers and duplicate keys are refused. Raises TrtbuildError naming ``what``."""
    if len(raw) > max_bytes:
        raise TrtbuildError(f"{what} is {len(raw)} bytes (limit {max_bytes})", "do not use this file")
    depth = json_depth(raw)
    if depth > max_depth:
        raise TrtbuildError(f"{what} nests {depth} levels deep (limit {max_depth})", "do not use this file")
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TrtbuildError(f"{what} is not valid JSON ({shown(exc)})", "do not use this file") from exc


def parse_manifest_bytes(raw: bytes, max_bytes: int = MAX_JSON_BYTES) -> tuple[dict[str, Any], Manifest]:
    """The manifest document and its validated form, from the bytes stored in the bundle."""
    doc = parse_json(raw, "bundle manifest", max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise TrtbuildError("bundle manifest is not a JSON object", "rebuild the bundle")
    return doc, Manifest.from_json(doc)


def manifest_bytes(doc: Mapping[str, Any]) -> bytes:
    """The bytes `bundle create` stores (and signs) for a manifest document."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (what trtbuild signed before it signed the stored bytes)."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
