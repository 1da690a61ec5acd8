"""The `<engine>.json` sidecar: what an engine is, what built it, and from which plan and model.

An engine file alone says nothing a user can read; the sidecar is what `trtbuild inspect`, profiling and
bundling rely on to check that an engine matches the device and TensorRT it is about to run on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trtbuild import __version__
from trtbuild.core.atomic import write_text
from trtbuild.core.errors import TrtbuildError

SIDECAR_SUFFIX = ".json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    mode: str  # "input" | "output"
    shape: tuple[int, ...]  # -1 marks a dynamic dimension
    dtype: str


@dataclass(frozen=True)
class EngineMeta:
    trt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    tensors: tuple[TensorInfo, ...]
    onnx: str
    onnx_sha256: str
    plan: dict[str, Any]
    build_seconds: float
    engine_bytes: int
    device_memory_bytes: int
    num_layers: int
    trtbuild_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tensors"] = [{**asdict(t), "shape": list(t.shape)} for t in self.tensors]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineMeta:
        values = dict(data)
        values["tensors"] = tuple(
            TensorInfo(str(t["name"]), str(t["mode"]), tuple(t["shape"]), str(t["dtype"]))
            for t in data["tensors"]
        )
        return cls(**values)


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """`engines/m/h100-fp16-trt10.13.engine` -> `engines/m/h100-fp16-trt10.13.engine.json`."""
    path = Path(engine_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_meta(meta: EngineMeta, engine_path: str | os.PathLike[str]) -> Path:
    return write_text(sidecar_path(engine_path), json.dumps(meta.to_json(), indent=2) + "\n")


def load_meta(engine_path: str | os.PathLike[str]) -> EngineMeta:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise TrtbuildError(
            f"engine '{engine_path}' has no sidecar ({path.name})",
            "build it with `trtbuild build` so the sidecar is written next to it",
        )
    try:
        return EngineMeta.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise TrtbuildError(
            f"engine sidecar '{path}' is unreadable ({type(exc).__name__}: {exc})",
            "rebuild the engine with `trtbuild build`",
        ) from exc
