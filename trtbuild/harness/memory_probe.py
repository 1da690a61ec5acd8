"""Peak host memory of one model, measured in a fresh process.

In one long-lived process a second model reuses the heap the first one freed, so its RSS growth reads
near zero; a fresh interpreter per model gives each the same clean start (the way `/usr/bin/time -v`
would). The probe loads the model, runs a few iterations and reports VmHWM minus the RSS before loading.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

from trtbuild.harness.runner import Feed


def _child(runtime: str, path: str, feed: Feed, threads: int | None, runs: int, queue: Any) -> None:
    try:
        import onnxruntime  # noqa: F401  (import cost is not the model's)

        from trtbuild.harness.memory import PeakRssTracker

        if runtime == "ort":
            from trtbuild.harness.ort_runner import OrtRunner

            runner: Any = OrtRunner(path, threads=threads)
        else:
            import torch  # noqa: F401

            from trtbuild.harness.runner import RunnerTensor
            from trtbuild.harness.torch_runner import TorchRunner

            infos = [RunnerTensor(k, v.dtype, v.shape) for k, v in feed.items()]
            runner = TorchRunner(path, infos, threads=threads)
        tracker = PeakRssTracker()
        tracker.start()
        with runner:
            for _ in range(runs):
                runner.timed_iteration(feed)
        queue.put(tracker.peak_delta_bytes())
    except Exception as exc:  # reported to the parent as a note, never a crash
        queue.put(f"{type(exc).__name__}: {exc}")


def probe_peak_rss(
    runtime: str,
    path: str | Path,
    feed: Feed,
    threads: int | None = None,
    runs: int = 3,
    timeout_s: float = 300.0,
) -> int | str | None:
    """Peak RSS growth in bytes, or a string saying why it could not be measured."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(runtime, str(path), feed, threads, runs, queue), daemon=True)
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception:
        result = f"memory probe gave no answer in {timeout_s:.0f} s"
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
    return result
