"""`fleet rotate`: a new root version that replaces role keys (after a lost or leaked key) or renews root's
expiry, as TUF's root chain allows (TUF spec 5.3): root N+1 is signed by a threshold of root N's keys *and*
of its own, so a device that trusts root N walks to N+1 and from then on accepts only the new keys.

A new targets key re-signs the current release set under a new targets version; a new online key signs
new snapshot and timestamp versions. Nothing is pushed before every signature has been checked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Role, Root

from trtbuild.core import atomic, output_set
from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import oci, release_lock, repository
from trtbuild.fleet.keys import public
from trtbuild.fleet.repository import EXPIRY


@dataclass(frozen=True)
class Rotation:
    root_version: int
    rotated: tuple[str, ...]  # the roles whose keys changed
    targets_version: int
    root_path: Path


def _keyids(signers: Sequence[CryptoSigner]) -> list[str]:
    return [public(s).keyid for s in signers]


def _replace_role_keys(root: Root, role: str, signers: Sequence[CryptoSigner], threshold: int) -> None:
    for keyid in list(root.roles[role].keyids):
        root.revoke_key(keyid, role)
    for s in signers:
        root.add_key(public(s), role)
    root.roles[role] = Role(_keyids(signers), threshold)


def _check_signers(root: Root, role: str, signers: Sequence[CryptoSigner], flag: str, version: int) -> None:
    trusted = set(root.roles[role].keyids)
    held = [k for k in _keyids(signers) if k in trusted]
    if len(held) < root.roles[role].threshold:
        raise TrtbuildError(
            f"{flag} gives {len(held)} of the {role} keys root v{version} trusts; "
            f"{root.roles[role].threshold} needed",
            f"pass the current {role} key(s) with {flag}",
        )


def rotate(
    reg: oci.Registry,
    root_keys: Sequence[CryptoSigner],
    online: CryptoSigner,
    root_out: Path,
    *,
    new_root_keys: Sequence[CryptoSigner] = (),
    root_threshold: int | None = None,
    new_targets: CryptoSigner | None = None,
) -> Rotation:
    """Sign root v(N+1) with ``root_keys`` (root N's) and ``new_root_keys`` (default: the same keys);
    ``new_targets`` and an ``online`` key root N does not know become the targets / online keys."""
    output_set.check_writable_folder(root_out.parent, "--out")  # before anything is pushed
    with release_lock.publisher_lock(reg):
        try:
            return _rotate(reg, root_keys, online, root_out, new_root_keys, root_threshold, new_targets)
        except release_lock.Conflict as exc:
            raise TrtbuildError(
                f"another publisher released into {reg.host}/{reg.repo} during the rotation ({exc})",
                "run the rotation again (each run signs the next root version)",
            ) from exc


def _rotate(
    reg: oci.Registry,
    root_keys: Sequence[CryptoSigner],
    online: CryptoSigner,
    root_out: Path,
    new_root_keys: Sequence[CryptoSigner],
    root_threshold: int | None,
    new_targets: CryptoSigner | None,
) -> Rotation:
    cur = repository.load_current(reg, repair=True)  # metadata pushed with a leaked key is passed over
    old = cur.root
    version = old.signed.version
    _check_signers(old.signed, "root", root_keys, "--root-key", version)
    next_root_keys = list(new_root_keys) or list(root_keys)
    threshold = root_threshold or min(old.signed.roles["root"].threshold, len(next_root_keys))
    if not 1 <= threshold <= len(next_root_keys):
        raise TrtbuildError(
            f"root threshold {threshold} needs at least that many root keys ({len(next_root_keys)} given)",
            "pass more --new-root-key or a lower --root-threshold",
        )

    new = Metadata[Root].from_bytes(old.to_bytes())
    root = new.signed
    rotated: list[str] = []
    if (
        set(_keyids(next_root_keys)) != set(root.roles["root"].keyids)
        or threshold != root.roles["root"].threshold
    ):
        _replace_role_keys(root, "root", next_root_keys, threshold)
        rotated.append("root")
    if new_targets is not None and public(new_targets).keyid not in root.roles["targets"].keyids:
        _replace_role_keys(root, "targets", [new_targets], 1)
        rotated.append("targets")
    if public(online).keyid not in root.roles["timestamp"].keyids:
        for role in ("snapshot", "timestamp"):
            _replace_role_keys(root, role, [online], 1)
        rotated.append("online")
    root.version = version + 1
    root.expires = repository.utc_now() + EXPIRY["root"]
    new.signatures.clear()
    signers = {public(s).keyid: s for s in [*root_keys, *next_root_keys]}
    for s in signers.values():
        new.sign(s, append=True)
    try:  # the chain rule a device applies: old threshold and new threshold both met
        old.verify_delegate("root", new)
        new.verify_delegate("root", new)
    except UnsignedMetadataError as exc:
        raise TrtbuildError(f"root v{root.version} would not verify: {exc}", "check the root keys") from exc
    root_bytes = new.to_bytes()

    targets_version = cur.targets.signed.version
    targets_bytes = cur.targets_bytes
    if "targets" in rotated:
        assert new_targets is not None
        targets = cur.targets
        targets.signed.version += 1
        targets.signed.expires = repository.utc_now() + EXPIRY["targets"]
        targets_bytes = repository.sign_metadata(targets, [new_targets])
        targets_version = targets.signed.version
    if "targets" in rotated:
        assert new_targets is not None
        targets_version = release_lock.free_version(reg, "targets", targets_version - 1)
        if targets_version != targets.signed.version:  # a crashed publisher left that tag: sign past it
            targets.signed.version = targets_version
            targets_bytes = repository.sign_metadata(targets, [new_targets])
    release_lock.push_new(reg, "root", root_bytes, root.version)
    if "targets" in rotated:
        release_lock.push_new(reg, "targets", targets_bytes, targets_version)
    repository.push_snapshot_and_timestamp(
        reg,
        online,
        targets_version,
        targets_bytes,
        cur.snapshot_seen,
        cur.timestamp.signed.version,
    )
    atomic.write_bytes(root_out, root_bytes)
    return Rotation(root.version, tuple(rotated), targets_version, root_out)
