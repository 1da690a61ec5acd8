"""Signed fleet bundles: creation, verification, device check, tampering and hostile archives."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from calibrators.calibrate import calibrate
from calibrators.encodings import qualcomm_activation_tensors
from trtbuild.bundle import archive, signing
from trtbuild.bundle.archive import Limits, create_bundle, read_bundle
from trtbuild.bundle.device import detect_device, jetpack_from_l4t
from trtbuild.bundle.manifest import FileEntry, Manifest
from trtbuild.bundle.verify import check_device, verify_bundle
from trtbuild.cli import cli
from trtbuild.core.errors import TrtbuildError
from trtbuild.ship.bundles import create_bundles


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    result = CliRunner().invoke(cli, ["bundle", "keygen", str(folder / "fleet.pem")])
    assert result.exit_code == 0, result.output
    assert (folder / "fleet.pem").stat().st_mode & 0o077 == 0  # private key not readable by others
    return folder / "fleet.pem", folder / "fleet.pub"


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("other")
    return signing.generate_keypair(folder / "other.pem")


@pytest.fixture(scope="module")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path, keys: tuple[Path, Path]
) -> list[Path]:
    out = tmp_path_factory.mktemp("bundles")
    result = CliRunner().invoke(
        cli,
        [
            "bundle",
            "create",
            "--model",
            str(effnet_onnx),
            "--target",
            "orin-jp6.1",
            "--target",
            "xavier-jp5",
            "--precision",
            "fp16",
            "--key",
            str(keys[0]),
            "--name",
            "effnet",
            "--version",
            "2.1",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in json.loads(result.output)["bundles"]]
    assert [p.name for p in paths] == [
        "effnet-2.1-orin-jp6.1-fp16.tar.gz",
        "effnet-2.1-xavier-jp5-fp16.tar.gz",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp leftovers
    return paths


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    """A real signed bundle with a small payload, for the fault tests (re-packing 18 MB each time is slow)."""
    folder = tmp_path_factory.mktemp("small")
    payload = folder / "payload"
    (payload / "sub").mkdir(parents=True)
    (payload / "build.sh").write_text("#!/usr/bin/env bash\necho build\n")
    (payload / "build.sh").chmod(0o755)
    (payload / "sub" / "weights.bin").write_bytes(np.random.default_rng(0).bytes(200_000))
    path, _ = create_bundle(
        payload,
        folder / "small.tar.gz",
        signing.load_private_key(str(keys[0])),
        model="m",
        model_version="1",
        target="xavier-jp5",
        precision="int8",
        requires={"kind": "jetson", "jetpack": "5.1"},
        io_spec={"inputs": []},
    )
    return path


def _verify_cli(bundle: Path, pub: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["python3", "-m", "trtbuild.cli", "bundle", "verify", str(bundle), "--pub", str(pub), *extra],
        capture_output=True,
        text=True,
    )


def _assert_refused(
    result: subprocess.CompletedProcess[str], message: str, extract: Path | None = None
) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr
    if extract is not None:
        assert not extract.exists()  # nothing extracted
        assert not any(p.name.startswith(f".{extract.name}") for p in extract.parent.iterdir())


# ---- the happy path --------------------------------------------------------------------------------------


def test_manifest_records_model_target_requirements_and_hashes(
    bundles: list[Path], effnet_onnx: Path
) -> None:
    result = CliRunner().invoke(cli, ["bundle", "inspect", str(bundles[0]), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["schema"] == 1 and doc["model"] == {"name": "effnet", "version": "2.1"}
    assert doc["target"] == "orin-jp6.1" and doc["precision"] == "fp16"
    assert doc["requires"]["kind"] == "jetson" and doc["requires"]["jetpack"] == "6.1"
    assert doc["requires"]["tensorrt"].startswith("10.3")
    assert doc["io"]["inputs"][0]["name"] == "images" and doc["io"]["outputs"][0]["name"] == "logits"
    import hashlib

    assert doc["files"][effnet_onnx.name]["sha256"] == hashlib.sha256(effnet_onnx.read_bytes()).hexdigest()
    assert {"build.sh", "profile.sh", "plan.json"} <= set(doc["files"])


def test_verify_and_extract_on_the_stated_device(
    tmp_path: Path, bundles: list[Path], keys: tuple[Path, Path], effnet_onnx: Path
) -> None:
    dest = tmp_path / "deploy"
    result = _verify_cli(bundles[0], keys[1], "--device", "orin-jp6.1", "--extract", str(dest), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["files_checked"] == len([p for p in dest.rglob("*") if p.is_file()])
    # the smoke record, signed with the bundle: the device agent's check runs it and it passes
    from trtbuild.fleet.smoke import SMOKE_DIR, SMOKE_INDEX, run_smoke

    assert (dest / SMOKE_DIR / SMOKE_INDEX).is_file()
    manifest = verify_bundle(bundles[0], signing.load_public_key(str(keys[1])), device="orin-jp6.1").manifest
    assert "not run" not in run_smoke(dest, manifest)
    assert report["device_check"] == "stated device 'orin-jp6.1' matches target"
    assert (dest / effnet_onnx.name).read_bytes() == effnet_onnx.read_bytes()
    assert os.access(dest / "build.sh", os.X_OK)
    assert not (dest / "manifest.json").exists()  # the manifest is checked, not deployed as payload


def test_device_check_on_a_machine_that_is_neither_jetson_nor_gpu(
    bundles: list[Path], keys: tuple[Path, Path]
) -> None:
    if detect_device() is not None:
        pytest.skip("this machine is a Jetson or has an NVIDIA GPU; the CPU-only message does not apply")
    _assert_refused(_verify_cli(bundles[0], keys[1]), "cannot check target 'orin-jp6.1' on this machine")
    skipped = _verify_cli(bundles[0], keys[1], "--device", "skip")
    assert skipped.returncode == 0 and "skipped on request" in skipped.stdout


def test_target_mismatch(tmp_path: Path, bundles: list[Path], keys: tuple[Path, Path]) -> None:
    dest = tmp_path / "x"
    _assert_refused(
        _verify_cli(bundles[0], keys[1], "--device", "xavier-jp5", "--extract", str(dest)),
        "bundle targets 'orin-jp6.1' but the device is 'xavier-jp5'",
        dest,
    )


def test_detected_jetson_and_gpu_are_compared_with_the_manifest() -> None:
    manifest = Manifest("m", "1", "orin-jp6.1", "fp16", {"kind": "jetson", "jetpack": "6.1"}, {}, {})
    from trtbuild.bundle.device import Device

    release = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64"
    assert jetpack_from_l4t(release) == "6.2"
    assert "JetPack 6.2" in check_device(
        manifest, None, Device("jetson", "Orin", "6.2")
    )  # same TensorRT 10.3
    with pytest.raises(TrtbuildError, match="needs JetPack 6.1 but this Jetson runs JetPack 5.1"):
        check_device(
            manifest, None, Device("jetson", "Xavier", jetpack_from_l4t("# R35 (release), REVISION: 4.1"))
        )
    with pytest.raises(TrtbuildError, match="but this machine is NVIDIA H100"):
        check_device(manifest, None, Device("datacenter", "NVIDIA H100", sm="sm90"))


# ---- faults -----------------------------------------------------------------------------------------------


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle, "r:gz") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _write_tar(path: Path, members: Sequence[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _small_bundle(
    key_path: Path, files: dict[str, bytes], schema: int = 1
) -> list[tuple[tarfile.TarInfo, bytes]]:
    """manifest.json + manifest.sig for ``files``, signed correctly, followed by the files."""
    import hashlib

    manifest = Manifest(
        "m",
        "1",
        "orin-jp6.1",
        "fp16",
        {"kind": "jetson", "jetpack": "6.1"},
        {"inputs": []},
        {p: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for p, d in files.items()},
        schema=schema,
    )
    stored = json.dumps(manifest.to_json()).encode()
    key = signing.load_private_key(str(key_path))
    head = [
        (tarfile.TarInfo("manifest.json"), stored),
        (tarfile.TarInfo("manifest.sig"), signing.signature_document(key, stored)),  # the exact bytes
    ]
    return head + [(tarfile.TarInfo(p), d) for p, d in files.items()]


def test_tampered_file(tmp_path: Path, small: Path, keys: tuple[Path, Path]) -> None:
    members = _members(small)
    i = next(i for i, (m, _) in enumerate(members) if m.name == "build.sh")
    data = bytearray(members[i][1])
    data[-2] ^= 0x01  # same size, one bit flipped
    members[i] = (members[i][0], bytes(data))
    bad = _write_tar(tmp_path / "tampered.tar.gz", members)
    dest = tmp_path / "out"
    _assert_refused(
        _verify_cli(bad, keys[1], "--device", "xavier-jp5", "--extract", str(dest)),
        "'build.sh' does not match its sha256 in the signed manifest",
        dest,
    )


def test_tampered_manifest(tmp_path: Path, small: Path, keys: tuple[Path, Path]) -> None:
    members = _members(small)
    doc = json.loads(members[0][1])
    doc["requires"]["tensorrt"] = "8.6.2"
    members[0] = (members[0][0], json.dumps(doc).encode())
    bad = _write_tar(tmp_path / "m.tar.gz", members)
    _assert_refused(_verify_cli(bad, keys[1], "--device", "skip"), "signature does not match its manifest")


def test_wrong_key(small: Path, other_keys: tuple[Path, Path]) -> None:
    _assert_refused(_verify_cli(small, other_keys[1], "--device", "skip"), "bundle was signed by key")


def test_truncated_archive(tmp_path: Path, small: Path, keys: tuple[Path, Path]) -> None:
    data = small.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.tar.gz"
        bad.write_bytes(data[:cut])
        dest = tmp_path / f"out{cut}"
        _assert_refused(
            _verify_cli(bad, keys[1], "--device", "xavier-jp5", "--extract", str(dest)),
            "is truncated or corrupt",
            dest,
        )


def test_newer_schema(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bad = _write_tar(tmp_path / "new.tar.gz", _small_bundle(keys[0], {"a.txt": b"hello"}, schema=2))
    _assert_refused(
        _verify_cli(bad, keys[1], "--device", "skip"), "schema 2, newer than this trtbuild reads (1)"
    )


def _hostile(kind: str, target: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo(
        {
            "absolute": str(target),
            "dotdot": "../" * 12 + str(target).lstrip("/"),
            "symlink": "link",
            "hardlink": "hard",
            "device": "dev",
            "fifo": "fifo",
        }[kind]
    )
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, str(target)
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "a.txt"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("absolute", "absolute path"),
        ("dotdot", "escapes the bundle"),
        ("symlink", "is a link"),
        ("hardlink", "is a link"),
        ("device", "device or FIFO"),
        ("fifo", "device or FIFO"),
    ],
)
def test_hostile_members_are_refused_and_nothing_is_written(
    tmp_path: Path, keys: tuple[Path, Path], kind: str, message: str
) -> None:
    target = Path("/tmp") / f"trtbuild-evil-{uuid.uuid4().hex}"
    members = _small_bundle(keys[0], {"a.txt": b"hello"})
    members.insert(2, (_hostile(kind, target), b"pwned"))
    bad = _write_tar(tmp_path / f"{kind}.tar.gz", members)
    dest = tmp_path / "out"
    _assert_refused(_verify_cli(bad, keys[1], "--device", "skip", "--extract", str(dest)), message, dest)
    assert not target.exists() and not os.path.lexists(target)


def test_oversized_member_is_refused_from_its_header(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A header claiming 9 GiB is refused before a byte of it is read (the data is not even there)."""
    members = _small_bundle(keys[0], {"a.txt": b"hello"})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    huge = tarfile.TarInfo("huge.bin")
    huge.size = 9 << 30
    body = raw.getvalue().rstrip(b"\0")
    body += b"\0" * (-len(body) % 512) + huge.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024
    bad = tmp_path / "huge.tar.gz"
    bad.write_bytes(gzip.compress(body))
    dest = tmp_path / "out"
    _assert_refused(
        _verify_cli(bad, keys[1], "--device", "skip", "--extract", str(dest)), "is oversized", dest
    )
    # and a configurable limit for real members
    small = _write_tar(tmp_path / "small.tar.gz", _small_bundle(keys[0], {"a.txt": b"x" * 5000}))
    with pytest.raises(TrtbuildError, match="oversized"):
        read_bundle(small, signing.load_public_key(str(keys[1])), limits=Limits(member_bytes=4096))


def test_unlisted_and_missing_files(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    members = _small_bundle(keys[0], {"a.txt": b"hello"})
    extra = _write_tar(tmp_path / "extra.tar.gz", [*members, (tarfile.TarInfo("b.txt"), b"smuggled")])
    _assert_refused(
        _verify_cli(extra, keys[1], "--device", "skip"), "'b.txt', which its signed manifest does not"
    )
    missing = _write_tar(tmp_path / "missing.tar.gz", members[:2])
    _assert_refused(_verify_cli(missing, keys[1], "--device", "skip"), "missing 1 file(s)")


# ---- creation ---------------------------------------------------------------------------------------------


def test_creation_is_atomic(tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    payload = tmp_path / "payload"
    payload.mkdir()
    for i in range(3):
        (payload / f"f{i}.bin").write_bytes(os.urandom(1000))
    calls = {"n": 0}
    real_addfile = tarfile.TarFile.addfile

    def dying_addfile(self: tarfile.TarFile, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # interrupted half-way through writing the archive
        real_addfile(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "addfile", dying_addfile)
    out_dir = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        create_bundle(
            payload,
            out_dir / "b.tar.gz",
            signing.load_private_key(str(keys[0])),
            model="m",
            model_version="1",
            target="orin-jp6.1",
            precision="fp16",
            requires={"kind": "jetson"},
            io_spec={},
        )
    assert not out_dir.exists()  # nothing half-written, not even the folder the write created


def test_source_folder_with_a_symlink_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    payload = tmp_path / "p"
    payload.mkdir()
    (payload / "a").write_text("a")
    (payload / "l").symlink_to("/etc/passwd")
    with pytest.raises(TrtbuildError, match="symlink"):
        archive.collect_files(payload)


def test_keys_from_environment_and_cli_bad_inputs(
    tmp_path: Path, keys: tuple[Path, Path], effnet_onnx: Path, bundles: list[Path]
) -> None:
    env = {**os.environ, "TRTBUILD_VERIFY_KEY": keys[1].read_text()}
    r = subprocess.run(
        ["python3", "-m", "trtbuild.cli", "bundle", "verify", str(bundles[1]), "--device", "xavier-jp5"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "none"
    no_key = {k: v for k, v in os.environ.items() if k != "TRTBUILD_SIGNING_KEY"}
    for args, message, environ in (
        ([], "no signing key given", no_key),
        (["--key", str(keys[1])], "not an unencrypted PEM private key", no_key),
        (["--key", str(keys[0]), "--target", "h100"], "not a Jetson or Qualcomm target", no_key),
        (["--key", str(keys[0]), "--target", "snpe"], "Qualcomm handoff is INT8", no_key),
    ):
        r = subprocess.run(
            [
                "python3",
                "-m",
                "trtbuild.cli",
                "bundle",
                "create",
                "--model",
                str(effnet_onnx),
                "--target",
                "orin-jp6.1",
                "--precision",
                "fp16",
                "--out",
                str(out),
                *args,
            ],
            capture_output=True,
            text=True,
            env=environ,
        )
        _assert_refused(r, message)
        assert not out.exists() or not any(p.suffix == ".gz" for p in out.iterdir())


def test_qualcomm_bundle_from_real_calibration(
    tmp_path: Path,
    effnet_onnx: Path,
    photo_batch: np.ndarray,
    keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative --out, as the CLI's default `bundles` is (crashed: smoke record)
    ranges = calibrate(
        effnet_onnx,
        photo_batch[:4],
        "minmax",
        tensors=qualcomm_activation_tensors(effnet_onnx),
        show_progress=False,
    )
    [path] = create_bundles(
        effnet_onnx,
        ["snpe"],
        ["int8"],
        signing.load_private_key(str(keys[0])),
        Path("bundles"),
        ranges=ranges,
        calibration=photo_batch[:2],
        fidelity={"top1_agreement": 0.92},
    )
    report = verify_bundle(path, signing.load_public_key(str(keys[1])), extract_to=tmp_path / "x")
    assert report.device_check.startswith("not device-bound")
    assert report.manifest.requires["kind"] == "qualcomm" and report.manifest.fidelity == {
        "top1_agreement": 0.92
    }
    names = {p.name for p in (tmp_path / "x").iterdir()}
    assert {
        "efficientnet_lite0.encodings",
        "input_list.txt",
        "convert.sh",
        "efficientnet_lite0.aimet",
    } <= names
    # the handoff graph's smoke record, signed with the bundle: the device agent's check runs and passes
    from trtbuild.fleet.smoke import run_smoke

    assert "match the recorded run" in run_smoke(tmp_path / "x", report.manifest)


def test_third_party_file_with_dotted_name_and_paddle_dims(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """PP-OCR's angle classifier as rapidocr ships it: a dotted file name (`..._v2.0_cls_infer`: was cut at
    the first dot), batch written as dim_value -1 (Paddle2ONNX; was read as a fixed -1 and refused every
    --shape), unnamed dynamic height/width (given by --shape, which bundle create now takes)."""
    from cli_helpers import run_cli
    from test_quantize_models import fetch_rapidocr_onnx

    model = fetch_rapidocr_onnx("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    out = tmp_path / "b"
    code, stdout, err = run_cli(
        ["bundle", "create", "--model", str(model), "--target", "orin-jp6.2", "--target", "triton-ort-cpu"]
        + ["--precision", "fp32", "--key", str(keys[0]), "--out", str(out), "--json"]
        + ["--shape", "x:1x3x48x192,4x3x48x192,8x3x48x192"],
        capsys,
    )
    assert code == 0, err
    names = sorted(Path(p).name for p in json.loads(stdout)["bundles"])
    assert names == [
        "ch_ppocr_mobile_v2.0_cls_infer-1-orin-jp6.2-fp32.tar.gz",
        "ch_ppocr_mobile_v2.0_cls_infer-1-triton-ort-cpu-fp32.tar.gz",
    ]
    public = signing.load_public_key(str(keys[1]))
    report = verify_bundle(out / names[0], public, device="orin-jp6.2", extract_to=tmp_path / "x")
    plan = json.loads((tmp_path / "x" / "plan.json").read_text())
    assert plan["model"] == "ch_ppocr_mobile_v2.0_cls_infer" and report.manifest.precision == "fp32"
    assert [i["max"] for i in plan["inputs"]] == [[8, 3, 48, 192]]
