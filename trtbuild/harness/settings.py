"""Every choice of one `profile` run, with its default: the one place those defaults live.

`trtbuild profile` fills it from its flags (flag ``--foo-bar`` is field ``foo_bar``); the Python API takes it
as ``profile_models(paths, settings)`` or as keyword overrides. Invalid choices are refused when the
settings are made, before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.settings import with_overrides
from trtbuild.harness.cuda_backend import BACKENDS

RUNTIMES = ("auto", "ort", "torch", "trt")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ProfileSettings:
    """How to time and compare models. See :func:`trtbuild.harness.profile.profile_models`."""

    runtime: str = "auto"  # by suffix: .onnx ort, .engine/.plan trt, .pt/.pt2 torch; or forced
    batches: tuple[int, ...] = (1,)
    iterations: int = 100  # at least this many timed runs
    warmup_s: float = 0.5
    duration_s: float = 0.0  # and at least this long
    max_s: float | None = 120.0  # stop one model after this long
    threads: int | None = None  # CPU threads for ONNX Runtime / torch; None: all
    device: str = "cpu"  # where ort/torch run; engines always run on CUDA
    cuda_backend: str = "cuda-python"
    cuda_graph: bool = False
    data: str | Path | None = None  # .npy/.npz inputs; None: photos for image inputs, else seeded random
    baseline: str | Path | None = None  # the reference for ratios and accuracy; None: the first model
    accuracy: bool = True
    accuracy_samples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        batches = (self.batches,) if isinstance(self.batches, int) else tuple(self.batches)
        object.__setattr__(self, "batches", batches)
        if self.runtime not in RUNTIMES:
            raise TrtbuildError(f"unknown runtime '{self.runtime}'", f"choose one of: {', '.join(RUNTIMES)}")
        if not batches or any(b < 1 for b in batches):
            raise TrtbuildError(
                f"batch sizes must be positive, got {list(batches)}", "pass --batch 1 (or larger)"
            )
        if self.iterations < 1 or self.warmup_s < 0 or self.duration_s < 0:
            raise TrtbuildError(
                "iterations must be >= 1 and times >= 0", "fix --iterations / --warmup-s / --duration-s"
            )
        if self.threads is not None and self.threads < 1:
            raise TrtbuildError(
                f"--threads {self.threads} is not positive", "pass --threads 1 or more, or leave it out"
            )
        if self.accuracy and self.accuracy_samples < 1:
            raise TrtbuildError(
                "accuracy needs at least one sample", "pass --accuracy-samples 1 or more, or --no-accuracy"
            )
        if self.device not in DEVICES:
            raise TrtbuildError(f"unknown device '{self.device}'", "use cpu or cuda")
        if self.cuda_backend not in BACKENDS:
            raise TrtbuildError(
                f"unknown CUDA backend '{self.cuda_backend}'", f"choose one of: {', '.join(BACKENDS)}"
            )

    @classmethod
    def from_overrides(cls, base: ProfileSettings | None, overrides: Mapping[str, Any]) -> ProfileSettings:
        """``base`` (or the defaults) with ``overrides`` applied; an unknown name is a programming error."""
        return with_overrides(cls, base, overrides, "profile")

    def to_json(self) -> dict[str, Any]:
        """The settings as the report records them."""
        return {
            "runtime": self.runtime,
            "batches": list(self.batches),
            "iterations": self.iterations,
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "threads": self.threads,
            "device": self.device,
            "cuda_backend": self.cuda_backend,
            "cuda_graph": self.cuda_graph,
            "data": str(self.data) if self.data else "photos for image inputs, else seeded random",
            "seed": self.seed,
            "accuracy_samples": self.accuracy_samples if self.accuracy else 0,
        }
