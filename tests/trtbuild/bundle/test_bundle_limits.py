"""Hostile bundle archives (issue #14, family 1): every header, name, member count, manifest size and the
total expansion are bounded before they are read; the gzip stream is read to its exact end; folder entries
are checked against the signed manifest; extraction honours the umask and leaves nothing behind on failure.

Each case is refused with one ``error:`` line (exit 2) and without extracting anything. The property test
at the end mutates real signed bundles at random and requires: either the bundle verifies with exactly its
signed files, or it is refused with a TrtbuildError (never another exception), and nothing is extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trtbuild.bundle import signing
from trtbuild.bundle.archive import Limits, create_bundle, read_bundle, read_manifest_unverified
from trtbuild.bundle.manifest import FileEntry, Manifest
from trtbuild.bundle.verify import verify_bundle
from trtbuild.cli import main
from trtbuild.core.errors import TrtbuildError

Members = list[tuple[tarfile.TarInfo, bytes]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path_factory.mktemp("limits-keys") / "fleet.pem")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(
    capsys: pytest.CaptureFixture[str], bundle: Path, pub: Path, message: str, tmp_path: Path
) -> str:
    """`bundle verify --extract` refuses with one short error line naming ``message``; nothing extracted."""
    dest = tmp_path / "deploy" / "to" / "here"
    code, out, err = run_cli(
        capsys, "bundle", "verify", bundle, "--pub", pub, "--device", "skip", "--extract", dest
    )
    assert code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert len(err) < 700, f"error line is {len(err)} characters"
    assert not (tmp_path / "deploy").exists()  # not even the parents of --extract
    return err


def signed_members(key_path: Path, files: dict[str, bytes], stored: bytes | None = None) -> Members:
    manifest = Manifest(
        "m",
        "1",
        "orin-jp6.1",
        "fp16",
        {"kind": "jetson", "jetpack": "6.1"},
        {"inputs": []},
        {p: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for p, d in files.items()},
    )
    stored = stored if stored is not None else json.dumps(manifest.to_json()).encode()
    key = signing.load_private_key(str(key_path))
    return [
        (tarfile.TarInfo("manifest.json"), stored),
        (tarfile.TarInfo("manifest.sig"), signing.signature_document(key, stored)),
        *((tarfile.TarInfo(p), d) for p, d in files.items()),
    ]


def tar_bytes(members: Members, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return raw.getvalue()


def write_bundle(path: Path, members: Members) -> Path:
    path.write_bytes(gzip.compress(tar_bytes(members)))
    return path


def without_end(tar: bytes) -> bytes:
    """A tar stream without its end marker and record padding (to append hand-made entries)."""
    body = tar.rstrip(b"\0")
    return body + b"\0" * (-len(body) % 512)


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT if len(name) <= 100 else tarfile.GNU_FORMAT)


def stream_gzip(path: Path, parts: Iterator[bytes]) -> Path:
    """Compress ``parts`` into ``path`` without holding them in memory."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with path.open("wb") as fh:
        for part in parts:
            fh.write(z.compress(part))
        fh.write(z.flush())
    return path


def repeated(byte: bytes, count: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = byte * chunk
    while count > 0:
        yield block[: min(chunk, count)]
        count -= chunk


# ---- bounded headers, names, counts, sizes ---------------------------------------------------------------


def _pax_comment_record(total: int) -> tuple[bytes, int]:
    """The start of a PAX record 'LEN comment=aaa...\\n' exactly ``total`` bytes long, and the 'a' count."""
    prefix = f"{total} comment=".encode()
    return prefix, total - len(prefix) - 1


def _huge_extended_bundle(tmp_path: Path, key: Path, kind: str, size: int) -> Path:
    head = without_end(tar_bytes(signed_members(key, {"a.txt": b"hello"})[:2]))
    if kind == "pax":
        prefix, fill = _pax_comment_record(size)
        parts = [head, header("././@PaxHeader", size, tarfile.XHDTYPE), prefix, *repeated(b"a", fill), b"\n"]
    else:  # GNU long name
        parts = [head, header("././@LongLink", size, tarfile.GNUTYPE_LONGNAME), *repeated(b"n", size)]
    parts += [b"\0" * (-size % 512), header("a.txt", 5), b"hello".ljust(512, b"\0"), b"\0" * 1024]
    return stream_gzip(tmp_path / f"{kind}.tar.gz", iter(parts))


@pytest.mark.parametrize(
    ("kind", "message"),
    [("pax", "268435456-byte PAX header (limit 65536)"), ("gnu", "268435456-byte member name (limit 4096)")],
)
def test_huge_pax_record_and_gnu_long_name_are_refused_from_their_header(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str], kind: str, message: str
) -> None:
    bundle = _huge_extended_bundle(tmp_path, keys[0], kind, 256 << 20)
    assert_refused(capsys, bundle, keys[1], message, tmp_path)


def _peak_rss_mb(bundle: Path, pub: Path) -> float:
    code = (
        "import resource, sys\n"
        "from trtbuild.bundle.signing import load_public_key\n"
        "from trtbuild.bundle.archive import read_bundle\n"
        "from trtbuild.core.errors import TrtbuildError\n"
        "try:\n"
        f"    read_bundle({str(bundle)!r}, load_public_key({str(pub)!r}))\n"
        "except TrtbuildError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def test_memory_stays_flat_whatever_the_headers_claim(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The audit saw 3.3 GB of RSS for a 1 GiB PAX comment; here 256 MiB records cost nothing measurable."""
    baseline = _peak_rss_mb(
        write_bundle(tmp_path / "ok.tar.gz", signed_members(keys[0], {"a.txt": b"x"})), keys[1]
    )
    for kind in ("pax", "gnu"):
        peak = _peak_rss_mb(_huge_extended_bundle(tmp_path, keys[0], kind, 256 << 20), keys[1])
        assert peak - baseline < 48, (kind, baseline, peak)


def test_long_names_are_cut_in_error_messages(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    long = "d/" * 1000 + "x.bin"  # 2005 characters: within the name limit, unlisted
    members = signed_members(keys[0], {"a.txt": b"hello"})
    bundle = write_bundle(tmp_path / "long.tar.gz", [*members, (tarfile.TarInfo(long), b"smuggled")])
    err = assert_refused(capsys, bundle, keys[1], "which its signed manifest does not list", tmp_path)
    assert "(2005 characters)" in err
    newline = "a\nb\x1b[31m.txt"  # control characters are escaped: the error stays one plain line
    bundle = write_bundle(tmp_path / "nl.tar.gz", [*members, (tarfile.TarInfo(newline), b"x")])
    err = assert_refused(capsys, bundle, keys[1], "a\\nb\\x1b[31m.txt", tmp_path)


def test_manifest_and_signature_sizes_are_checked_before_they_are_read(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    members = signed_members(keys[0], {"a.txt": b"hello"})
    for index, name, limit in ((0, "manifest.json", 16 << 20), (1, "manifest.sig", 4096)):
        body = without_end(tar_bytes(members[:index]))
        claimed = limit + 1
        bad = stream_gzip(tmp_path / f"{name}.tar.gz", iter([body, header(name, claimed), b"\0" * 1024]))
        assert_refused(
            capsys, bad, keys[1], f"{name} is oversized ({claimed} bytes, limit {limit})", tmp_path
        )
    code, _, err = run_cli(capsys, "bundle", "inspect", tmp_path / "manifest.json.tar.gz")
    assert code == 2 and "manifest.json is oversized" in err


def test_member_count_and_total_are_bounded_by_the_signed_manifest(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    public = signing.load_public_key(str(keys[1]))
    files = {f"f{i}.txt": b"x" * 100 for i in range(5)}
    bundle = write_bundle(tmp_path / "five.tar.gz", signed_members(keys[0], files))
    read_bundle(bundle, public)
    with pytest.raises(TrtbuildError, match=r"lists 5 files \(limit 3\)"):
        read_bundle(bundle, public, limits=Limits(members=3))
    with pytest.raises(TrtbuildError, match=r"payload is 500 bytes \(limit 499\)"):
        read_bundle(bundle, public, limits=Limits(total_bytes=499))
    with pytest.raises(TrtbuildError, match=r"'f0.txt' is oversized \(100 bytes > 99\)"):
        read_bundle(bundle, public, limits=Limits(member_bytes=99))


def test_huge_member_counts_stop_at_the_first_member_the_manifest_does_not_allow(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    head = without_end(tar_bytes(signed_members(keys[0], {"a.txt": b"hello"})[:2]))
    empty = header("e", 0) * 100_000  # 51 MB of headers: 100,000 members
    bad = stream_gzip(tmp_path / "many.tar.gz", iter([head, empty, b"\0" * 1024]))
    assert_refused(capsys, bad, keys[1], "'e', which its signed manifest does not list", tmp_path)
    pax = header("././@PaxHeader", 0, tarfile.XHDTYPE) * 100_000
    bad = stream_gzip(tmp_path / "pax.tar.gz", iter([head, pax, b"\0" * 1024]))
    assert_refused(capsys, bad, keys[1], "two PAX headers in a row", tmp_path)
    before = stream_gzip(tmp_path / "first.tar.gz", iter([empty]))
    assert_refused(capsys, before, keys[1], "does not start with manifest.json (found 'e')", tmp_path)


def test_gzip_bomb_claims_are_refused_before_expansion(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # a signed manifest listing 8 GiB in a 2 KB file: deflate cannot expand that far
    big = {"w.bin": FileEntry("0" * 64, 8 << 30)}
    manifest = Manifest("m", "1", "orin-jp6.1", "fp16", {"kind": "jetson"}, {}, big)
    stored = json.dumps(manifest.to_json()).encode()
    members = signed_members(keys[0], {}, stored)
    bad = stream_gzip(tmp_path / "ratio.tar.gz", iter([without_end(tar_bytes(members)), b"\0" * 1024]))
    assert_refused(capsys, bad, keys[1], "more than its", tmp_path)
    # 1 GiB of zeros after the end marker (a 1 MB file): refused after the 1 MiB padding allowance
    members = signed_members(keys[0], {"a.txt": b"hello"})
    padded = stream_gzip(tmp_path / "pad.tar.gz", iter([tar_bytes(members), *repeated(b"\0", 1 << 30)]))
    assert padded.stat().st_size < 2 << 20
    assert_refused(capsys, padded, keys[1], "bytes of padding follow the tar archive", tmp_path)


# ---- the exact end of the archive -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    payload = tmp_path_factory.mktemp("good-payload")
    (payload / "sub").mkdir()
    (payload / "sub" / "w.bin").write_bytes(os.urandom(50_000))
    (payload / "run.sh").write_text("#!/bin/sh\necho run\n")
    (payload / "run.sh").chmod(0o755)
    path, _ = create_bundle(
        payload,
        tmp_path_factory.mktemp("good") / "good.tar.gz",
        signing.load_private_key(str(keys[0])),
        model="m",
        model_version="1",
        target="orin-jp6.1",
        precision="fp16",
        requires={"kind": "jetson", "jetpack": "6.1"},
        io_spec={},
    )
    return path


@pytest.mark.parametrize("cut", range(1, 41))
def test_gzip_truncated_by_a_few_bytes_is_refused(
    tmp_path: Path, good: Path, keys: tuple[Path, Path], cut: int
) -> None:
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(good.read_bytes()[:-cut])
    with pytest.raises(TrtbuildError, match="is truncated or corrupt"):
        read_bundle(bad, signing.load_public_key(str(keys[1])))


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (os.urandom(4096), "data follows the end of the gzip stream"),
        (b"\0" * 4096, "data follows the end of the gzip stream"),
        (gzip.compress(b"second member"), "a second gzip stream follows the first"),
    ],
    ids=["4KiB-garbage", "4KiB-zeros", "second-gzip-member"],
)
def test_data_after_the_gzip_stream_is_refused(
    tmp_path: Path,
    good: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    tail: bytes,
    message: str,
) -> None:
    bad = tmp_path / "tail.tar.gz"
    bad.write_bytes(good.read_bytes() + tail)
    assert_refused(capsys, bad, keys[1], message, tmp_path)


def test_second_gzip_member_with_more_files_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    members = signed_members(keys[0], {"a.txt": b"hello"})
    first = gzip.compress(tar_bytes(members))
    second = gzip.compress(tar_bytes([(tarfile.TarInfo("evil.sh"), b"rm -rf /")]))
    bad = tmp_path / "two.tar.gz"
    bad.write_bytes(first + second)
    assert_refused(capsys, bad, keys[1], "a second gzip stream follows the first", tmp_path)


def test_data_after_the_tar_end_marker_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    members = signed_members(keys[0], {"a.txt": b"hello"})
    smuggled = tar_bytes([(tarfile.TarInfo("evil.sh"), b"rm -rf /")])
    bad = tmp_path / "after-end.tar.gz"
    bad.write_bytes(gzip.compress(tar_bytes(members) + smuggled))
    assert_refused(capsys, bad, keys[1], "data follows the end of the tar archive", tmp_path)


def test_bad_crc_is_refused(tmp_path: Path, good: Path, keys: tuple[Path, Path]) -> None:
    data = bytearray(good.read_bytes())
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    bad = tmp_path / "crc.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(TrtbuildError, match="truncated or corrupt .*incorrect data check"):
        read_bundle(bad, signing.load_public_key(str(keys[1])))


# ---- folder entries ---------------------------------------------------------------------------------------


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        (["evil"], "holds a folder 'evil', which its signed manifest does not list"),
        (["sub/deeper"], "holds a folder 'sub/deeper', which its signed manifest does not list"),
        (["a.txt"], "holds a folder 'a.txt', which its signed manifest lists as a file"),
        (["sub", "sub"], "holds the folder 'sub' twice"),
    ],
)
def test_folder_entries_must_be_folders_of_listed_files(
    tmp_path: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    folders: list[str],
    message: str,
) -> None:
    members = signed_members(keys[0], {"a.txt": b"hello", "sub/b.txt": b"b"})
    bad = write_bundle(
        tmp_path / "dirs.tar.gz", [*members[:2], *((_dir(f), b"") for f in folders), *members[2:]]
    )
    assert_refused(capsys, bad, keys[1], message, tmp_path)


def test_folder_entries_of_listed_files_are_accepted(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    members = signed_members(keys[0], {"a.txt": b"hello", "sub/b.txt": b"b"})
    ok = write_bundle(tmp_path / "ok.tar.gz", [*members[:2], (_dir("sub"), b""), *members[2:]])
    contents = read_bundle(ok, signing.load_public_key(str(keys[1])), tmp_path / "x")
    assert contents.files_checked == 2


# ---- extraction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_extracted_folders_and_files_honour_the_umask(
    tmp_path: Path, good: Path, keys: tuple[Path, Path], mask: int
) -> None:
    old = os.umask(mask)
    try:
        dest = tmp_path / "new" / "deploy"
        verify_bundle(good, signing.load_public_key(str(keys[1])), device="skip", extract_to=dest)
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return p.stat().st_mode & 0o777

    assert mode(dest) == mode(dest / "sub") == mode(tmp_path / "new") == 0o777 & ~mask
    assert mode(dest / "sub" / "w.bin") == 0o666 & ~mask
    assert mode(dest / "run.sh") == 0o777 & ~mask


def test_failed_extract_leaves_no_parent_folders(
    tmp_path: Path, good: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    other = signing.generate_keypair(tmp_path / "other.pem")
    assert_refused(capsys, good, other[1], "bundle was signed by key", tmp_path)
    (tmp_path / "deploy").mkdir()  # an existing parent stays, the ones made for the extract go
    code, _, _ = run_cli(
        capsys, "bundle", "verify", good, "--pub", other[1], "--device", "skip", "--extract",
        tmp_path / "deploy" / "a" / "b" / "c" / "dest",
    )  # fmt: skip
    assert code == 2 and list((tmp_path / "deploy").iterdir()) == []


def test_extract_into_a_file_or_a_full_folder_is_refused(
    tmp_path: Path, good: Path, keys: tuple[Path, Path]
) -> None:
    public = signing.load_public_key(str(keys[1]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrtbuildError, match="exists and is not a folder"):
        verify_bundle(good, public, device="skip", extract_to=tmp_path / "file")
    with pytest.raises(TrtbuildError, match="cannot extract to"):
        verify_bundle(good, public, device="skip", extract_to=tmp_path / "file" / "sub")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(TrtbuildError, match="exists and is not empty"):
        verify_bundle(good, public, device="skip", extract_to=tmp_path / "full")


def test_inspect_reads_only_the_bounded_head(tmp_path: Path, good: Path) -> None:
    doc = read_manifest_unverified(good)
    assert doc["files"]["run.sh"]["size"] == len("#!/bin/sh\necho run\n")
    bad = tmp_path / "nothing.tar.gz"
    bad.write_bytes(gzip.compress(b"\0" * 1024))
    with pytest.raises(TrtbuildError, match="does not start with manifest.json"):
        read_manifest_unverified(bad)


# ---- property: random damage to a real bundle -------------------------------------------------------------


def _mutate(data: bytes, edits: Sequence[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, position, value in edits:
        if not out:
            break
        at = position % len(out)
        if op == "flip":
            out[at] ^= 1 << (value % 8)
        elif op == "set":
            out[at] = value % 256
        elif op == "insert":
            out[at:at] = bytes([value % 256]) * (1 + value % 7)
        elif op == "delete":
            del out[at : at + 1 + value % 64]
        elif op == "truncate":
            del out[at:]
        else:
            out += bytes([value % 256]) * (1 + value % 4000)
    return bytes(out)


edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]),
        st.integers(0, 1 << 30),
        st.integers(0, 1 << 16),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(compressed=edits, decompressed=edits, on_tar=st.booleans())
def test_property_damaged_bundles_verify_exactly_or_are_refused(
    tmp_path_factory: pytest.TempPathFactory,
    good: Path,
    keys: tuple[Path, Path],
    compressed: list[tuple[str, int, int]],
    decompressed: list[tuple[str, int, int]],
    on_tar: bool,
) -> None:
    original = good.read_bytes()
    data = gzip.compress(_mutate(gzip.decompress(original), decompressed)) if on_tar else original
    data = _mutate(data, compressed) if not on_tar else data
    work = tmp_path_factory.mktemp("fuzz")
    bad = work / "b.tar.gz"
    bad.write_bytes(data)
    dest = work / "out"
    try:
        report = verify_bundle(bad, signing.load_public_key(str(keys[1])), device="skip", extract_to=dest)
    except TrtbuildError as exc:
        event(f"refused: {str(exc).split('(')[0][:60]}")
        assert len(str(exc)) < 700 and "\n" not in str(exc)
        assert not dest.exists() and sorted(p.name for p in work.iterdir()) == ["b.tar.gz"]
        return
    event("accepted")
    # accepted: then the compressed bytes carried the same tar (up to the length of its zero padding)
    assert gzip.decompress(data).rstrip(b"\0") == gzip.decompress(original).rstrip(b"\0")
    assert report.files_checked == 2
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "run.sh",
        "sub/w.bin",
    ]
    with pytest.raises(TrtbuildError):  # and the same damage never gets past a stricter limit silently
        read_bundle(bad, signing.load_public_key(str(keys[1])), limits=Limits(member_bytes=10))
