"""TUF role keys: Ed25519 PEM files (made by `trtbuild bundle keygen`), wrapped as securesystemslib signers.

Root and targets keys stay offline (used at `fleet init` and `fleet publish`); the online key signs only
snapshot and timestamp, so a stolen online key cannot add or change a release."""

from __future__ import annotations

import os

from securesystemslib.signer import CryptoSigner, SSlibKey

from trtbuild.bundle.signing import load_private_key


def signer(path: str | os.PathLike[str]) -> CryptoSigner:
    return CryptoSigner(load_private_key(str(path)))


def public(sig: CryptoSigner) -> SSlibKey:
    key = sig.public_key
    assert isinstance(key, SSlibKey)
    return key
