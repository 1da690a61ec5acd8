"""`bundle keygen` never loses a private key (issue #14, family 2).

The pair is written as one unit (both staged, then both renamed; on failure neither file changes),
identical or confusable paths are refused, an existing private key is replaced only with --force (and
never by a public key), and a private key readable by others is warned about when it is used.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trtbuild.bundle import signing
from trtbuild.cli import main
from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def keygen(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "bundle", "keygen", *args)
    if code:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def public_of(private_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def assert_pair(priv: Path, pub: Path) -> None:
    assert public_of(priv.read_bytes()) == pub.read_bytes()
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fleet.pub"], "ends in .pub, the public key's suffix"),
        (["fleet.PUB"], "ends in .pub"),
        (["a.pem", "--pub", "a.pem"], "are the same file"),
        (["a.pem", "--pub", "./sub/../a.pem"], "are the same file"),
    ],
)
def test_confusable_paths_are_refused_and_nothing_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    code, err = keygen(capsys, *args)
    assert code == 2 and message in err
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("force", [False, True])
def test_same_file_through_a_link_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], force: bool
) -> None:
    signing.generate_keypair(tmp_path / "a.pem")
    before = snapshot(tmp_path)
    os.symlink(tmp_path / "a.pem", tmp_path / "sym.pub")
    os.link(tmp_path / "a.pem", tmp_path / "hard.pub")
    for pub in ("sym.pub", "hard.pub"):
        code, err = keygen(
            capsys, tmp_path / "a.pem", "--pub", tmp_path / pub, *(["--force"] if force else [])
        )
        assert code == 2 and "are the same file" in err, err
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_existing_keys_are_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signing.generate_keypair(tmp_path / "fleet.pem")
    before = snapshot(tmp_path)
    code, err = keygen(capsys, tmp_path / "fleet.pem")
    assert code == 2 and "fleet.pem already exists" in err
    (tmp_path / "fleet.pem").unlink()
    code, err = keygen(capsys, tmp_path / "fleet.pem")  # only the .pub is there: still refused
    assert code == 2 and "fleet.pub already exists" in err
    assert snapshot(tmp_path) == {"fleet.pub": before["fleet.pub"]}


def test_force_never_writes_a_public_key_over_a_private_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signing.generate_keypair(tmp_path / "other.pem")
    before = snapshot(tmp_path)
    code, err = keygen(capsys, tmp_path / "new.pem", "--pub", tmp_path / "other.pem", "--force")
    assert code == 2 and "holds a private key" in err
    assert snapshot(tmp_path) == before


def test_force_refuses_to_replace_a_file_that_is_not_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07onnx weights")
    code, err = keygen(capsys, tmp_path / "model.onnx", "--force")
    assert code == 2 and "is not a PEM key file" in err
    assert (tmp_path / "model.onnx").read_bytes() == b"\x08\x07onnx weights"


@pytest.mark.parametrize("force", [False, True])
def test_an_unwritable_public_path_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], force: bool
) -> None:
    """The audit: --force with a bad --pub replaced the private key, then failed with a traceback; without
    --force a traceback left a private key with no .pub."""
    (tmp_path / "file").write_text("not a folder")
    if force:
        signing.generate_keypair(tmp_path / "fleet.pem")
    before = snapshot(tmp_path)
    code, err = keygen(
        capsys,
        tmp_path / "fleet.pem",
        "--pub",
        tmp_path / "file" / "fleet.pub",
        *(["--force"] if force else []),
    )
    assert code == 2 and ("neither key file was changed" in err or "cannot read" in err), err
    assert snapshot(tmp_path) == before
    assert not any(atomic.MARK in p.name for p in tmp_path.iterdir())  # no staging leftovers


def test_a_failed_second_rename_puts_the_first_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signing.generate_keypair(tmp_path / "fleet.pem")
    before = snapshot(tmp_path)
    real_replace = os.replace

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name == "fleet.pem":
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(TrtbuildError, match="neither key file was changed"):
        signing.generate_keypair(tmp_path / "fleet.pem", overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(tmp_path) == before  # the public key that was renamed first is back
    assert_pair(tmp_path / "fleet.pem", tmp_path / "fleet.pub")


def test_force_replaces_both_as_a_matching_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signing.generate_keypair(tmp_path / "fleet.pem")
    before = snapshot(tmp_path)
    code, _ = keygen(capsys, tmp_path / "fleet.pem", "--force")
    assert code == 0
    after = snapshot(tmp_path)
    assert set(after) == {"fleet.pem", "fleet.pub"} and after["fleet.pem"] != before["fleet.pem"]
    assert_pair(tmp_path / "fleet.pem", tmp_path / "fleet.pub")


def test_keys_in_new_folders_and_no_parents_left_on_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = keygen(capsys, tmp_path / "a" / "b" / "k.pem", "--pub", tmp_path / "c" / "k.pub")
    assert code == 0
    assert_pair(tmp_path / "a" / "b" / "k.pem", tmp_path / "c" / "k.pub")
    (tmp_path / "file").write_text("x")
    code, _ = keygen(capsys, tmp_path / "x" / "y" / "k.pem", "--pub", tmp_path / "file" / "k.pub")
    assert code == 2 and not (tmp_path / "x").exists()


def test_a_private_key_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    priv, _ = signing.generate_keypair(tmp_path / "fleet.pem")
    signing.load_private_key(priv)
    assert "readable by group/others" not in caplog.text
    priv.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="trtbuild"):
        signing.load_private_key(priv)
    assert "readable by group/others (mode 0644)" in caplog.text and "chmod 600" in caplog.text


# ---- property: any mix of existing files, paths and --force ----------------------------------------------

NAMES = ["k.pem", "k.pub", "k", "other.pem", "other.pub", "d/k.pem", "file/k.pub"]
CONTENT = ["private", "public", "junk", "empty"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    priv=st.sampled_from(NAMES),
    pub=st.one_of(st.none(), st.sampled_from(NAMES)),
    existing=st.dictionaries(
        st.sampled_from(["k.pem", "k.pub", "other.pem", "other.pub", "k"]), st.sampled_from(CONTENT)
    ),
    force=st.booleans(),
)
def test_property_keygen_never_loses_a_private_key(
    tmp_path_factory: pytest.TempPathFactory,
    priv: str,
    pub: str | None,
    existing: dict[str, str],
    force: bool,
) -> None:
    root = tmp_path_factory.mktemp("keygen")
    (root / "file").write_text("a file, not a folder")
    seed_priv, seed_pub = signing.generate_keypair(root / "seed.pem")
    blobs = {
        "private": seed_priv.read_bytes(),
        "public": seed_pub.read_bytes(),
        "junk": b"junk\n",
        "empty": b"",
    }
    seed_priv.unlink()
    seed_pub.unlink()
    for name, kind in existing.items():
        (root / name).write_bytes(blobs[kind])
    before = snapshot(root)
    try:
        signing.generate_keypair(root / priv, root / pub if pub else None, overwrite=force)
    except TrtbuildError as exc:
        event(f"refused: {exc.problem.split(' ')[-1][:30]}")
        assert snapshot(root) == before  # neither file changed
        assert not any(atomic.MARK in p.name for p in root.rglob("*"))
        return
    event("written")
    pub_path = root / pub if pub else (root / priv).with_suffix(".pub")
    assert_pair(root / priv, pub_path)
    after = snapshot(root)
    for name, data in before.items():
        if name in (priv, pub_path.relative_to(root).as_posix()):
            assert force, "an existing key file was replaced without --force"
            assert b"PRIVATE KEY" not in data or name == priv, "a private key was overwritten by a public key"
        else:
            assert after[name] == data
    assert not priv.endswith(".pub")
