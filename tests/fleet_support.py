"""Test support for the fleet tests: a real OCI registry (Debian's docker-registry, Distribution 2.8)
on 127.0.0.1, and small real bundles built from a tiny ONNX model."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from trtbuild.bundle import signing
from trtbuild.bundle.archive import create_bundle
from trtbuild.fleet.smoke import write_smoke_record

REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")

_CONFIG = """version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""  # no blob descriptor cache: the tests swap blobs on disk and the registry must serve what is there


@dataclass(frozen=True)
class RunningRegistry:
    port: int
    storage: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_registry(workdir: Path) -> Iterator[RunningRegistry]:
    """Start a throwaway registry on a free loopback port; wait until /v2/ answers; stop it afterwards."""
    assert REGISTRY_BIN, "docker-registry is not installed (apt-get install -y docker-registry)"
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(_CONFIG.format(root=storage, port=port))
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((workdir / "registry.log").read_text()) from None
                time.sleep(0.1)
        yield RunningRegistry(port, storage)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def tiny_onnx(path: Path, scale: float = 2.0) -> Path:
    """y = relu(x * scale) on a 1x4 float input: a real graph that onnxruntime runs in a millisecond."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [scale] * 4)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_bundle(
    out: Path,
    key: Path,
    version: str,
    target: str = "orin-jp6.1",
    *,
    break_smoke: bool = False,
    model: str = "tiny",
) -> Path:
    """A real signed bundle: the tiny model, a build.sh and a recorded smoke input/output."""
    folder = out / f"src-{model}-{version}-{target}"
    folder.mkdir(parents=True)
    onnx_path = tiny_onnx(folder / "model.onnx")
    x = np.array([[1.0, -2.0, 3.0, 0.5]], dtype=np.float32)
    write_smoke_record(onnx_path, folder, {"x": x})
    if break_smoke:  # the model shipped differs from the one the record was made with
        tiny_onnx(onnx_path, scale=3.0)
    (folder / "build.sh").write_text("#!/usr/bin/env bash\nset -e\ntrtexec --onnx=model.onnx\n")
    (folder / "build.sh").chmod(0o755)
    path, _ = create_bundle(
        folder,
        out / f"{model}-{version}-{target}-fp16.tar.gz",
        signing.load_private_key(str(key)),
        model=model,
        model_version=version,
        target=target,
        precision="fp16",
        requires={"kind": "jetson", "jetpack": "6.1"},
        io_spec={"inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}]},
        fidelity={"smoke_atol": 1e-5},
    )
    shutil.rmtree(folder)
    return path
