"""A set of artifacts written together (quantize's Q/DQ ONNX, cache, ranges and report): one writer per
folder at a time, and a manifest that ties the files together by hash.

Files are each written atomically (temp + rename), but four renames are not one. So the manifest (the
report) is removed first and written last with the sha256 of every member: a run killed half-way leaves
no manifest claiming to describe a mixed set, and :func:`verify` finds any member that is not the one
the manifest describes. A second run into the same folder fails at once instead of interleaving its
files with the first's (an advisory ``flock`` on ``.trtbuild.lock``, released when the process dies).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.hashing import sha256_file

LOCK_NAME = ".trtbuild.lock"
MANIFEST_KEY = "artifacts"  # key in the manifest JSON: role -> {"file": name, "sha256": hex}


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the folder's writer lock for the block; a second writer gets a one-line error."""
    import fcntl

    root = check_writable_folder(folder, "--out-dir")
    created = [p for p in (root, *root.parents) if not p.exists()]
    lock_path = root / LOCK_NAME
    made_lock = not lock_path.exists()
    locked = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TrtbuildError(
            f"cannot write to {root} ({exc.strerror or type(exc).__name__})",
            "choose a writable --out-dir",
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise TrtbuildError(
                f"another trtbuild run (pid {holder}) is writing to {root}",
                "wait for it to finish, or write to another --out-dir",
            ) from exc
        locked = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield root
    finally:
        if made_lock and locked:  # leave no trace of our lock in the user's folder (unlinked while held)
            lock_path.unlink(missing_ok=True)
        os.close(fd)
        if created and not any(root.iterdir()):
            # We made this folder and the run wrote nothing: leave nothing behind.
            for folder_made in created:
                with contextlib.suppress(OSError):
                    folder_made.rmdir()


def manifest_entries(members: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """role -> {file, sha256} for the manifest, file names relative to the manifest's folder."""
    return {role: {"file": path.name, "sha256": sha256_file(path)} for role, path in members.items()}


def verify(manifest_path: str | os.PathLike[str]) -> list[str]:
    """Problems with the set a manifest describes (empty when every member is the one it names)."""
    path = Path(manifest_path)
    try:
        entries = json.loads(path.read_text())[MANIFEST_KEY]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{path.name}: no readable artifact list ({type(exc).__name__})"]
    problems = []
    for role, entry in entries.items():
        member = path.parent / str(entry.get("file", ""))
        if not member.is_file():
            problems.append(f"{role}: {member.name} is missing")
        elif sha256_file(member) != entry.get("sha256"):
            problems.append(f"{role}: {member.name} is not the file this report describes (sha256 differs)")
    return problems


def check_writable_folder(folder: str | os.PathLike[str], option: str = "--out") -> Path:
    """Refuse, before any work, a destination folder that cannot be created or written: its nearest
    existing ancestor must be a writable folder (not a file)."""
    root = Path(folder)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TrtbuildError(
            f"cannot write to {root}: {probe} is a file, not a folder", f"pass another {option}"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrtbuildError(f"cannot write to {root}: {probe} is not writable", f"pass a writable {option}")
    return root
