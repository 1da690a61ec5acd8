"""Ed25519 signing keys (via `cryptography`): generate, load from files or environment, sign, verify.

Environment: ``TRTBUILD_SIGNING_KEY`` (private key PEM text, or a path to it) for `bundle create`, and
``TRTBUILD_VERIFY_KEY`` (public key PEM text, or a path) for `bundle verify`, so CI secrets never touch disk.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trtbuild import atomic
from trtbuild.errors import TrtbuildError

SIGNING_ENV = "TRTBUILD_SIGNING_KEY"
VERIFY_ENV = "TRTBUILD_VERIFY_KEY"
ALGORITHM = "ed25519"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(
    private_path: str | os.PathLike[str],
    public_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) and its public key (PEM)."""
    priv = Path(private_path)
    pub = Path(public_path) if public_path else priv.with_suffix(".pub")
    for path in (priv, pub):
        if path.exists() and not overwrite:
            raise TrtbuildError(f"{path} already exists", "pick another path or pass --force")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_secret(priv, pem)
    atomic.write_bytes(
        pub,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return priv, pub


def _write_secret(path: Path, data: bytes) -> None:
    """Atomic, and 0600 from creation to rename (trtbuild.atomic widens modes to the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _key_text(source: str | os.PathLike[str] | None, env: str, what: str) -> bytes:
    if source is None:
        source = os.environ.get(env)
        if not source:
            raise TrtbuildError(f"no {what} given", f"pass --key FILE or set {env}")
    text = str(source)
    if "-----BEGIN" in text:
        return text.encode()
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise TrtbuildError(
            f"cannot read {what} {text}: {exc.strerror}", "pass an existing key file"
        ) from exc


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


def signature_document(key: Ed25519PrivateKey, message: bytes) -> bytes:
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(message)).decode(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def check_signature(public: Ed25519PublicKey, signature_doc: bytes, message: bytes) -> str:
    """Verify; return the key id. Raises TrtbuildError naming why not."""
    try:
        doc: Any = json.loads(signature_doc.decode("utf-8"))
        sig = base64.b64decode(doc["signature"], validate=True)
        algorithm, signer = doc["algorithm"], str(doc.get("key_id", "?"))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise TrtbuildError("bundle signature file is malformed", "rebuild the bundle") from exc
    if algorithm != ALGORITHM:
        raise TrtbuildError(
            f"bundle is signed with '{algorithm}', expected {ALGORITHM}", "rebuild the bundle"
        )
    try:
        public.verify(sig, message)
    except InvalidSignature:
        if signer != key_id(public):
            raise TrtbuildError(
                f"bundle was signed by key {signer}, not by the given key {key_id(public)}",
                "verify with the publisher's public key",
            ) from None
        raise TrtbuildError(
            "bundle signature does not match its manifest (manifest altered)",
            "do not deploy this bundle; fetch it again from the publisher",
        ) from None
    return signer
