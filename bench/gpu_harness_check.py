"""Validate trtbuild's CUDA timing layer and harness on a GPU, against work whose time is known.

Run on a machine with an NVIDIA GPU, CUDA torch and cuda-python (TensorRT not needed):

    python3 bench/gpu_harness_check.py [--cuda-backend cuda-python|pycuda] [--copy-mib 1024]

Checks, each printed as PASS/FAIL with the numbers side by side (one run, same process):
  1. device-to-device copy bandwidth timed with our events vs the same copy timed with torch.cuda.Event;
  2. our event total vs the host clock around 50 back-to-back copies (events must not be mis-scaled);
  3. pinned host-to-device copy bandwidth, ours vs torch;
  4. a conv net's forward timed by our TorchRunner (compute split) vs torch.cuda.Event, eager and CUDA graph;
  5. error path: an elapsed-time query on an unrecorded event raises our CudaCallError, naming the call;
  6. the measurement loop's statistics are ordered and iteration counts are right.
Exits 0 when every check passes, 1 when one fails, 0 with a message when there is no GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.05  # "agree within a few percent"


def _median(values: list[float]) -> float:
    return float(np.median(np.asarray(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-backend", default="cuda-python", choices=("cuda-python", "pycuda"))
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy buffers")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from trtbuild.core.errors import TrtbuildError
    from trtbuild.harness.cuda_backend import get_backend

    console = Console()
    try:
        import torch
    except ImportError:
        console.print("SKIP: torch is not installed; this check needs CUDA torch and a GPU")
        return 0
    if not torch.cuda.is_available():
        console.print("SKIP: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine")
        return 0
    try:
        be = get_backend(args.cuda_backend)
    except TrtbuildError as exc:
        console.print(f"SKIP: {exc.one_line()}")
        return 0
    torch.cuda.init()
    console.print(f"device: {be.device_name()}  backend: {be.name}  torch {torch.__version__}")

    rows: list[tuple[str, str, str, str, bool]] = []

    def check(name: str, ours: float, ref: float, unit: str, tol: float = TOLERANCE) -> None:
        ratio = ours / ref if ref else float("inf")
        rows.append((name, f"{ours:.4g} {unit}", f"{ref:.4g} {unit}", f"{ratio:.3f}", abs(ratio - 1) <= tol))

    nbytes = args.copy_mib * 1024 * 1024
    stream = be.stream_create()
    start_ev, end_ev = be.event_create(), be.event_create()

    # 1. device-to-device copy: our events vs torch events on the same bytes
    src, dst = be.malloc(nbytes), be.malloc(nbytes)
    for _ in range(3):
        be.memcpy_dtod_async(dst, src, nbytes, stream)
    be.stream_synchronize(stream)
    ours_ms = []
    for _ in range(args.reps):
        be.event_record(start_ev, stream)
        be.memcpy_dtod_async(dst, src, nbytes, stream)
        be.event_record(end_ev, stream)
        be.event_synchronize(end_ev)
        ours_ms.append(be.event_elapsed_ms(start_ev, end_ev))
    t_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t_dst = torch.empty_like(t_src)
    t_stream = torch.cuda.Stream()
    torch_ms = []
    with torch.cuda.stream(t_stream):
        for _ in range(3):
            t_dst.copy_(t_src)
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t_dst.copy_(t_src)
            b.record()
            b.synchronize()
            torch_ms.append(a.elapsed_time(b))
    gbps = lambda ms: 2 * nbytes / (ms / 1e3) / 1e9  # noqa: E731  (read + write)
    check("D2D copy bandwidth (read+write)", gbps(_median(ours_ms)), gbps(_median(torch_ms)), "GB/s")

    # 2. our events vs the host clock over 50 back-to-back copies
    be.stream_synchronize(stream)
    t0 = time.perf_counter()
    be.event_record(start_ev, stream)
    for _ in range(50):
        be.memcpy_dtod_async(dst, src, nbytes, stream)
    be.event_record(end_ev, stream)
    be.event_synchronize(end_ev)
    host_ms = (time.perf_counter() - t0) * 1e3
    check("50 copies: events vs host clock", be.event_elapsed_ms(start_ev, end_ev), host_ms, "ms")
    be.free(src)
    be.free(dst)
    del t_src, t_dst

    # 3. pinned host-to-device copy
    h_bytes = min(nbytes, 256 * 1024 * 1024)
    host = be.pinned_empty((h_bytes,), np.dtype(np.uint8))
    host[:] = 7
    dev = be.malloc(h_bytes)
    ours_ms = []
    for i in range(args.reps + 3):
        be.event_record(start_ev, stream)
        be.memcpy_htod_async(dev, host, stream)
        be.event_record(end_ev, stream)
        be.event_synchronize(end_ev)
        if i >= 3:
            ours_ms.append(be.event_elapsed_ms(start_ev, end_ev))
    t_host = torch.full((h_bytes,), 7, dtype=torch.uint8).pin_memory()
    t_dev = torch.empty(h_bytes, dtype=torch.uint8, device="cuda")
    torch_ms = []
    with torch.cuda.stream(t_stream):
        for i in range(args.reps + 3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t_dev.copy_(t_host, non_blocking=True)
            b.record()
            b.synchronize()
            if i >= 3:
                torch_ms.append(a.elapsed_time(b))
    check(
        "pinned H2D bandwidth",
        h_bytes / _median(ours_ms) / 1e6,
        h_bytes / _median(torch_ms) / 1e6,
        "GB/s",
        tol=0.10,
    )
    be.free(dev)
    be.free_pinned(host)

    # 4. a conv net: our TorchRunner's compute split vs torch.cuda.Event around the forward
    from trtbuild.harness.measure import measure
    from trtbuild.harness.runner import RunnerTensor
    from trtbuild.harness.torch_runner import TorchRunner

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    ch = 3
    for out_ch, stride in ((64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        layers += [torch.nn.Conv2d(ch, out_ch, 3, stride, 1), torch.nn.BatchNorm2d(out_ch), torch.nn.ReLU()]
        ch = out_ch
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(ch, 1000)]
    net = torch.nn.Sequential(*layers).eval()
    batch = 64
    feed = {"x": np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    info = [RunnerTensor("x", np.dtype(np.float32), ("batch", 3, 224, 224))]
    results = {}
    for graph in (False, True):
        runner = TorchRunner(net, info, device="cuda", cuda_graph=graph, cuda_backend=args.cuda_backend)
        with runner:
            m = measure(runner, feed, batch=batch, warmup_s=1.0, iterations=args.reps)
            results[graph] = m
    ref_ms = []
    gnet = net.to("cuda")
    x = torch.from_numpy(feed["x"]).to("cuda")
    with torch.cuda.stream(t_stream), torch.inference_mode():
        for i in range(args.reps + 5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            gnet(x)
            b.record()
            b.synchronize()
            if i >= 5:
                ref_ms.append(a.elapsed_time(b))
    eager = results[False]
    split = eager.split_stats()
    check("conv net: TorchRunner compute vs torch events", split["compute"].median_ms, _median(ref_ms), "ms")
    g_split = results[True].split_stats()
    rows.append(
        (
            "CUDA graph compute <= eager compute * 1.05",
            f"{g_split['compute'].median_ms:.4g} ms",
            f"{split['compute'].median_ms:.4g} ms",
            f"{g_split['compute'].median_ms / split['compute'].median_ms:.3f}",
            g_split["compute"].median_ms <= split["compute"].median_ms * 1.05,
        )
    )
    total = eager.stats()
    parts = split["h2d"].median_ms + split["compute"].median_ms + split["d2h"].median_ms
    check("event total vs H2D+compute+D2H medians", total.median_ms, parts, "ms", tol=0.10)

    # 5. error path: elapsed time of an event that was never recorded
    from trtbuild.harness.cuda_python_backend import CudaCallError

    fresh_a, fresh_b = be.event_create(), be.event_create()
    try:
        be.event_elapsed_ms(fresh_a, fresh_b)
        rows.append(("unrecorded event raises", "no error", "an error", "-", False))
    except CudaCallError as exc:
        named = "cudaEventElapsedTime" in str(exc)
        rows.append(("unrecorded event raises CudaCallError", str(exc)[:60], "an error", "-", named))
    except Exception as exc:  # pycuda raises its own LogicError
        rows.append(("unrecorded event raises", type(exc).__name__, "an error", "-", be.name == "pycuda"))

    # 6. statistics are ordered and the iteration count is exact
    s = eager.stats()
    ordered = s.min_ms <= s.median_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    rows.append(
        (
            "stats ordered, count == iterations",
            f"count {s.count}",
            f"{args.reps}",
            "-",
            ordered and s.count == args.reps,
        )
    )

    table = Table(title="trtbuild GPU harness check")
    for col in ("check", "ours", "reference", "ratio", "result"):
        table.add_column(col)
    for name, ours, ref, ratio, ok in rows:
        table.add_row(name, ours, ref, ratio, "[green]PASS[/green]" if ok else "[red]FAIL[/red]")
    console.print(table)
    failed = [r[0] for r in rows if not r[4]]
    console.print("ALL PASS" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
