"""The install root on a device:

    ROOT/versions/<bundle name>/   complete, verified extractions (made whole by atomic_dir)
    ROOT/current -> versions/<name> a symlink, switched by rename(2): always a complete, checked version
    ROOT/manifests/<name>.json     the signed manifest of each version, to re-check files later
    ROOT/state.json, ROOT/tuf/     the install record and python-tuf's trusted metadata

A kill at any point leaves ``current`` on the old or the new version, never between."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import host_lock
from trtbuild.fleet import state as state_mod

VERSIONS = "versions"
MANIFESTS = "manifests"
CURRENT = "current"
LOCK = ".lock"
KILL_AT_ENV = "TRTBUILD_FLEET_KILL_AT"  # fault injection for the crash-safety tests: SIGKILL at a phase


def checkpoint(phase: str) -> None:
    if os.environ.get(KILL_AT_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One agent per install root at a time (a second one waits): installs never interleave."""
    with host_lock.exclusive(root / LOCK, f"cannot use install root {root}", "pick a writable folder"):
        yield


def current_name(root: Path) -> str | None:
    link = root / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def switch_current(root: Path, name: str) -> None:
    """Point ``current`` at versions/<name> atomically (a new symlink renamed over the old one)."""
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(f"{VERSIONS}/{name}", tmp)
    checkpoint("switching")
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)


def clean_unrecorded(root: Path, st: state_mod.State) -> None:
    """Remove what a killed run left: version folders not in the record, stray temp links."""
    versions = root / VERSIONS
    keep = {v.name for v in st.versions} | {current_name(root) or ""}
    if versions.is_dir():
        for entry in versions.iterdir():
            if entry.name not in keep and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
    for entry in root.glob(f".{CURRENT}.*.tmp"):
        entry.unlink(missing_ok=True)


def prune(root: Path, st: state_mod.State, keep: int) -> list[str]:
    """Keep the newest ``keep`` installed versions (never the current one); return the removed names."""
    cur = current_name(root)
    removed: list[str] = []
    while len(st.versions) > keep:
        victim = next((v for v in st.versions if v.name != cur), None)
        if victim is None:
            break
        st.versions.remove(victim)
        shutil.rmtree(root / VERSIONS / victim.name, ignore_errors=True)
        (root / MANIFESTS / f"{victim.name}.json").unlink(missing_ok=True)
        removed.append(victim.name)
    return removed


def check_files(root: Path, name: str, files: dict[str, tuple[str, int]]) -> None:
    """Re-hash an installed version against its signed manifest (after a crash, for `status --verify`)."""
    folder = root / VERSIONS / name
    for rel, (digest, size) in files.items():
        path = folder / rel
        h = hashlib.sha256()
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            raise TrtbuildError(f"installed {name} lost {rel}", "run `trtbuild fleet update` again") from exc
        if h.hexdigest() != digest or path.stat().st_size != size:
            raise TrtbuildError(f"installed {name} has a changed {rel}", "run `trtbuild fleet update` again")
