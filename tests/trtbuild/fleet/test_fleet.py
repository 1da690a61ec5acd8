"""Fleet distribution against a real OCI registry (docker-registry on 127.0.0.1) and real TUF metadata:
publish -> update -> `current`, supersede, and every attack refused with one `error:` line, nothing
installed."""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cli_helpers import run_cli
from fleet_support import REGISTRY_BIN, RunningRegistry, free_port, make_bundle, run_registry

from trtbuild.bundle import signing
from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import install, metadata_store, oci, repository
from trtbuild.fleet.keys import signer
from trtbuild.fleet.publish import publish
from trtbuild.fleet.repository import RoleKeys

pytestmark = pytest.mark.skipif(REGISTRY_BIN is None, reason="needs Debian's docker-registry package")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for role in ("bundle", "root", "targets", "online"):
        priv, pub = signing.generate_keypair(folder / f"{role}.pem")
        made[role], made[f"{role}.pub"] = priv, pub
    return made


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    made = {
        f"{v}-{t}": make_bundle(out, keys["bundle"], v, t)
        for v in ("1", "2", "3")
        for t in ("orin-jp6.1", "xavier-jp5")
    }
    made["broken"] = make_bundle(out, keys["bundle"], "4", "orin-jp6.1", break_smoke=True)
    return made


class Fleet:
    """One fresh registry repository with its release metadata, and helpers to drive it."""

    def __init__(self, registry: RunningRegistry, keys: dict[str, Path], tmp: Path) -> None:
        self.server = registry
        self.keys = keys
        self.tmp = tmp
        self.ref = f"{registry.host}/fleet/{uuid.uuid4().hex[:8]}"
        self.reg = oci.parse_registry(self.ref)
        self.root_json = tmp / "root.json"
        self.role_keys = RoleKeys([signer(keys["root"])], signer(keys["targets"]), signer(keys["online"]))
        repository.init_repository(self.reg, self.role_keys, self.root_json)

    def publish(self, *paths: Path, ttl: timedelta = repository.EXPIRY["timestamp"]) -> int:
        pub = signing.load_public_key(str(self.keys["bundle.pub"]))
        version, _ = publish(self.reg, list(paths), pub, self.role_keys, ttl)
        return version

    def update_args(self, root: Path, device: str = "orin-jp6.1", *extra: str) -> list[str]:
        return [
            "fleet", "update", "--registry", self.ref, "--install-root", str(root),
            "--pub", str(self.keys["bundle.pub"]), "--root", str(self.root_json), "--device", device, *extra,
        ]  # fmt: skip


@pytest.fixture
def fleet(registry: RunningRegistry, keys: dict[str, Path], tmp_path: Path) -> Fleet:
    return Fleet(registry, keys, tmp_path)


def _ok(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def _current(root: Path) -> str | None:
    return install.current_name(root)


def test_round_trip_two_targets_then_supersede(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"], bundles["1-xavier-jp5"])
    doc = oci.manifest(fleet.reg, "tiny-orin-jp6.1-fp16-1")  # one tag per model/target/precision/version
    assert doc is not None and doc["config"]["mediaType"] == oci.BUNDLE_CONFIG_MEDIA_TYPE
    assert doc["layers"][0]["mediaType"] == oci.BUNDLE_MEDIA_TYPE
    assert doc["annotations"]["dev.trtbuild.target"] == "orin-jp6.1"
    assert doc["annotations"]["org.opencontainers.image.version"] == "1"
    orin, xavier = tmp_path / "orin", tmp_path / "xavier"
    first = _ok(fleet.update_args(orin), capsys)
    assert first["release"] == "tiny-1-orin-jp6.1-fp16" and _current(orin) == "tiny-1-orin-jp6.1-fp16"
    # no TensorRT here: the engine build is pending, with the reason, and the ONNX smoke test passed
    assert first["engine"] == "pending" and "TensorRT is not present" in str(first["reason"])
    assert _ok(fleet.update_args(xavier, "xavier-jp5"), capsys)["release"] == "tiny-1-xavier-jp5-fp16"
    assert (orin / "current" / "model.onnx").is_file()
    assert _ok(fleet.update_args(orin), capsys)["result"] == "up-to-date"

    fleet.publish(bundles["2-orin-jp6.1"], bundles["2-xavier-jp5"])
    assert _ok(fleet.update_args(orin), capsys)["release"] == "tiny-2-orin-jp6.1-fp16"
    assert _ok(fleet.update_args(xavier, "xavier-jp5"), capsys)["release"] == "tiny-2-xavier-jp5-fp16"
    status = _ok(["fleet", "status", "--install-root", str(orin), "--verify"], capsys)
    assert status["current"] == "tiny-2-orin-jp6.1-fp16"
    assert "match the recorded run" in str(status["verified"])
    assert [v["version"] for v in status["versions"]] == ["1", "2"]  # type: ignore[attr-defined, index]


def test_rollback_attack_refused(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"])
    old_timestamp = metadata_store.fetch(fleet.reg, "timestamp")
    assert old_timestamp is not None
    fleet.publish(bundles["2-orin-jp6.1"])
    root = tmp_path / "dev"
    _ok(fleet.update_args(root), capsys)
    # a stale mirror or an attacker serves the older, validly signed release metadata again
    metadata_store.push(fleet.reg, "timestamp", old_timestamp, None)
    _refused(fleet.update_args(root), capsys, "rollback")
    assert _current(root) == "tiny-2-orin-jp6.1-fp16"


def test_freeze_attack_refused(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"], ttl=timedelta(hours=-1))  # the timestamp already expired
    root = tmp_path / "dev"
    _refused(fleet.update_args(root), capsys, "frozen", "expired")
    assert _current(root) is None and not (root / "versions").exists()
    repository.refresh(fleet.reg, fleet.role_keys.online)  # the online key revives it
    assert _ok(fleet.update_args(root), capsys)["release"] == "tiny-1-orin-jp6.1-fp16"


def test_mix_and_match_refused(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"])  # targets v2
    targets_v2 = metadata_store.fetch(fleet.reg, "targets", 2)
    assert targets_v2 is not None
    fleet.publish(bundles["2-orin-jp6.1"])  # targets v3
    # the snapshot names targets v3; the registry serves the (validly signed) targets of the other release
    metadata_store.push(fleet.reg, "targets", targets_v2, 3)
    root = tmp_path / "dev"
    _refused(fleet.update_args(root), capsys, "does not match its signed hash")
    assert _current(root) is None and not (root / "versions").exists()


def _own_blob(fleet: Fleet, keys: dict[str, Path], tmp: Path) -> tuple[Path, Path]:
    """Publish a bundle no other test shares (registry blobs are global by digest); return it and its blob."""
    model = f"tamper{uuid.uuid4().hex[:8]}"
    bundle = make_bundle(tmp, keys["bundle"], "1", model=model)
    fleet.publish(bundle)
    return bundle, fleet.server.blob_path(oci.layer_digest(fleet.reg, f"{model}-orin-jp6.1-fp16-1"))


def test_swapped_blob_refused(
    fleet: Fleet,
    bundles: dict[str, Path],
    keys: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, blob = _own_blob(fleet, keys, tmp_path)
    # same length, other (validly signed!) bundle bytes: only the TUF hash can tell
    other = bundles["1-xavier-jp5"].read_bytes()
    data = blob.read_bytes()
    blob.write_bytes(other[: len(data)].ljust(len(data), b"\0"))
    root = tmp_path / "dev"
    _refused(fleet.update_args(root), capsys, "does not match its signed hash")
    assert _current(root) is None and not (root / "versions").exists()


def test_oversize_download_refused(
    fleet: Fleet, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, blob = _own_blob(fleet, keys, tmp_path)
    with blob.open("ab") as fh:  # an endless download, cut at 4 MiB here
        fh.write(os.urandom(4 << 20))
    root = tmp_path / "dev"
    _refused(fleet.update_args(root), capsys, "larger than its signed length")
    assert _current(root) is None and not (root / "versions").exists()


def test_file_not_in_targets_metadata_refused(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"])
    # a validly signed bundle pushed straight to the registry, never released through TUF
    oci.push_file(
        fleet.reg, bundles["3-orin-jp6.1"], "tiny-orin-jp6.1-fp16-3",
        oci.BUNDLE_MEDIA_TYPE, oci.BUNDLE_CONFIG_MEDIA_TYPE, {},
    )  # fmt: skip
    root = tmp_path / "dev"
    _refused(
        fleet.update_args(root, "orin-jp6.1", "--version", "3"),
        capsys,
        "no release version 3",
        "signed targets",
    )
    assert _current(root) is None
    assert _ok(fleet.update_args(root), capsys)["release"] == "tiny-1-orin-jp6.1-fp16"  # v3 ignored


def test_stalling_registry_refused(
    fleet: Fleet, tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:  # accepts, then never answers
        stall.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(stall.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = stall.getsockname()[1]
        args = fleet.update_args(tmp_path / "dev")
        args[args.index("--registry") + 1] = f"127.0.0.1:{port}/fleet/x"
        _refused([*args, "--timeout", "1"], capsys, "slow retrieval")
    finally:
        stop.set()
        thread.join()
        stall.close()
        for conn in accepted:
            conn.close()
    assert _current(tmp_path / "dev") is None


def test_smoke_failure_rolls_back_and_status_says_why(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dev"
    fleet.publish(bundles["1-orin-jp6.1"])
    _ok(fleet.update_args(root), capsys)
    fleet.publish(bundles["broken"])  # v4: its model no longer matches its recorded output
    _refused(fleet.update_args(root), capsys, "smoke test", "stays on tiny-1-orin-jp6.1-fp16")
    assert _current(root) == "tiny-1-orin-jp6.1-fp16"
    assert not (root / "versions" / "tiny-4-orin-jp6.1-fp16").exists()
    status = _ok(["fleet", "status", "--install-root", str(root)], capsys)
    assert status["events"][-1]["result"] == "rolled back"  # type: ignore[index]
    code, out, _ = run_cli(["fleet", "status", "--install-root", str(root)], capsys)
    assert code == 0 and "rolled back" in out and "pending" in out


def test_manual_rollback_and_keep_last_n(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dev"
    for version in ("1", "2", "3"):
        fleet.publish(bundles[f"{version}-orin-jp6.1"])
        _ok([*fleet.update_args(root), "--keep", "2"], capsys)
    assert sorted(p.name for p in (root / "versions").iterdir()) == [
        "tiny-2-orin-jp6.1-fp16",
        "tiny-3-orin-jp6.1-fp16",
    ]
    code, out, err = run_cli(["fleet", "rollback", "--install-root", str(root)], capsys)
    assert code == 0, err
    assert _current(root) == "tiny-2-orin-jp6.1-fp16"
    _refused(["fleet", "rollback", "--install-root", str(root)], capsys, "no earlier version")
    status = _ok(["fleet", "status", "--install-root", str(root), "--verify"], capsys)
    assert status["current"] == "tiny-2-orin-jp6.1-fp16" and status["verified"]


def test_cli_init_publish_and_bad_input(
    registry: RunningRegistry,
    keys: dict[str, Path],
    bundles: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = f"{registry.host}/fleet/cli{uuid.uuid4().hex[:6]}"
    role = ["--targets-key", str(keys["targets"]), "--online-key", str(keys["online"])]
    init = ["fleet", "init", "--registry", ref, "--root-key", str(keys["root"]), *role]
    code, _, err = run_cli([*init, "--out", str(tmp_path / "root.json")], capsys)
    assert code == 0, err
    _refused([*init, "--out", str(tmp_path / "again.json")], capsys, "already holds release metadata")
    assert not (tmp_path / "again.json").exists()
    publish_args = ["fleet", "publish", str(bundles["1-orin-jp6.1"]), "--registry", ref]
    done = _ok([*publish_args, "--pub", str(keys["bundle.pub"]), *role], capsys)
    assert done["targets_version"] == 2
    # a bundle signed by another key is refused before anything is pushed
    _refused([*publish_args, "--pub", str(keys["root.pub"]), *role], capsys)
    args = [
        "fleet", "update", "--registry", ref, "--install-root", str(tmp_path / "dev"),
        "--pub", str(keys["bundle.pub"]), "--root", str(tmp_path / "root.json"),
    ]  # fmt: skip
    _refused(args, capsys, "cannot detect this device", "--device")  # no Jetson or GPU here
    _refused([*args[:3], "not a registry", *args[4:]], capsys, "HOST[:PORT]/REPO")
    dead = f"127.0.0.1:{free_port()}/fleet/x"
    _refused([*args[:3], dead, *args[4:], "--device", "orin-jp6.1"], capsys, "download failed")
    assert install.current_name(tmp_path / "dev") is None


def test_rotate_keys_devices_follow_and_old_keys_refused(
    fleet: Fleet,
    bundles: dict[str, Path],
    keys: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"])
    device = tmp_path / "dev"
    assert _ok(fleet.update_args(device), capsys)["release"] == "tiny-1-orin-jp6.1-fp16"
    new = {
        role: signing.generate_keypair(tmp_path / f"{role}.pem")[0] for role in ("root", "targets", "online")
    }
    anchor = tmp_path / "root-v2.json"
    base = [
        "fleet",
        "rotate",
        "--registry",
        fleet.ref,
        "--out",
        str(anchor),
        "--online-key",
        str(new["online"]),
    ]
    # not the current root key: one error line, nothing pushed or written
    _refused([*base, "--root-key", str(keys["targets"])], capsys, "0 of the root keys root v1 trusts")
    assert metadata_store.fetch(fleet.reg, "root", 2) is None and not anchor.exists()
    # an --out that cannot be written is refused before anything is pushed
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_out = [*base, "--root-key", str(keys["root"])]
    bad_out[bad_out.index(str(anchor))] = str(blocker / "root.json")
    _refused(bad_out, capsys, "is a file, not a folder")
    assert metadata_store.fetch(fleet.reg, "root", 2) is None
    rotate = [*base, "--root-key", str(keys["root"]), "--new-root-key", str(new["root"])]
    done = _ok([*rotate, "--new-targets-key", str(new["targets"])], capsys)
    assert done["root_version"] == 2 and done["rotated"] == ["root", "targets", "online"] and anchor.is_file()
    # the rotated-out keys can no longer publish or refresh: refused before anything is pushed
    with pytest.raises(TrtbuildError, match="rotated out"):
        fleet.publish(bundles["2-orin-jp6.1"])
    _refused(
        ["fleet", "refresh", "--registry", fleet.ref, "--online-key", str(keys["online"])], capsys, "rotated"
    )
    # a release signed with the new keys reaches the device, which walked root v1 -> v2 by itself
    fleet.role_keys = RoleKeys([], signer(new["targets"]), signer(new["online"]))
    fleet.publish(bundles["2-orin-jp6.1"])
    assert _ok(fleet.update_args(device), capsys)["release"] == "tiny-2-orin-jp6.1-fp16"
    # and a new device starting from the new trust anchor gets the same release
    fresh = [*fleet.update_args(tmp_path / "fresh")]
    fresh[fresh.index(str(fleet.root_json))] = str(anchor)
    assert _ok(fresh, capsys)["release"] == "tiny-2-orin-jp6.1-fp16"
    # renewing root's expiry: the old root key no longer meets the threshold, the new one does
    _refused(rotate, capsys, "0 of the root keys root v2 trusts")
    renew = [*base, "--root-key", str(new["root"])]
    assert _ok(renew, capsys)["rotated"] == [] and metadata_store.fetch(fleet.reg, "root", 3) is not None
    assert _ok(fleet.update_args(device), capsys)["result"] == "up-to-date"
    # a release forged with the leaked old online key is refused by the device
    cur = repository.load_current(fleet.reg)
    repository.push_snapshot_and_timestamp(
        fleet.reg,
        signer(keys["online"]),
        cur.targets.signed.version,
        cur.targets_bytes,
        cur.snapshot.signed.version,
        cur.timestamp.signed.version,
    )
    _refused(fleet.update_args(device), capsys, "without valid signatures")
    assert _current(device) == "tiny-2-orin-jp6.1-fp16"
    # the publisher sees it too, and `refresh --repair` re-signs the newest validly signed release
    refresh = ["fleet", "refresh", "--registry", fleet.ref, "--online-key", str(new["online"])]
    _refused(refresh, capsys, "not validly signed", "--repair")
    code, _, err = run_cli([*refresh, "--repair"], capsys)
    assert code == 0, err
    assert _ok(fleet.update_args(device), capsys)["result"] == "up-to-date"
    fleet.publish(bundles["3-orin-jp6.1"])  # and publishing works again
    assert _ok(fleet.update_args(device), capsys)["release"] == "tiny-3-orin-jp6.1-fp16"
    # a root pushed by someone without the root keys breaks the chain: the publisher refuses it
    forged = repository.load_current(fleet.reg).root
    forged.signed.version += 1
    repository.sign_metadata(forged, [signer(keys["online"])])
    metadata_store.push(fleet.reg, "root", forged.to_bytes(), forged.signed.version)
    _refused(refresh, capsys, f"root v{forged.signed.version} in the registry is not signed")


def test_damaged_installed_version_is_refused_then_reinstalled(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dev"
    for version in ("1", "2"):
        fleet.publish(bundles[f"{version}-orin-jp6.1"])
        _ok(fleet.update_args(root), capsys)
    (root / "versions" / "tiny-1-orin-jp6.1-fp16" / "model.onnx").write_bytes(b"bit rot")
    _refused(["fleet", "rollback", "--install-root", str(root)], capsys, "damaged")
    assert _current(root) == "tiny-2-orin-jp6.1-fp16"
    # going back on purpose fetches and verifies it again
    assert _ok([*fleet.update_args(root), "--version", "1"], capsys)["release"] == "tiny-1-orin-jp6.1-fp16"
    assert "match the recorded run" in str(
        _ok(["fleet", "status", "--install-root", str(root), "--verify"], capsys)["verified"]
    )


def test_unsafe_release_entry_is_skipped(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.publish(bundles["1-orin-jp6.1"])
    evil = {"trtbuild": {"model": "..", "version": "9", "target": "orin-jp6.1", "precision": "fp16"}}
    evil["trtbuild"]["requires"] = {}  # type: ignore[assignment]
    repository.add_targets(fleet.reg, fleet.role_keys, [("x/evil.tar.gz", bundles["3-orin-jp6.1"], evil)])
    root = tmp_path / "dev"
    assert _ok(fleet.update_args(root), capsys)["release"] == "tiny-1-orin-jp6.1-fp16"
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["tiny-1-orin-jp6.1-fp16"]


def test_a_release_raced_by_another_publisher_is_rebuilt_not_lost(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host (its own publish lock) releases between our targets push and our timestamp push: ours
    sees the timestamp moved, rebuilds on the newer release and lands; nothing is overwritten or lost."""
    from trtbuild.fleet import release_lock

    fleet.publish(bundles["1-orin-jp6.1"])
    real = repository.push_snapshot_and_timestamp
    raced: list[int] = []

    def racing(*args: object, **kwargs: object) -> None:
        if not raced:
            raced.append(1)
            monkeypatch.setenv(release_lock.LOCK_DIR_ENV, str(tmp_path))  # the other host's lock
            raced.append(fleet.publish(bundles["1-xavier-jp5"]))
            monkeypatch.delenv(release_lock.LOCK_DIR_ENV)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "push_snapshot_and_timestamp", racing)
    ours = fleet.publish(bundles["2-orin-jp6.1"])
    theirs = raced[1]
    # after init (targets 1) and the first release (2): our first attempt's targets tag (3) was left alone,
    # theirs went past it (4), ours was rebuilt on theirs (5)
    assert (theirs, ours) == (4, 5)
    cur = repository.load_current(fleet.reg)
    assert cur.targets.signed.version == ours
    landed = cur.targets.signed.targets
    assert len(landed) == 3, sorted(landed)
    for name in ("1-orin-jp6.1", "1-xavier-jp5", "2-orin-jp6.1"):
        assert any(path.endswith(bundles[name].name) for path in landed), sorted(landed)
    first = metadata_store.fetch(fleet.reg, "targets", 3)  # the lost attempt's file is still its own
    assert first is not None and "xavier" not in first.decode()


def test_concurrent_publishers_lose_no_release(
    fleet: Fleet, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four publishers at once, without the host lock (as on four CI machines): every release lands."""
    import contextlib

    from trtbuild.fleet import release_lock

    monkeypatch.setattr(release_lock, "publisher_lock", lambda reg: contextlib.nullcontext())
    names = ["1-orin-jp6.1", "1-xavier-jp5", "2-orin-jp6.1", "2-xavier-jp5"]
    start = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            start.wait()
            fleet.publish(bundles[name])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    landed = repository.load_current(fleet.reg).targets.signed.targets
    assert sorted(path.rsplit("/", 1)[1] for path in landed) == sorted(bundles[n].name for n in names)
