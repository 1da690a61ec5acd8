"""Measurement loop: warm up by time, then run at least N iterations and at least D seconds (trtexec's
--iterations / --duration semantics), recording each iteration's timing and the peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from trtbuild.harness.memory import PeakRssTracker
from trtbuild.harness.runner import Feed, IterationTiming, Runner
from trtbuild.harness.stats import LatencyStats, latency_stats


@dataclass
class Measurement:
    timings: list[IterationTiming]
    batch: int
    warmup_iterations: int
    warmup_s: float
    wall_s: float
    peak_host_bytes: int | None = None
    device_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)

    def latencies_ms(self) -> np.ndarray:
        return np.array([t.total_ms for t in self.timings])

    def stats(self) -> LatencyStats:
        return latency_stats(self.latencies_ms(), self.batch)

    def split_stats(self) -> dict[str, LatencyStats]:
        """Per-phase stats (h2d / compute / d2h / host) where the runner measured them."""
        out = {}
        for phase in ("h2d_ms", "compute_ms", "d2h_ms", "host_ms"):
            values = [getattr(t, phase) for t in self.timings]
            if all(v is not None for v in values):
                out[phase.removesuffix("_ms")] = latency_stats(values, self.batch)
        return out


def measure(
    runner: Runner,
    feed: Feed,
    *,
    batch: int = 1,
    warmup_s: float = 0.5,
    iterations: int = 100,
    duration_s: float = 0.0,
    max_s: float | None = None,
    on_iteration: Callable[[int], None] | None = None,
    memory: PeakRssTracker | None = None,
    min_warmup: int = 3,
) -> Measurement:
    """Time ``runner`` (already active) on ``feed``.

    Warm-up runs for ``warmup_s`` and at least ``min_warmup`` iterations (or the runner's own minimum:
    TorchScript's profiling executor and cuDNN autotuning only settle after a few calls). Measurement
    runs until both ``iterations`` and ``duration_s`` are reached, or ``max_s`` passes (a guard for slow
    models; noted in warnings).
    ``on_iteration(i)`` is called after each measured iteration (progress bars).
    """
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    warm = 0
    start = time.perf_counter()
    while True:
        runner.timed_iteration(feed)
        warm += 1
        if warm >= max(min_warmup, runner.min_warmup) and time.perf_counter() - start >= warmup_s:
            break
    warm_s = time.perf_counter() - start
    timings: list[IterationTiming] = []
    warnings: list[str] = []
    start = time.perf_counter()
    while True:
        timings.append(runner.timed_iteration(feed))
        if memory is not None and len(timings) % 16 == 1:
            memory.sample()
        if on_iteration is not None:
            on_iteration(len(timings))
        elapsed = time.perf_counter() - start
        if len(timings) >= iterations and elapsed >= duration_s:
            break
        if max_s is not None and elapsed >= max_s:
            warnings.append(
                f"{runner.name}: stopped after {len(timings)} of {iterations} iterations "
                f"at the {max_s:.0f} s limit"
            )
            break
    wall = time.perf_counter() - start
    result = Measurement(
        timings,
        batch,
        warm,
        warm_s,
        wall,
        warnings=warnings,
        peak_host_bytes=memory.peak_delta_bytes() if memory else None,
        device_bytes=runner.device_memory_bytes(),
    )
    spread = result.stats().spread_warning(runner.name)
    if spread:
        result.warnings.append(spread)
    return result


INTERLEAVE_ROUNDS = 5


def measure_interleaved(
    items: Sequence[tuple[Runner, Feed]],
    *,
    batch: int = 1,
    warmup_s: float = 0.5,
    iterations: int = 100,
    duration_s: float = 0.0,
    max_s: float | None = None,
    rounds: int = INTERLEAVE_ROUNDS,
    on_iteration: Callable[[int, int], None] | None = None,
) -> list[Measurement]:
    """Time several active runners in alternating rounds (each round: every runner for 1/``rounds`` of the
    iterations and duration), so load from other jobs on a shared machine hits every candidate alike and
    their ratio holds; measured alone one after another, a load change between them shows up as a speed-up
    or slow-down that is not there. Each runner warms up fully once, then one iteration per round (the
    cache state the other runners left). ``on_iteration(index, done)`` reports progress per runner."""
    rounds = max(1, min(rounds, iterations))
    parts: list[list[Measurement]] = [[] for _ in items]
    for r in range(rounds):
        per_iterations = iterations // rounds + (1 if r < iterations % rounds else 0)  # sums to iterations
        for i, (runner, feed) in enumerate(items):
            done = sum(len(p.timings) for p in parts[i])
            parts[i].append(
                measure(
                    runner,
                    feed,
                    batch=batch,
                    warmup_s=warmup_s if r == 0 else 0.0,
                    iterations=per_iterations,
                    duration_s=duration_s / rounds,
                    max_s=None if max_s is None else max_s / rounds,
                    on_iteration=_progress(on_iteration, i, done),
                    min_warmup=3 if r == 0 else 1,
                )
            )
    return [_merged(runner.name, p) for (runner, _), p in zip(items, parts, strict=True)]


def _progress(
    on_iteration: Callable[[int, int], None] | None, index: int, done: int
) -> Callable[[int], None] | None:
    if on_iteration is None:
        return None
    callback = on_iteration
    return lambda n: callback(index, done + n)


def _merged(name: str, parts: Sequence[Measurement]) -> Measurement:
    """One measurement from a runner's rounds; the spread warning is judged on all rounds together."""
    round_spreads = {p.stats().spread_warning(name) for p in parts}
    result = Measurement(
        [t for p in parts for t in p.timings],
        parts[0].batch,
        sum(p.warmup_iterations for p in parts),
        sum(p.warmup_s for p in parts),
        sum(p.wall_s for p in parts),
        device_bytes=parts[-1].device_bytes,
        warnings=list(dict.fromkeys(w for p in parts for w in p.warnings if w not in round_spreads)),
    )
    spread = result.stats().spread_warning(name)
    if spread:
        result.warnings.append(spread)
    return result
