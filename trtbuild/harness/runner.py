"""One runner interface for every runtime (Polygraphy-style activate / infer / deactivate), plus a timed
iteration that reports where the time went: H2D / compute / D2H for GPU runners, host time for CPU ones."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class RunnerTensor:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]  # str / None marks a dynamic dimension


@dataclass(frozen=True)
class IterationTiming:
    """One timed iteration, in milliseconds. ``total_ms`` is the latency a caller sees.

    GPU runners fill ``h2d_ms``/``compute_ms``/``d2h_ms`` from CUDA events on their stream and ``total_ms``
    is the event span from the first copy in to the last copy out (trtexec's "latency"); ``host_ms`` is the
    host clock around the same work (adds launch overhead). CPU runners leave the split None and
    ``total_ms`` is host time (perf_counter_ns) around the runtime call.
    """

    total_ms: float
    h2d_ms: float | None = None
    compute_ms: float | None = None
    d2h_ms: float | None = None
    host_ms: float | None = None


class Runner(abc.ABC):
    """Load in ``activate``, run in ``infer`` / ``timed_iteration``, free in ``deactivate``."""

    runtime: str = "?"
    device: str = "cpu"  # "cpu" or "cuda"
    min_warmup: int = 3  # iterations before timing counts, whatever the warm-up time says

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False

    @abc.abstractmethod
    def activate(self) -> None: ...

    @abc.abstractmethod
    def input_info(self) -> list[RunnerTensor]: ...

    @abc.abstractmethod
    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run once and return the outputs as host numpy arrays."""

    @abc.abstractmethod
    def timed_iteration(self, feed: Feed) -> IterationTiming:
        """Run once (same work as ``infer``) and time it; outputs are not returned."""

    @abc.abstractmethod
    def deactivate(self) -> None: ...

    def device_memory_bytes(self) -> int | None:
        """Device memory this runner holds (GPU runners); None for CPU runners."""
        return None

    def __enter__(self) -> Runner:
        self.activate()
        self.is_active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deactivate()
        self.is_active = False
