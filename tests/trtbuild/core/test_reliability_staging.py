"""Staging leftovers of killed runs are cleaned up (issue #14, family 5).

kill -9 leaves ``.tmp``/``.partial`` files and staging folders (up to 18 MB each) that no later run
removed. Staging entries are now named ``.<target>.trtbuild-XXXXXXXX<suffix>`` and locked (flock) while
their writer lives; the next write of the same target removes the ones that are unlocked and older than
``atomic.STALE_AFTER_S``, so a concurrent run's fresh staging is never taken, nor a user's file.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trtbuild.bundle import signing
from trtbuild.bundle.archive import create_bundle
from trtbuild.bundle.verify import verify_bundle
from trtbuild.core import atomic
from trtbuild.ship.bundles import WORK_LABEL, clean_legacy_work, create_bundles

REPO = Path(__file__).resolve().parents[3]
OLD = STALE = atomic.STALE_AFTER_S + 60


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


def staging(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if atomic.MARK in p.name)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path_factory.mktemp("staging-keys") / "fleet.pem")


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    folder = tmp_path / "payload"
    folder.mkdir()
    (folder / "w.bin").write_bytes(os.urandom(300_000))
    return folder


CREATE = """
import sys, tarfile, time
from trtbuild.bundle import signing
from trtbuild.bundle.archive import create_bundle
real = tarfile.TarFile.addfile
def slow(self, *a, **k):
    real(self, *a, **k)
    if a[0].name == "w.bin":
        self.fileobj.flush()
        print("ready", flush=True)
        time.sleep(600)
tarfile.TarFile.addfile = slow
create_bundle(sys.argv[1], sys.argv[2], signing.load_private_key(sys.argv[3]), model="m", model_version="1",
              target="orin-jp6.1", precision="fp16", requires={"kind": "jetson"}, io_spec={})
"""

EXTRACT = """
import sys, time
from trtbuild.bundle import archive, signing
from trtbuild.bundle.verify import verify_bundle
real = archive._copy_member
def slow(stream, member, dest):
    digest = real(stream, member, dest)
    print("ready", flush=True)
    time.sleep(600)
    return digest
archive._copy_member = slow
verify_bundle(sys.argv[1], signing.load_public_key(sys.argv[2]), device="skip", extract_to=sys.argv[3])
"""

HOLD = """
import sys, time
from trtbuild.core import atomic
with atomic.atomic_path(sys.argv[1], suffix=".partial") as tmp:
    tmp.write_bytes(b"half")
    print("ready", flush=True)
    time.sleep(600)
"""

WORK = """
import sys, time
from trtbuild.core import atomic
with atomic.staging_dir(sys.argv[1], sys.argv[2]) as work:
    (work / "payload").mkdir()
    (work / "payload" / "big.onnx").write_bytes(b"x" * 1_000_000)
    print("ready", flush=True)
    time.sleep(600)
"""


def start(script: str, *args: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no finally blocks, no cleanup
    proc.wait(timeout=30)


def test_kill9_during_bundle_create_is_cleaned_by_the_next_create(
    tmp_path: Path, payload: Path, keys: tuple[Path, Path]
) -> None:
    out = tmp_path / "bundles"
    target = out / "b.tar.gz"
    kill9(start(CREATE, payload, target, keys[0]))
    [leftover] = staging(out)
    assert leftover.startswith(".b.tar.gz.trtbuild-") and leftover.endswith(".partial")
    assert (out / leftover).stat().st_size > 0

    def create() -> None:
        create_bundle(
            payload, target, signing.load_private_key(str(keys[0])), model="m", model_version="1",
            target="orin-jp6.1", precision="fp16", requires={"kind": "jetson"}, io_spec={},
        )  # fmt: skip

    create()
    assert staging(out) == [leftover]  # fresh: it may be a concurrent run's, so it stays
    age(out / leftover, STALE)
    create()
    assert sorted(p.name for p in out.iterdir()) == ["b.tar.gz"]


def test_kill9_during_extraction_is_cleaned_by_the_next_extraction(
    tmp_path: Path, payload: Path, keys: tuple[Path, Path]
) -> None:
    bundle, _ = create_bundle(
        payload, tmp_path / "b.tar.gz", signing.load_private_key(str(keys[0])), model="m", model_version="1",
        target="orin-jp6.1", precision="fp16", requires={"kind": "jetson"}, io_spec={},
    )  # fmt: skip
    deploy = tmp_path / "deploy"
    kill9(start(EXTRACT, bundle, keys[1], deploy / "model"))
    [leftover] = staging(deploy)
    assert leftover.startswith(".model.trtbuild-") and (deploy / leftover / "w.bin").is_file()
    age(deploy / leftover, STALE)
    verify_bundle(bundle, signing.load_public_key(str(keys[1])), device="skip", extract_to=deploy / "model")
    assert sorted(p.name for p in deploy.iterdir()) == ["model"]


def test_kill9_leaves_a_work_folder_that_the_next_fleet_run_removes(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    out = tmp_path / "bundles"
    kill9(start(WORK, out, WORK_LABEL))
    [leftover] = staging(out)
    assert leftover.startswith(f".{WORK_LABEL}.trtbuild-") and leftover.endswith(".work")
    age(out / leftover, STALE)
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"not a model")
    with pytest.raises(Exception):  # noqa: B017 - the export fails (how is not the point), after the cleanup
        create_bundles(model, ["orin-jp6.1"], ["fp16"], signing.load_private_key(str(keys[0])), out)
    assert staging(out) == []


def test_a_live_runs_staging_is_never_taken(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.onnx"
    live = start(HOLD, target)
    try:
        [entry] = staging(target.parent)
        age(target.parent / entry, 10 * STALE)  # old, but its writer still holds the lock
        atomic.write_bytes(target, b"another run")
        assert staging(target.parent) == [entry]
        assert (target.parent / entry).read_bytes() == b"half"
    finally:
        kill9(live)
    age(target.parent / entry, 0)
    atomic.write_bytes(target, b"a later run")  # dead now, but touched just now: kept
    assert staging(target.parent) == [entry]
    age(target.parent / entry, STALE)
    atomic.write_bytes(target, b"a later run")
    assert staging(target.parent) == [] and target.read_bytes() == b"a later run"


def test_keygen_cleans_its_own_stale_staging(tmp_path: Path) -> None:
    leftover = tmp_path / f"{atomic.staging_prefix('fleet.pem')}abcd1234.tmp"
    leftover.write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf")
    age(leftover, STALE)
    signing.generate_keypair(tmp_path / "fleet.pem")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.pem", "fleet.pub"]


def test_names_that_are_not_ours_are_never_removed(tmp_path: Path) -> None:
    keep = [
        ".b.tar.gz.backup01",  # a user's dotfile
        ".b.tar.gz.trtbuild-short.partial",  # not 8 random characters
        "b.tar.gz.trtbuild-abcd1234.partial",  # no leading dot
        ".c.tar.gz.trtbuild-abcd1234.partial",  # another target's
        ".b.tar.gz.trtbuild-ABCD1234.partial",  # not mkstemp's alphabet
    ]
    for name in keep:
        (tmp_path / name).write_text("mine")
        age(tmp_path / name, 10 * STALE)
    (tmp_path / ".b.tar.gz.trtbuild-abcd1234.tmp").symlink_to(tmp_path / keep[0])  # links: never ours
    age(tmp_path / ".b.tar.gz.trtbuild-abcd1234.tmp", 10 * STALE)
    assert atomic.clean_stale(tmp_path / "b.tar.gz") == []
    assert len(list(tmp_path.iterdir())) == len(keep) + 1


def test_legacy_work_folders_older_than_a_day_are_removed(tmp_path: Path) -> None:
    for name, seconds in (
        (".bundle-abcd1234", 2 * 86400),
        (".bundle-efgh5678", 3600),
        (".bundle-notes", 9e6),
    ):
        (tmp_path / name / "payload").mkdir(parents=True)
        age(tmp_path / name, seconds)
    clean_legacy_work(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle-efgh5678", ".bundle-notes"]


# ---- property: exactly ours, unlocked and old are removed ------------------------------------------------

entry_strategy = st.tuples(
    st.sampled_from(["ours-file", "ours-dir", "ours-suffixless", "other-target", "user-dotfile"]),
    st.booleans(),  # old
    st.booleans(),  # locked by a live writer
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(entry_strategy, max_size=8))
def test_property_clean_stale_removes_exactly_dead_old_staging(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[str, bool, bool]]
) -> None:
    folder = tmp_path_factory.mktemp("stale")
    target = folder / "model.int8.onnx"
    expected, fds = set(), []
    try:
        for i, (kind, old, locked) in enumerate(entries):
            rand = f"{i:08d}"
            name = {
                "ours-file": f"{atomic.staging_prefix(target.name)}{rand}.partial",
                "ours-dir": f"{atomic.staging_prefix(target.name)}{rand}.staging",
                "ours-suffixless": f"{atomic.staging_prefix(target.name)}{rand}",
                "other-target": f"{atomic.staging_prefix('other.onnx')}{rand}.tmp",
                "user-dotfile": f".{target.name}.{rand}",
            }[kind]
            path = folder / name
            if kind == "ours-dir":
                (path / "sub").mkdir(parents=True)
                (path / "sub" / "f").write_bytes(b"x")
            else:
                path.write_bytes(b"x")
            if locked:
                fd = os.open(path, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fds.append(fd)
            if old:
                age(path, STALE)
            if kind.startswith("ours") and old and not locked:
                expected.add(name)
        before = {p.name for p in folder.iterdir()}
        removed = {p.name for p in atomic.clean_stale(target)}
        event(f"removed {len(removed)} of {len(before)}")
        assert removed == expected
        assert {p.name for p in folder.iterdir()} == before - expected
    finally:
        for fd in fds:
            os.close(fd)
