"""Ed25519 signing keys (via `cryptography`): generate, load from files or environment, sign, verify.

Environment: ``TRTBUILD_SIGNING_KEY`` (private key PEM text, or a path to it) for `bundle create`, and
``TRTBUILD_VERIFY_KEY`` (public key PEM text, or a path) for `bundle verify`, so CI secrets never touch disk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)

SIGNING_ENV = "TRTBUILD_SIGNING_KEY"
VERIFY_ENV = "TRTBUILD_VERIFY_KEY"
ALGORITHM = "ed25519"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


_KEY_FILE_BYTES = 64 << 10  # a PEM key is a few hundred bytes


def _peek(path: Path) -> bytes | None:
    """The start of an existing file (None if there is none); refuses folders."""
    if path.is_dir():
        raise TrtbuildError(f"{path} is a folder", "give a file path for the key")
    if path.is_symlink() and not path.exists():
        raise TrtbuildError(f"{path} is a broken symbolic link", "remove it or pick another path")
    try:
        with path.open("rb") as fh:
            return fh.read(_KEY_FILE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrtbuildError(
            f"cannot read {path}: {exc.strerror}", "check the path and its permissions"
        ) from exc


def _same_file(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_key_paths(priv: Path, pub: Path, overwrite: bool) -> None:
    """Refuse key paths that would lose a private key: identical or confusable paths, an existing key
    without ``overwrite``, and (even with it) a public-key path that holds a private key."""
    if priv.suffix.lower() == ".pub":
        raise TrtbuildError(
            f"the private key path {priv} ends in .pub, the public key's suffix",
            f"name the private key like {priv.with_suffix('.pem')}",
        )
    if _same_file(priv, pub):
        raise TrtbuildError(
            f"the private and public key paths are the same file ({pub})",
            "give --pub a different path (default: the private key path with .pub)",
        )
    existing = {path: _peek(path) for path in (priv, pub)}
    for path, head in existing.items():
        if head is not None and not overwrite:
            raise TrtbuildError(f"{path} already exists", "pick another path or pass --force")
    pub_head = existing[pub]
    if pub_head is not None and b"PRIVATE KEY-----" in pub_head:
        raise TrtbuildError(
            f"the public key path {pub} holds a private key; --force does not overwrite it with a public one",
            "give --pub another path",
        )
    priv_head = existing[priv]
    if priv_head and b"-----BEGIN" not in priv_head:
        raise TrtbuildError(
            f"{priv} exists and is not a PEM key file; --force only replaces keys", "pick another path"
        )


def generate_keypair(
    private_path: str | os.PathLike[str],
    public_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) and its public key (PEM), as one unit.

    Both are staged beside their targets, then renamed into place, the public key first: on any failure
    neither file changes, and an existing private key is replaced only with ``overwrite``."""
    priv = Path(private_path)
    pub = Path(public_path) if public_path else priv.with_suffix(".pub")
    check_key_paths(priv, pub, overwrite)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # mkstemp creates the staged private key 0600, and it stays 0600 until and after the rename
        with atomic.atomic_paths([pub, priv], overwrite=overwrite, modes=[None, 0o600]) as (
            tmp_pub,
            tmp_priv,
        ):
            for tmp, data in ((tmp_pub, public_pem), (tmp_priv, pem)):
                with tmp.open("r+b") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
    except FileExistsError as exc:
        raise TrtbuildError(
            f"{exc.filename2 or priv} appeared while the keys were written",
            "pick another path or pass --force",
        ) from exc
    except OSError as exc:
        where = exc.filename or priv.parent
        raise TrtbuildError(
            f"cannot write the key pair: {where}: {exc.strerror}; neither key file was changed",
            "pick a writable folder for both keys",
        ) from exc
    return priv, pub


def readable_by_others(path: Path) -> int | None:
    """The file's mode if group or others may read or write it, else None."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    return mode if mode & 0o077 else None


def _key_path(source: str | os.PathLike[str] | None, env: str) -> Path | None:
    text = str(source if source is not None else os.environ.get(env) or "")
    return Path(text) if text and "-----BEGIN" not in text else None


def _key_text(source: str | os.PathLike[str] | None, env: str, what: str) -> bytes:
    if source is None:
        source = os.environ.get(env)
        if not source:
            raise TrtbuildError(f"no {what} given", f"pass --key FILE or set {env}")
    text = str(source)
    if "-----BEGIN" in text:
        return text.encode()
    try:
        with Path(text).open("rb") as fh:
            data = fh.read(_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise TrtbuildError(
            f"cannot read {what} {text}: {exc.strerror}", "pass an existing key file"
        ) from exc
    if len(data) > _KEY_FILE_BYTES:
        raise TrtbuildError(f"{what} {text} is larger than a key file", "pass the PEM key file")
    return data


def load_private_key(source: str | os.PathLike[str] | None = None) -> Ed25519PrivateKey:
    data = _key_text(source, SIGNING_ENV, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TrtbuildError(
            f"signing key is not an unencrypted PEM private key ({exc})",
            "create one with `trtbuild bundle keygen`",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise TrtbuildError("signing key is not an Ed25519 key", "create one with `trtbuild bundle keygen`")
    path = _key_path(source, SIGNING_ENV)
    mode = readable_by_others(path) if path is not None else None
    if mode is not None:
        log.warning(
            f"private key {path} is readable by group/others (mode {mode:04o}): run `chmod 600 {path}`"
        )
    return key


def load_public_key(source: str | os.PathLike[str] | None = None) -> Ed25519PublicKey:
    data = _key_text(source, VERIFY_ENV, "verification key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key also holds the public one
            return load_private_key(data.decode()).public_key()
        except TrtbuildError:
            raise TrtbuildError(
                "verification key is not a PEM public key",
                "pass the .pub file written by `trtbuild bundle keygen`",
            ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise TrtbuildError(
            "verification key is not an Ed25519 key", "pass the .pub file written by `trtbuild bundle keygen`"
        )
    return key


SIGNED = "manifest.json"  # the signature covers this member's exact bytes
MAX_SIGNATURE_BYTES = 4096
_SIGNATURE_KEYS = frozenset({"algorithm", "key_id", "signed", "signature"})


def signature_document(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The ``manifest.sig`` document: an Ed25519 signature over ``message``, the exact bytes stored as
    ``manifest.json``."""
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signed": SIGNED,
        "signature": base64.b64encode(key.sign(message)).decode(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def _malformed_signature(why: str) -> TrtbuildError:
    return TrtbuildError(f"bundle signature file is malformed ({why})", "rebuild the bundle")


def check_signature(public: Ed25519PublicKey, signature_doc: bytes, message: bytes) -> str:
    """Verify the signature over ``message`` (the stored manifest bytes); return the key id. Raises
    TrtbuildError naming why not. Only the small signature document is parsed, with limits."""
    from trtbuild.bundle.manifest import parse_json, shown

    doc = parse_json(signature_doc, "bundle signature file", max_bytes=MAX_SIGNATURE_BYTES, max_depth=1)
    if not isinstance(doc, dict):
        raise _malformed_signature("not a JSON object")
    if "signed" not in doc and {"algorithm", "signature"} <= set(doc):
        raise TrtbuildError(
            "bundle was signed by an older trtbuild (over re-serialised JSON, not the manifest's bytes)",
            "re-create it with `trtbuild bundle create`",
        )
    if set(doc) != _SIGNATURE_KEYS or not all(isinstance(doc[k], str) for k in _SIGNATURE_KEYS):
        raise _malformed_signature(f"it must hold the text fields {', '.join(sorted(_SIGNATURE_KEYS))}")
    algorithm, signer = doc["algorithm"], doc["key_id"]
    if algorithm != ALGORITHM:
        raise TrtbuildError(
            f"bundle is signed with '{shown(algorithm, 40)}', expected {ALGORITHM}", "rebuild the bundle"
        )
    if not (len(signer) == 16 and all(c in "0123456789abcdef" for c in signer)):
        raise _malformed_signature("the key id is not 16 lowercase hex digits")
    if doc["signed"] != SIGNED:
        raise _malformed_signature(f"it signs '{shown(doc['signed'], 40)}', not {SIGNED}")
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, binascii.Error):
        raise _malformed_signature("the signature is not base64") from None
    if base64.b64encode(sig).decode() != doc["signature"]:
        # the last character's unused bits decode either way ("...Ch==" and "...Cg==" are one signature):
        # only the canonical text is accepted, so a changed signature document never verifies
        raise _malformed_signature("the signature is not canonical base64")
    if len(sig) != 64:
        raise _malformed_signature(f"an Ed25519 signature is 64 bytes, this one {len(sig)}")
    try:
        public.verify(sig, message)
    except InvalidSignature:
        if signer != key_id(public):
            raise TrtbuildError(
                f"bundle was signed by key {shown(signer, 40)}, not by the given key {key_id(public)}",
                "verify with the publisher's public key",
            ) from None
        raise TrtbuildError(
            "bundle signature does not match its manifest (manifest altered)",
            "do not deploy this bundle; fetch it again from the publisher",
        ) from None
    return key_id(public)  # the key that verified (the document's key id is only a hint for messages)
