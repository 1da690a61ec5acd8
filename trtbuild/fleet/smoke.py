"""The on-device checks before a release goes live: the Jetson engine build (only where TensorRT is) and a
smoke test that runs one recorded input through the bundle's ONNX model and compares with the recorded
output, within the tolerance the bundle's signed fidelity record states."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.bundle.manifest import Manifest
from trtbuild.core.errors import TrtbuildError

SMOKE_DIR = "smoke"
SMOKE_INDEX = "smoke.json"
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
BUILD_TIMEOUT_S = 3600


def _session(model: Path) -> Any:
    """The graph under the semantics it was built for (trtbuild/core/ort.py): a TensorRT Q/DQ graph as
    written. ORT's default fusions turn a Q/DQ Concat into QLinearConcat, which refuses the FP16 scales of a
    strongly typed plan's graph (the session failed: any Q/DQ model with a Concat could not be bundled)."""
    import onnx

    from trtbuild.core import ort as ort_core

    header = onnx.load(str(model), load_external_data=False)
    return ort_core.cpu_session(model, ort_core.semantics_for(header))


def write_smoke_record(onnx_path: Path, folder: Path, inputs: Mapping[str, np.ndarray]) -> Path:
    """Run ``inputs`` through the model with onnxruntime and record both under ``folder/smoke/`` (bundle
    the folder afterwards: the record is then covered by the bundle's signature)."""
    session = _session(onnx_path)
    try:
        outputs = session.run(None, dict(inputs))
    except Exception as exc:  # ORT's InvalidArgument/Fail, e.g. Silero VAD's If on a seeded scalar `sr`
        shown = ", ".join(
            f"{k} {'x'.join(map(str, v.shape)) or 'scalar'} {v.dtype}" for k, v in inputs.items()
        )
        raise TrtbuildError(
            f"the bundle's smoke test cannot run {onnx_path.name} in ONNX Runtime on its seeded input "
            f"({shown}; integers 0..7): {(str(exc).strip().splitlines() or [''])[0][:200]}",
            "bundle a graph that runs on any input of its shapes (fold inputs that must hold particular "
            "values, such as a sample rate, into constants)",
        ) from exc
    names = [o.name for o in session.get_outputs()]
    smoke = folder / SMOKE_DIR
    smoke.mkdir(parents=True, exist_ok=True)
    # resolved: a handoff names its files by absolute path, the bundle's folder can be relative (--out)
    model = onnx_path.resolve().relative_to(folder.resolve()).as_posix()
    index: dict[str, Any] = {"model": model, "inputs": {}, "outputs": {}}
    for kind, items in (("inputs", dict(inputs)), ("outputs", dict(zip(names, outputs, strict=True)))):
        for i, (name, value) in enumerate(items.items()):
            file = f"{kind[:-1]}_{i}.npy"
            np.save(smoke / file, np.asarray(value), allow_pickle=False)
            index[kind][name] = file
    (smoke / SMOKE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return smoke / SMOKE_INDEX


def run_smoke(folder: Path, manifest: Manifest) -> str:
    """Run the recorded input; return what was checked, or raise naming the worst output."""
    index_path = folder / SMOKE_DIR / SMOKE_INDEX
    if not index_path.is_file():
        return "no smoke record in the bundle (not run)"
    fidelity = manifest.fidelity or {}
    atol = float(fidelity.get("smoke_atol", DEFAULT_ATOL))
    rtol = float(fidelity.get("smoke_rtol", DEFAULT_RTOL))
    try:
        index = json.loads(index_path.read_text())
        model = (folder / index["model"]).resolve()
        if folder.resolve() not in model.parents:
            raise ValueError("model path leaves the bundle")
        feeds = {n: np.load(folder / SMOKE_DIR / f, allow_pickle=False) for n, f in index["inputs"].items()}
        want = {n: np.load(folder / SMOKE_DIR / f, allow_pickle=False) for n, f in index["outputs"].items()}
        session = _session(model)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    except Exception as exc:  # any failure to run the model is a failed smoke test
        raise TrtbuildError(
            f"release {manifest.name} failed its smoke test: the model does not run ({str(exc)[:200]})",
            "publish a fixed release",
        ) from exc
    for name, expected in want.items():
        actual = got.get(name)
        if actual is None or actual.shape != expected.shape:
            raise TrtbuildError(
                f"release {manifest.name} failed its smoke test: output '{name}' missing or reshaped",
                "publish a fixed release",
            )
        if not np.allclose(actual, expected, atol=atol, rtol=rtol):
            worst = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            raise TrtbuildError(
                f"release {manifest.name} failed its smoke test: output '{name}' differs by {worst:.3g} "
                f"(allowed atol {atol:g}, rtol {rtol:g})",
                "publish a fixed release",
            )
    return f"{len(want)} output(s) match the recorded run (atol {atol:g}, rtol {rtol:g})"


def tensorrt_present() -> bool:
    from trtbuild.hardware import tensorrt_available

    return shutil.which("trtexec") is not None or tensorrt_available()


def device_step(folder: Path, manifest: Manifest) -> tuple[str, str]:
    """Build the engine on a Jetson with TensorRT; return (state, reason): built, pending or n/a."""
    script = folder / "build.sh"
    if manifest.requires.get("kind") != "jetson" or not script.is_file():
        return "n/a", "no on-device build for this target"
    if not tensorrt_present():
        return "pending", "TensorRT is not present on this device: build.sh not run"
    env = {**os.environ, "TRTBUILD_BUNDLE_DIR": str(folder)}
    try:
        proc = subprocess.run(
            ["bash", str(script)],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return "pending", f"build.sh ran past {BUILD_TIMEOUT_S} s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return "pending", f"build.sh failed (exit {proc.returncode}): {tail[0][:200]}"
    return "built", "build.sh finished"
