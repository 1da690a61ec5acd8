"""Crafted manifests and signature files (issue #14, family 3).

Untrusted JSON is parsed with limits checked before ``json.loads`` (size, nesting depth), finite numbers
only, no duplicate keys, then a schema. The signature covers the exact bytes of ``manifest.json``, so
formatting tricks (a duplicated key before the real one) cannot ride along with a valid signature.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trtbuild.bundle import signing
from trtbuild.bundle.archive import create_bundle, read_bundle
from trtbuild.bundle.manifest import (
    MAX_JSON_DEPTH,
    FileEntry,
    Manifest,
    canonical_bytes,
    json_depth,
    parse_json,
    parse_manifest_bytes,
)
from trtbuild.cli import main
from trtbuild.core.errors import TrtbuildError

FILES = {"a.txt": b"hello", "sub/b.bin": b"\x00\x01"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path_factory.mktemp("manifest-keys") / "fleet.pem")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def document(**changes: Any) -> dict[str, Any]:
    doc = Manifest(
        "m",
        "1",
        "orin-jp6.1",
        "fp16",
        {"kind": "jetson", "jetpack": "6.1"},
        {"inputs": []},
        {p: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for p, d in FILES.items()},
    ).to_json()
    doc.update(changes)
    return doc


def bundle(
    path: Path,
    key: Path | None,
    stored: bytes,
    signature: bytes | None = None,
    files: dict[str, bytes] = FILES,
) -> Path:
    """A bundle storing ``stored`` as manifest.json, signed over those exact bytes with ``key``."""
    if signature is None:
        assert key is not None
        signature = signing.signature_document(signing.load_private_key(str(key)), stored)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("manifest.json", stored), ("manifest.sig", signature), *files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def refused(capsys: pytest.CaptureFixture[str], path: Path, pub: Path, message: str) -> str:
    for command in (["verify", path, "--pub", pub, "--device", "skip"], ["inspect", path]):
        code, out, err = run_cli(capsys, "bundle", *command)
        if command[0] == "inspect" and code == 0:
            continue  # inspect does not check signatures: only parse/schema failures apply to it
        assert code == 2, (command, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and len(err) < 700, err
        if command[0] == "verify":
            assert message in err, err
    return err


# ---- numbers, depth, duplicates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ("NaN", "non-finite number NaN"),
        ("Infinity", "non-finite number Infinity"),
        ("-Infinity", "non-finite number -Infinity"),
        ("1e999", "number 1e999 is out of range"),
        ("-1e400", "out of range"),
        ("1" * 5000, "is not valid JSON"),
    ],
)
def test_non_finite_and_huge_numbers_are_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str], literal: str, message: str
) -> None:
    stored = json.dumps(document(fidelity={"top1": 0.5})).replace("0.5", literal).encode()
    refused(capsys, bundle(tmp_path / "n.tar.gz", keys[0], stored), keys[1], message)


def test_deep_manifest_is_refused_before_parsing(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    stored = json.dumps(document(extra={"x": None})).replace("null", deep.decode()).encode()
    # by an attacker (no key): the signature over the exact bytes fails, nothing is parsed
    forged = signing.signature_document(signing.load_private_key(str(keys[0])), b"something else")
    refused(capsys, bundle(tmp_path / "a.tar.gz", None, stored, forged), keys[1], "signature does not match")
    # by the key holder (a bug or a stolen key): the depth limit, not a RecursionError
    err = refused(capsys, bundle(tmp_path / "d.tar.gz", keys[0], stored), keys[1], "nests 200002 levels")
    assert f"(limit {MAX_JSON_DEPTH})" in err
    code, _, err = run_cli(capsys, "bundle", "inspect", tmp_path / "d.tar.gz")
    assert code == 2 and "nests 200002 levels deep" in err


def test_deep_signature_file_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    stored = json.dumps(document()).encode()
    huge = ("[" * 200_000 + "]" * 200_000).encode()
    message = "manifest.sig is oversized (400000 bytes, limit 4096)"
    refused(capsys, bundle(tmp_path / "h.tar.gz", None, stored, huge), keys[1], message)
    small = ("[" * 2000 + "]" * 2000).encode()
    refused(
        capsys,
        bundle(tmp_path / "s.tar.gz", None, stored, small),
        keys[1],
        "nests 2000 levels deep (limit 1)",
    )


def test_duplicated_target_before_the_real_one_does_not_verify(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the signature covered re-serialised JSON, in which the last duplicate wins, so a
    '"target": "evil"' inserted before the real key kept a valid signature."""
    stored = json.dumps(document()).encode()
    good = bundle(tmp_path / "good.tar.gz", keys[0], stored)
    read_bundle(good, signing.load_public_key(str(keys[1])))
    with tarfile.open(good, "r:gz") as tar:
        signature = tar.extractfile("manifest.sig").read()  # type: ignore[union-attr]
    tampered = stored.replace(b"{", b'{"target": "h100", ', 1)
    refused(
        capsys,
        bundle(tmp_path / "dup.tar.gz", None, tampered, signature),
        keys[1],
        "signature does not match",
    )
    # and a signer that writes duplicate keys is refused too
    refused(capsys, bundle(tmp_path / "dup2.tar.gz", keys[0], tampered), keys[1], "duplicate key 'target'")


def test_signature_covers_the_exact_stored_bytes(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    payload = tmp_path / "p"
    payload.mkdir()
    (payload / "a.txt").write_bytes(b"hello")
    path, _ = create_bundle(
        payload,
        tmp_path / "b.tar.gz",
        signing.load_private_key(str(keys[0])),
        model="m",
        model_version="1",
        target="orin-jp6.1",
        precision="fp16",
        requires={"kind": "jetson"},
        io_spec={},
    )
    with tarfile.open(path, "r:gz") as tar:
        stored = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        sig = json.loads(tar.extractfile("manifest.sig").read())  # type: ignore[union-attr]
    assert sig["signed"] == "manifest.json"
    public = signing.load_public_key(str(keys[1]))
    public.verify(base64.b64decode(sig["signature"]), stored)  # raises if not over the stored bytes
    reformatted = json.dumps(json.loads(stored)).encode()  # same document, other whitespace
    assert reformatted != stored
    with pytest.raises(TrtbuildError, match="signature does not match"):
        signing.check_signature(public, json.dumps(sig).encode(), reformatted)


def test_signature_of_an_older_trtbuild_is_named(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    doc = document()
    key = signing.load_private_key(str(keys[0]))
    old = {
        "algorithm": "ed25519",
        "key_id": signing.key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(canonical_bytes(doc))).decode(),
    }
    path = bundle(tmp_path / "old.tar.gz", None, json.dumps(doc).encode(), json.dumps(old).encode())
    refused(capsys, path, keys[1], "signed by an older trtbuild")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("signature"), "must hold the text fields"),
        (lambda d: d.update(extra="x"), "must hold the text fields"),
        (lambda d: d.update(signature=5), "must hold the text fields"),
        (lambda d: d.update(signature="!!not base64!!"), "not base64"),
        (lambda d: d.update(signature=base64.b64encode(b"short").decode()), "64 bytes, this one 5"),
        (lambda d: d.update(algorithm="rsa"), "signed with 'rsa', expected ed25519"),
        (lambda d: d.update(signed="something.json"), "signs 'something.json'"),
    ],
)
def test_malformed_signature_files_are_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    stored = json.dumps(document()).encode()
    sig = json.loads(signing.signature_document(signing.load_private_key(str(keys[0])), stored))
    change(sig)
    refused(capsys, bundle(tmp_path / "s.tar.gz", None, stored, json.dumps(sig).encode()), keys[1], message)


# ---- schema ----------------------------------------------------------------------------------------------


SHA = hashlib.sha256(b"hello").hexdigest()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": ["m", "1"]}, "'model' is not a JSON object"),
        ({"model": {"name": "m"}}, "must hold exactly 'name' and 'version'"),
        ({"model": {"name": "m" * 10_000, "version": "1"}}, "longer than 200 characters"),
        ({"target": "orin\x1b[2J"}, "holds control characters"),
        ({"target": 5}, "'target' is not a string"),
        ({"requires": []}, "'requires' is not a JSON object"),
        ({"schema": True}, "no integer schema version"),
        ({"schema": "1"}, "no integer schema version"),
        ({"schema": 0}, "no integer schema version"),
        ({"surprise": 1}, "unknown field 'surprise'"),
        ({"files": {"a.txt": {"sha256": SHA, "size": "5"}}}, "non-negative integer size"),
        ({"files": {"a.txt": {"sha256": SHA, "size": -1}}}, "non-negative integer size"),
        ({"files": {"a.txt": {"sha256": SHA, "size": True}}}, "non-negative integer size"),
        ({"files": {"a.txt": {"sha256": SHA.upper(), "size": 5}}}, "lowercase hex sha256"),
        ({"files": {"a.txt": {"sha256": SHA, "size": 5, "mode": 511}}}, "exactly 'sha256' and 'size'"),
        ({"files": {"../x": {"sha256": SHA, "size": 5}}}, "escapes the bundle"),
        ({"files": {"/etc/x": {"sha256": SHA, "size": 5}}}, "is an absolute path"),
        ({"files": {"a\\b": {"sha256": SHA, "size": 5}}}, "not a plain relative path"),
        ({"files": {"a//b": {"sha256": SHA, "size": 5}}}, "not a plain relative path"),
        ({"files": {"./a": {"sha256": SHA, "size": 5}}}, "not a plain relative path"),
        ({"files": {"a\nb": {"sha256": SHA, "size": 5}}}, "not a plain relative path"),
        ({"files": {"manifest.json": {"sha256": SHA, "size": 5}}}, "lists its own manifest.json"),
        ({"files": {"x" * 300: {"sha256": SHA, "size": 5}}}, "longer than 255 bytes"),
        ({"files": {"/".join(["d"] * 2100): {"sha256": SHA, "size": 5}}}, "(limit 4096)"),
        (
            {"files": {"A.txt": {"sha256": SHA, "size": 5}, "a.txt": {"sha256": SHA, "size": 5}}},
            "differ only in case",
        ),
        (
            {"files": {"a": {"sha256": SHA, "size": 5}, "a/b": {"sha256": SHA, "size": 5}}},
            "as a file and as the folder of",
        ),
    ],
)
def test_schema_violations_are_refused(
    tmp_path: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    message: str,
) -> None:
    stored = json.dumps(document(**changes)).encode()
    refused(capsys, bundle(tmp_path / "s.tar.gz", keys[0], stored), keys[1], message)
    code, _, err = run_cli(capsys, "bundle", "inspect", tmp_path / "s.tar.gz")
    assert code == 2 and message in err


def test_inspect_shows_untrusted_text_literally(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    stored = json.dumps(document(model={"name": "[bold green]VERIFIED[/]", "version": "1"})).encode()
    code, out, _ = run_cli(capsys, "bundle", "inspect", bundle(tmp_path / "m.tar.gz", keys[0], stored))
    assert code == 0 and "[bold green]VERIFIED[/]" in out


def test_reports_given_to_bundle_create_are_parsed_with_limits(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    for name, text, message in (
        ("deep.json", "[" * 200_000 + "]" * 200_000, "nests 200000 levels deep"),
        ("nan.json", '{"top1": NaN}', "non-finite number NaN"),
        ("dup.json", '{"a": 1, "a": 2}', "duplicate key 'a'"),
    ):
        (tmp_path / name).write_text(text)
        code, _, err = run_cli(
            capsys, "bundle", "create", "--model", tmp_path / "m.onnx", "--target", "orin-jp6.1",
            "--precision", "fp16", "--key", keys[0], "--out", tmp_path / "out", "--fidelity", tmp_path / name,
        )  # fmt: skip
        assert code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1


# ---- properties ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='[]{}"\\ab\n\x00é', max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), children, max_size=4),
    max_leaves=40,
)  # fmt: skip


def reference_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


@settings(max_examples=300, deadline=None)
@given(value=json_values, ascii_only=st.booleans(), chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]))
def test_property_json_depth_is_exact_for_valid_json(value: Any, ascii_only: bool, chunk: int) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert json_depth(text.encode(), chunk) == reference_depth(text)


json_like = st.lists(
    st.sampled_from(['[', ']', '{', '}', '"', '\\', ':', ',', 'NaN', 'Infinity', '-', '1e999', '0', '1.5',
                     'true', 'null', '"k"', ' ', '\\"', '\x00', '\ud800', 'é', '"a":1']),
    max_size=200,
).map("".join)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(text=json_like, nest=st.integers(0, 3000), raw=st.binary(max_size=64), use_raw=st.booleans())
def test_property_parse_json_returns_or_refuses(text: str, nest: int, raw: bytes, use_raw: bool) -> None:
    data = raw if use_raw else ("[" * nest + text + "]" * nest).encode("utf-8", "surrogatepass")
    try:
        value = parse_json(data, "input")
    except TrtbuildError as exc:
        event(f"refused: {re.sub('[0-9]+', 'N', str(exc).split('(')[0])[:40]}")
        assert "\n" not in str(exc) and len(str(exc)) < 700
        return
    event("parsed")
    assert json_depth(data) <= MAX_JSON_DEPTH
    assert json.loads(json.dumps(value, allow_nan=False)) == value  # finite, serialisable


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(["model", "target", "precision", "requires", "io", "fidelity", "profile", "extra",
                         "files", "schema", "created", "trtbuild"]),
    value=json_values,
    path=st.text(max_size=12),
)  # fmt: skip
def test_property_manifest_schema_returns_or_refuses(key: str, value: Any, path: str) -> None:
    doc = document(**{key: value})
    doc["files"] = doc["files"] if key != "files" else {path: value}
    stored = json.dumps(doc).encode()
    try:
        parsed, manifest = parse_manifest_bytes(stored)
    except TrtbuildError as exc:
        event(f"refused: {str(exc)[:40]}")
        assert "\n" not in str(exc)
        return
    event("accepted")
    assert isinstance(manifest.target, str) and all(isinstance(e.size, int) for e in manifest.files.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    position=st.integers(0, 10_000),
    byte=st.integers(0, 255),
    which=st.sampled_from(["manifest", "signature"]),
)
def test_property_any_changed_byte_breaks_the_signature(
    keys: tuple[Path, Path], position: int, byte: int, which: str
) -> None:
    stored = json.dumps(document()).encode()
    signature = signing.signature_document(signing.load_private_key(str(keys[0])), stored)
    target = bytearray(stored if which == "manifest" else signature)
    at = position % len(target)
    if target[at] == byte:
        return
    target[at] = byte
    message, sig = (bytes(target), signature) if which == "manifest" else (stored, bytes(target))
    public = signing.load_public_key(str(keys[1]))
    try:
        signing.check_signature(public, sig, message)
    except TrtbuildError:
        return
    # only a change the signature's JSON does not see (whitespace) or its key id hint (another hex digit,
    # never reported: the report names the key that verified) may pass
    assert which == "signature"
    changed, original = json.loads(sig), json.loads(signature)
    assert {k: v for k, v in changed.items() if k != "key_id"} == {
        k: v for k, v in original.items() if k != "key_id"
    }


def test_a_non_canonical_base64_signature_is_refused(keys: tuple[Path, Path]) -> None:
    """An Ed25519 signature is 64 bytes: 86 base64 characters and '=='; the last character carries 4 unused
    bits, so 16 texts decode to the same signature. Only the canonical one verifies (the property above
    found "...Ch==" passing for "...Cg==")."""
    import base64

    stored = json.dumps(document()).encode()
    signature = signing.signature_document(signing.load_private_key(str(keys[0])), stored)
    doc = json.loads(signature)
    text = doc["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(text[-3])
    twin = alphabet[last ^ 1]  # flips an unused bit: the same 64 bytes
    altered = {**doc, "signature": text[:-3] + twin + "=="}
    assert base64.b64decode(altered["signature"]) == base64.b64decode(text)
    public = signing.load_public_key(str(keys[1]))
    signing.check_signature(public, signature, stored)
    with pytest.raises(TrtbuildError, match="not canonical base64"):
        signing.check_signature(public, json.dumps(altered).encode(), stored)
