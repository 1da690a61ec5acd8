"""Sign a serving handoff (a Triton model folder, a Jetson + DeepStream folder) as a fleet bundle.

The same archive format, manifest and Ed25519 signature as `trtbuild bundle create`, so `trtbuild bundle
verify` checks these bundles too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from export.meta import graph_inputs, graph_outputs
from trtbuild.bundle.archive import create_bundle
from trtbuild.ship.bundles import bundle_file_name


def sign_folder(
    folder: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    key: Ed25519PrivateKey,
    *,
    model: str,
    model_version: str,
    target: str,
    precision: str,
    requires: Mapping[str, Any],
    graph: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Pack ``folder`` into ``out_dir/<model>-<version>-<target>-<precision>.tar.gz`` (signed, atomic)."""
    proto = onnx.load(str(graph), load_external_data=False)
    io_spec = {
        "inputs": [{"name": v.name} for v in graph_inputs(proto)],
        "outputs": [o.to_json() for o in graph_outputs(proto)],
    }
    path, _ = create_bundle(
        folder,
        Path(out_dir) / bundle_file_name(model, model_version, target, precision),
        key,
        model=model,
        model_version=model_version,
        target=target,
        precision=precision,
        requires=requires,
        io_spec=io_spec,
        extra=extra,
    )
    return path
