"""Signed fleet bundles: one archive per model x target x precision, a schema-versioned manifest with the
sha256 of every file, an Ed25519 signature over the canonical manifest bytes, and safe extraction."""

from trtbuild.bundle.archive import create_bundle, read_bundle
from trtbuild.bundle.manifest import SCHEMA_VERSION, Manifest
from trtbuild.bundle.signing import generate_keypair, load_private_key, load_public_key
from trtbuild.bundle.verify import VerifyReport, verify_bundle

__all__ = [
    "SCHEMA_VERSION",
    "Manifest",
    "VerifyReport",
    "create_bundle",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "read_bundle",
    "verify_bundle",
]
