"""The release repository (publisher side), with python-tuf's Metadata API: root, targets, snapshot and
timestamp roles with expiries and threshold signatures. The state lives in the registry itself, so any
machine with the keys can publish."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import metadata_store, oci, release_lock
from trtbuild.fleet.keys import public

EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),  # devices refuse a frozen view after a day: run `fleet refresh` daily
}


@dataclass
class RoleKeys:
    root: Sequence[CryptoSigner]
    targets: CryptoSigner | None
    online: CryptoSigner  # snapshot and timestamp


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def sign_metadata(md: Metadata[Any], signers: Sequence[CryptoSigner]) -> bytes:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes()


def init_repository(reg: oci.Registry, keys: RoleKeys, root_out: Path, root_threshold: int = 1) -> Path:
    """Create version 1 of every role in an empty registry repository; write the devices' trust anchor."""
    from trtbuild.core import atomic, output_set

    output_set.check_writable_folder(root_out.parent, "--out")  # before anything is pushed
    if metadata_store.fetch(reg, "root", 1) is not None:
        raise TrtbuildError(
            f"{reg.host}/{reg.repo} already holds release metadata", "publish into it instead"
        )
    if not 1 <= root_threshold <= len(keys.root):
        raise TrtbuildError(
            f"root threshold {root_threshold} needs at least that many root keys ({len(keys.root)} given)",
            "pass more --root-key or a lower --root-threshold",
        )
    assert keys.targets is not None
    now = utc_now()
    root = Metadata(Root(expires=now + EXPIRY["root"], consistent_snapshot=True))
    for s in keys.root:
        root.signed.add_key(public(s), "root")
    root.signed.roles["root"] = Role([public(s).keyid for s in keys.root], root_threshold)
    root.signed.add_key(public(keys.targets), "targets")
    root.signed.add_key(public(keys.online), "snapshot")
    root.signed.add_key(public(keys.online), "timestamp")
    root_bytes = sign_metadata(root, keys.root)
    targets = Metadata(Targets(expires=now + EXPIRY["targets"]))
    targets_bytes = sign_metadata(targets, [keys.targets])
    metadata_store.push(reg, "root", root_bytes, 1)
    metadata_store.push(reg, "targets", targets_bytes, 1)
    push_snapshot_and_timestamp(reg, keys.online, targets.signed.version, targets_bytes, None, None)
    atomic.write_bytes(root_out, root_bytes)
    return root_out


def push_snapshot_and_timestamp(
    reg: oci.Registry,
    online: CryptoSigner,
    targets_version: int,
    targets_bytes: bytes,
    snapshot_version: int | None,
    timestamp_version: int | None,
    timestamp_ttl: timedelta = EXPIRY["timestamp"],
) -> None:
    """Raises release_lock.Conflict when another publisher released since ``timestamp_version`` was read
    (callers retry on the newer state, release_lock.retrying)."""
    now = utc_now()
    version = release_lock.free_version(reg, "snapshot", snapshot_version or 0)
    snapshot = Metadata(Snapshot(version=version, expires=now + EXPIRY["snapshot"]))
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(targets_version, targets_bytes, ["sha256"])
    snapshot_bytes = sign_metadata(snapshot, [online])
    release_lock.push_new(reg, "snapshot", snapshot_bytes, snapshot.signed.version)
    if timestamp_version is not None:  # replace the timestamp only if it is still the one we built on
        seen = metadata_store.fetch(reg, "timestamp")
        if seen is None or Metadata[Timestamp].from_bytes(seen).signed.version != timestamp_version:
            raise release_lock.Conflict("the timestamp moved")
    _push_timestamp(reg, online, snapshot.signed.version, snapshot_bytes, timestamp_version, timestamp_ttl)


def _push_timestamp(
    reg: oci.Registry,
    online: CryptoSigner,
    snapshot_version: int,
    snapshot_bytes: bytes,
    timestamp_version: int | None,
    ttl: timedelta,
) -> None:
    timestamp = Metadata(Timestamp(version=(timestamp_version or 0) + 1, expires=utc_now() + ttl))
    timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"])
    release_lock.push_new(reg, "timestamp", sign_metadata(timestamp, [online]), None)


@dataclass
class Current:
    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot_bytes: bytes
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    targets_bytes: bytes
    snapshot_seen: int  # the newest snapshot version in the registry (a repair signs past it)


def _load(reg: oci.Registry, role: str, version: int | None) -> bytes:
    data = metadata_store.fetch(reg, role, version)
    if data is None:
        raise TrtbuildError(
            f"{reg.host}/{reg.repo} has no {role} metadata{'' if version is None else f' v{version}'}",
            "run `trtbuild fleet init` for this repository first",
        )
    return data


def load_current(reg: oci.Registry, *, repair: bool = False) -> Current:
    """The newest metadata in the registry: the root chain (each version signed by a threshold of the one
    before and of its own keys, as devices check it), then each role against the keys root delegates to.
    ``repair``: when the newest timestamp/snapshot is not validly signed (pushed with a leaked or wrong
    key), fall back to the newest snapshot that is, so that `fleet refresh --repair` can re-sign it."""
    root: Metadata[Root] = Metadata[Root].from_bytes(_load(reg, "root", 1))
    while (data := metadata_store.fetch(reg, "root", root.signed.version + 1)) is not None:
        newer = Metadata[Root].from_bytes(data)
        try:
            root.verify_delegate("root", newer)
            newer.verify_delegate("root", newer)
        except UnsignedMetadataError as exc:
            raise TrtbuildError(
                f"root v{newer.signed.version} in the registry is not signed by the keys of "
                f"root v{root.signed.version} ({exc})",
                "remove that tag from the registry; sign new roots with `trtbuild fleet rotate`",
            ) from exc
        root = newer
    timestamp = Metadata[Timestamp].from_bytes(_load(reg, "timestamp", None))
    try:
        root.verify_delegate("timestamp", timestamp)
        return _verified_from(reg, root, timestamp, timestamp.signed.snapshot_meta.version)
    except UnsignedMetadataError as exc:
        if not repair:
            raise TrtbuildError(
                f"the registry's release metadata is not validly signed ({exc})",
                "if a key leaked, `trtbuild fleet rotate` it, then `trtbuild fleet refresh --repair`",
            ) from exc
    for version in range(timestamp.signed.snapshot_meta.version, 0, -1):
        try:
            cur = _verified_from(reg, root, timestamp, version)
        except (UnsignedMetadataError, TrtbuildError):
            continue
        cur.snapshot_seen = timestamp.signed.snapshot_meta.version
        return cur
    raise TrtbuildError(f"{reg.host}/{reg.repo} holds no validly signed snapshot", "re-run `fleet init`")


def _verified_from(
    reg: oci.Registry, root: Metadata[Root], timestamp: Metadata[Timestamp], version: int
) -> Current:
    snapshot_bytes = _load(reg, "snapshot", version)
    snapshot = Metadata[Snapshot].from_bytes(snapshot_bytes)
    root.verify_delegate("snapshot", snapshot)
    targets_bytes = _load(reg, "targets", snapshot.signed.meta["targets.json"].version)
    targets = Metadata[Targets].from_bytes(targets_bytes)
    root.verify_delegate("targets", targets)
    return Current(root, timestamp, snapshot_bytes, snapshot, targets, targets_bytes, version)


def check_key(root: Root, role: str, sig: CryptoSigner, flag: str) -> None:
    """Refuse a key the current root does not delegate ``role`` to (e.g. one rotated out by `fleet rotate`):
    metadata signed with it would be pushed and then refused by every device."""
    if public(sig).keyid not in root.roles[role].keyids:
        raise TrtbuildError(
            f"{flag} is not the {role} key root v{root.version} trusts (rotated out, or another fleet's)",
            f"pass the current {role} key",
        )


def target_path(model: str, target: str, precision: str, file_name: str) -> str:
    return f"{model}/{target}/{precision}/{file_name}"


def add_targets(
    reg: oci.Registry,
    keys: RoleKeys,
    entries: Sequence[tuple[str, Path, dict[str, Any]]],
    timestamp_ttl: timedelta = EXPIRY["timestamp"],
) -> int:
    """Add (path, local file, custom) targets in one new targets version; return that version. Concurrent
    publishers are serialised (release_lock.py): a release that lost a race is rebuilt and pushed again."""
    if keys.targets is None:
        raise TrtbuildError("publishing needs the targets key", "pass --targets-key (kept offline)")
    added: dict[str, TargetFile] = {}
    for path, local, custom in entries:
        info = TargetFile.from_file(path, os.fspath(local), ["sha256"])
        info.unrecognized_fields["custom"] = custom
        added[path] = info
    with release_lock.publisher_lock(reg):
        release = functools.partial(_add_targets_once, reg, keys, added, timestamp_ttl)
        return release_lock.retrying(reg, release, "publish")


def _add_targets_once(
    reg: oci.Registry, keys: RoleKeys, added: dict[str, TargetFile], timestamp_ttl: timedelta
) -> int:
    assert keys.targets is not None
    cur = load_current(reg)
    check_key(cur.root.signed, "targets", keys.targets, "--targets-key")
    check_key(cur.root.signed, "timestamp", keys.online, "--online-key")
    targets = cur.targets
    targets.signed.targets.update(added)
    targets.signed.version = release_lock.free_version(reg, "targets", targets.signed.version)
    targets.signed.expires = utc_now() + EXPIRY["targets"]
    targets_bytes = sign_metadata(targets, [keys.targets])
    release_lock.push_new(reg, "targets", targets_bytes, targets.signed.version)
    push_snapshot_and_timestamp(
        reg,
        keys.online,
        targets.signed.version,
        targets_bytes,
        cur.snapshot_seen,
        cur.timestamp.signed.version,
        timestamp_ttl,
    )
    time.sleep(release_lock.SETTLE_S)  # a publisher that raced us has pushed its timestamp by now
    landed = load_current(reg).targets.signed.targets
    if any(path not in landed or landed[path] != info for path, info in added.items()):
        raise release_lock.Conflict("a concurrent release replaced ours")
    return targets.signed.version


def refresh(
    reg: oci.Registry, online: CryptoSigner, ttl: timedelta = EXPIRY["timestamp"], *, repair: bool = False
) -> int:
    """Re-sign snapshot and timestamp (online key only) so devices keep trusting an unchanged release set;
    return the new timestamp version. Run it more often than the timestamp expires (e.g. hourly).
    ``repair``: re-sign the newest validly signed release when the newest metadata is not (load_current)."""
    with release_lock.publisher_lock(reg):
        release = functools.partial(_refresh_once, reg, online, ttl, repair)
        return release_lock.retrying(reg, release, "refresh")


def _refresh_once(reg: oci.Registry, online: CryptoSigner, ttl: timedelta, repair: bool) -> int:
    cur = load_current(reg, repair=repair)
    check_key(cur.root.signed, "timestamp", online, "--online-key")
    push_snapshot_and_timestamp(
        reg,
        online,
        cur.targets.signed.version,
        cur.targets_bytes,
        cur.snapshot_seen,
        cur.timestamp.signed.version,
        ttl,
    )
    return cur.timestamp.signed.version + 1
