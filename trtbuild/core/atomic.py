"""Atomic artifact writes: a temp file beside the target, then rename: a crash leaves nothing half-written.

Every staging entry (temp file, temp folder, backup) is named ``.<target name>.trtbuild-XXXXXXXX<suffix>``
beside its target and, while its writer lives, holds an advisory lock (``flock``). A writer killed with
``kill -9`` releases the lock with its death but leaves the entry behind; the next write of the same target
removes such entries (:func:`clean_stale`): ours by name, unlocked, and not touched for
``STALE_AFTER_S`` seconds, so a concurrent run's fresh staging is never taken. Parent folders a write
creates are removed again when the write fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

try:  # advisory locks mark live staging entries; without them (Windows) only age tells stale ones
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

MARK = ".trtbuild-"  # in every staging entry's name: .<target name>.trtbuild-XXXXXXXX<suffix>
STALE_AFTER_S = 60.0  # an unlocked staging entry untouched this long belongs to a dead run
STALE_WITHOUT_LOCKS_S = 24 * 3600.0  # where locks are unsupported, only very old entries are taken
_NAME_CHARS = 100  # target names are cut in staging names (NAME_MAX is 255 bytes)


def _label(name: str) -> str:
    return name[:_NAME_CHARS]


def staging_prefix(name: str) -> str:
    """The name prefix of every staging entry for a target called ``name``."""
    return f".{_label(name)}{MARK}"


def _staging_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(staging_prefix(name)) + r"[a-z0-9_]{8}(?:\.[A-Za-z0-9_.\-]*)?")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- locks -------------------------------------------------------------------------------------------------


def _lock(fd: int) -> bool:
    """Hold an exclusive advisory lock on ``fd`` (released when the fd closes or the process dies)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_locked_dir(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    if not _lock(fd):
        os.close(fd)
        return None
    return fd


def _is_stale(path: Path, now: float) -> tuple[bool, int | None]:
    """(stale?, a locked fd to close after removal). Stale: unlocked and untouched for STALE_AFTER_S."""
    try:
        st = os.lstat(path)
    except OSError:
        return False, None
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return False, None  # we never stage links or special files: not ours
    age = now - st.st_mtime
    if age < STALE_AFTER_S:
        return False, None
    if fcntl is None:
        return age >= STALE_WITHOUT_LOCKS_S, None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    if stat.S_ISDIR(st.st_mode):
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a live writer holds it
        os.close(fd)
        return False, None
    except OSError:  # this file system has no flock: fall back to age alone
        os.close(fd)
        return age >= STALE_WITHOUT_LOCKS_S, None
    return True, fd


def clean_stale(target: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the staging entries a killed run left beside ``target`` (see the module doc); return them.

    ``name`` overrides the target's file name (for work folders named after a label)."""
    target = Path(target)
    pattern = _staging_pattern(name or target.name)
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return []
    removed = []
    now = time.time()
    for entry in entries:
        if not pattern.fullmatch(entry):
            continue
        path = target.parent / entry
        stale, fd = _is_stale(path, now)
        if not stale:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


# ---- parents -----------------------------------------------------------------------------------------------


def make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; return the folders this call created (outermost first) so a failed write can
    remove them again with :func:`remove_created`."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: let mkdir report it
            break
        missing.append(probe)
        probe = probe.parent
    created = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue  # a concurrent run made it: not ours to remove
            created.append(path)
        folder.mkdir(parents=True, exist_ok=True)  # the errors mkdir -p would give
    except BaseException:
        remove_created(created)
        raise
    return created


def remove_created(created: Sequence[Path]) -> None:
    """Remove folders :func:`make_parents` created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break


# ---- files -------------------------------------------------------------------------------------------------


def _widen(tmp: Path, mode: int | None) -> None:
    """mkstemp makes 0600 files: give untouched ones the usual umask-based mode (a block that set a mode
    itself, e.g. an executable script, keeps it); ``mode`` forces one."""
    if not tmp.is_file():
        return
    if mode is not None:
        os.chmod(tmp, mode)
    elif tmp.stat().st_mode & 0o777 == 0o600:
        os.chmod(tmp, 0o666 & ~umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    with atomic_paths([target], suffix) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(
    targets: Sequence[str | os.PathLike[str]],
    suffix: str = "",
    *,
    overwrite: bool = True,
    modes: Sequence[int | None] | None = None,
) -> Iterator[list[Path]]:
    """Yield one temp path per target (each beside its target); when the block succeeds, rename them all
    into place, in order. If a rename fails, the ones already renamed are put back as they were, so the
    targets change together or not at all (short of a crash between two renames).

    ``overwrite=False`` never replaces an existing file (even one that appears during the block): the set
    fails with FileExistsError instead. ``modes``: per target, a file mode to set (e.g. 0o600 for a secret),
    or None for the umask default.
    """
    paths = [Path(t) for t in targets]
    if len({os.path.abspath(p) for p in paths}) != len(paths):
        raise ValueError("atomic_paths needs distinct targets")
    modes = list(modes) if modes is not None else [None] * len(paths)
    created: list[Path] = []
    temps: list[tuple[int, Path]] = []
    ok = False
    try:
        for target in paths:
            created += make_parents(target.parent)
            clean_stale(target)
            fd, name = tempfile.mkstemp(
                prefix=staging_prefix(target.name), suffix=suffix or ".tmp", dir=target.parent
            )
            if not _lock(fd):  # no locks here: close now (an open file cannot be renamed on Windows)
                os.close(fd)
                fd = -1
            temps.append((fd, Path(name)))
        yield [tmp for _, tmp in temps]
        for (_, tmp), mode in zip(temps, modes, strict=True):
            _widen(tmp, mode)
        _commit([tmp for _, tmp in temps], paths, overwrite)
        ok = True
    finally:
        for fd, tmp in temps:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if not ok:
            remove_created(created)


def _backup(target: Path) -> Path | None:
    """A hard link to ``target``'s current file (None if there is none), to put it back on a failed set."""
    if not os.path.lexists(target):
        return None
    backup = target.with_name(f"{staging_prefix(target.name)}{secrets.token_hex(4)}.bak")
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        if target.is_dir() or target.is_symlink():
            raise
        shutil.copy2(target, backup)
    return backup


def _commit(temps: Sequence[Path], targets: Sequence[Path], overwrite: bool) -> None:
    done: list[tuple[Path, Path | None]] = []
    backups: list[Path] = []
    try:
        for i, (tmp, target) in enumerate(zip(temps, targets, strict=True)):
            backup = _backup(target) if overwrite and i < len(targets) - 1 else None
            if backup is not None:
                backups.append(backup)
            if overwrite:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # atomic and never replaces: FileExistsError if one appeared
                tmp.unlink()
            done.append((target, backup))
    except BaseException:
        for target, backup in reversed(done):  # put back what the set replaced
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink()
        raise
    finally:
        for backup in backups:
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


# ---- folders -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; it replaces ``target`` only if the block succeeds.

    The temp folder is private (0700) while it fills; the finished folder gets the umask's mode."""
    target = Path(target)
    created = make_parents(target.parent)
    ok = False
    fd: int | None = None
    tmp: Path | None = None
    try:
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(target.name), suffix=".staging", dir=target.parent))
        fd = _open_locked_dir(tmp)
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if os.path.lexists(target):
            old = target.with_name(f"{staging_prefix(target.name)}{secrets.token_hex(4)}.old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, target)
        ok = True
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            remove_created(created)


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike[str], label: str) -> Iterator[Path]:
    """A private, locked work folder ``.<label>.trtbuild-XXXXXXXX.work`` in ``parent``, always removed at the
    end; stale ones of the same label that killed runs left are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent / label)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(label), suffix=".work", dir=parent))
    fd = _open_locked_dir(tmp)
    try:
        yield tmp
    finally:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
