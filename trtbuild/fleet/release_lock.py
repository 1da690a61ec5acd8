"""Publishers that release into the same registry repository at the same time (two CI jobs, a release
engineer and a nightly `fleet refresh`) must not lose each other's releases.

OCI registries offer no compare-and-swap on tags, so two layers do the serialising:
1. On one host, publishers take an exclusive file lock per registry repository (a second one waits).
2. Across hosts, every release is optimistic and verified: versioned metadata goes to a tag no release
   has used (never overwriting one another publisher wrote), the pushed tag is read back and must hold our
   bytes, the timestamp is only replaced if it is still the one the release was built on, and after a
   short settle the registry's current release must contain every target this release added. Any of
   these failing is a :class:`Conflict`: the release is rebuilt on the newer state and pushed again.
   What remains is a window of milliseconds between a check and a push; docs/fleet.md says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import host_lock, metadata_store, oci

ATTEMPTS = 10
SETTLE_S = 0.2  # between our timestamp push and the check that our release is the current one
LOCK_DIR_ENV = "TRTBUILD_PUBLISH_LOCK_DIR"

T = TypeVar("T")
log = logging.getLogger(__name__)


class Conflict(Exception):
    """Another publisher released at the same time; rebuild on the newer state and retry."""


def lock_path(reg: oci.Registry) -> Path:
    folder = Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
    key = hashlib.sha256(f"{reg.host}/{reg.repo}".encode()).hexdigest()[:16]
    return folder / f"trtbuild-publish-{key}.lock"


@contextlib.contextmanager
def publisher_lock(reg: oci.Registry) -> Iterator[None]:
    """One publisher per registry repository on this host at a time (the others wait their turn)."""
    path = lock_path(reg)
    fix = f"set {LOCK_DIR_ENV} to a writable folder"
    with host_lock.exclusive(path, f"cannot create the publish lock {path}", fix):
        yield


def free_version(reg: oci.Registry, role: str, after: int) -> int:
    """The first version of ``role`` above ``after`` that no release has pushed: a publisher that died
    after pushing metadata, or one releasing right now, never has its tag overwritten."""
    version = after + 1
    while oci.manifest(reg, metadata_store.tag(role, version)) is not None:
        version += 1
    return version


def push_new(reg: oci.Registry, role: str, data: bytes, version: int | None) -> None:
    """Push a metadata file and read its tag back: another publisher's bytes there mean a conflict."""
    if version is not None and oci.manifest(reg, metadata_store.tag(role, version)) is not None:
        raise Conflict(f"{metadata_store.tag(role, version)} was taken")
    digest = metadata_store.push(reg, role, data, version)
    if digest != "sha256:" + hashlib.sha256(data).hexdigest():
        raise Conflict(f"{metadata_store.tag(role, version)} holds another publisher's file")


def retrying(reg: oci.Registry, release: Callable[[], T], what: str) -> T:
    """Run ``release`` until it lands without a conflict (randomised back-off between attempts)."""
    for attempt in range(ATTEMPTS):
        try:
            return release()
        except Conflict as exc:
            log.info("%s: another publisher released at the same time (%s); rebuilding", what, exc)
            time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
    raise TrtbuildError(
        f"another publisher kept releasing into {reg.host}/{reg.repo} during this {what} "
        f"({ATTEMPTS} attempts)",
        f"run the {what} again when the other publisher has finished",
    )
