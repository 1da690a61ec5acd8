"""PyTorch runner, the baseline users compare against: eager on CPU; on CUDA eager or CUDA-graph replay,
timed with our CUDA backend's events on the runner's own stream (torch runs on it as an ExternalStream)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.cuda_backend import CudaBackend, get_backend
from trtbuild.harness.runner import Feed, IterationTiming, Runner, RunnerTensor

TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts")


def load_torch_model(path: str | Path) -> Any:
    """TorchScript (.pt/.ts) or torch.export (.pt2) archives; pickled modules are refused (unsafe)."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise TrtbuildError(
            f"cannot load {path} as a TorchScript or torch.export archive: {str(exc).splitlines()[0]}",
            "save the model with torch.jit.save(torch.jit.trace(...)) or torch.export.save(...)",
        ) from exc


def _flatten(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


class TorchRunner(Runner):
    runtime = "torch"
    min_warmup = 5  # TorchScript's profiling executor optimises after its first calls; cuDNN autotunes

    def __init__(
        self,
        model: Any,
        inputs: list[RunnerTensor],
        device: str = "cpu",
        cuda_graph: bool = False,
        threads: int | None = None,
        cuda_backend: str = "cuda-python",
        name: str | None = None,
    ) -> None:
        source = model if isinstance(model, (str, Path)) else None
        super().__init__(name or (Path(source).name if source else type(model).__name__))
        if device not in ("cpu", "cuda"):
            raise TrtbuildError(f"unknown torch device '{device}'", "use cpu or cuda")
        if cuda_graph and device != "cuda":
            raise TrtbuildError("CUDA graphs need --device cuda", "drop --cuda-graph or profile on a GPU")
        if not inputs:
            raise TrtbuildError(
                "a PyTorch model needs its input shapes",
                "give --input name:1x3x224x224 (batch is replaced by --batch)",
            )
        self._source, self._model = source, model
        self.inputs = inputs
        self.device = device
        self.cuda_graph = cuda_graph
        self.threads = threads
        self.backend_name = cuda_backend
        self.names: list[str] = []
        self._cuda: dict[str, Any] = {}

    def activate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_torch_model(self._source) if self._source is not None else self._model
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise TrtbuildError(
                    "PyTorch here has no CUDA device",
                    "install a CUDA build of torch on a GPU machine, or use --device cpu",
                )
            backend = get_backend(self.backend_name)
            stream = backend.stream_create()
            torch.cuda.reset_peak_memory_stats()
            self._cuda = {
                "backend": backend,
                "stream": stream,
                "torch_stream": torch.cuda.ExternalStream(backend.stream_handle(stream)),
                "events": [backend.event_create() for _ in range(4)],
                "shape": None,
            }
            model = model.to("cuda")
        self.module = model.eval() if hasattr(model, "eval") else model

    def input_info(self) -> list[RunnerTensor]:
        return list(self.inputs)

    def _host_tensors(self, feed: Feed) -> list[Any]:
        import torch

        return [torch.from_numpy(np.ascontiguousarray(feed[i.name])) for i in self.inputs]

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            args = [t.to(self.device) for t in self._host_tensors(feed)]
            outs = _flatten(self.module(*args))
        self.names = [f"output{i}" for i in range(len(outs))]
        return {n: t.detach().float().cpu().numpy() for n, t in zip(self.names, outs, strict=True)}

    def timed_iteration(self, feed: Feed) -> IterationTiming:
        import torch

        if self.device == "cpu":
            args = self._host_tensors(feed)
            with torch.inference_mode():
                start = time.perf_counter_ns()
                self.module(*args)
                return IterationTiming(total_ms=(time.perf_counter_ns() - start) / 1e6)
        return self._timed_cuda(feed)

    def _prepare_cuda(self, feed: Feed) -> None:
        """Static pinned host / device tensors per input shape; a captured graph when asked."""
        import torch

        c = self._cuda
        shape = tuple(feed[i.name].shape for i in self.inputs)
        if c["shape"] == shape:
            return
        with torch.cuda.stream(c["torch_stream"]), torch.inference_mode():
            c["host_in"] = [t.pin_memory() for t in self._host_tensors(feed)]
            c["dev_in"] = [t.to("cuda", non_blocking=True) for t in c["host_in"]]
            for _ in range(3):  # warm kernels / cudnn autotune before any capture
                outs = _flatten(self.module(*c["dev_in"]))
            c["graph"] = None
            if self.cuda_graph:
                graph = torch.cuda.CUDAGraph()
                c["torch_stream"].synchronize()
                with torch.cuda.graph(graph, stream=c["torch_stream"]):
                    outs = _flatten(self.module(*c["dev_in"]))
                c["graph"] = graph
            c["dev_out"] = outs
            c["host_out"] = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs]
        c["torch_stream"].synchronize()
        c["shape"] = shape

    def _timed_cuda(self, feed: Feed) -> IterationTiming:
        import torch

        self._prepare_cuda(feed)
        c = self._cuda
        be: CudaBackend = c["backend"]
        e0, e1, e2, e3 = c["events"]
        for dst, src in zip(c["host_in"], self._host_tensors(feed), strict=True):
            dst.copy_(src)  # new data each call, like a real request (host-side, outside the timed span)
        start = time.perf_counter_ns()
        with torch.cuda.stream(c["torch_stream"]), torch.inference_mode():
            be.event_record(e0, c["stream"])
            for dev, host in zip(c["dev_in"], c["host_in"], strict=True):
                dev.copy_(host, non_blocking=True)
            be.event_record(e1, c["stream"])
            if c["graph"] is not None:
                c["graph"].replay()
                outs = c["dev_out"]
            else:
                outs = _flatten(self.module(*c["dev_in"]))
            be.event_record(e2, c["stream"])
            for host, dev in zip(c["host_out"], outs, strict=True):
                host.copy_(dev, non_blocking=True)
            be.event_record(e3, c["stream"])
        be.event_synchronize(e3)
        host_ms = (time.perf_counter_ns() - start) / 1e6
        h2d, compute, d2h, total = (
            be.event_elapsed_ms(a, b) for a, b in ((e0, e1), (e1, e2), (e2, e3), (e0, e3))
        )
        return IterationTiming(total_ms=total, h2d_ms=h2d, compute_ms=compute, d2h_ms=d2h, host_ms=host_ms)

    def device_memory_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())

    def deactivate(self) -> None:
        c, self._cuda = self._cuda, {}
        if c:
            be: CudaBackend = c["backend"]
            stream, events = c["stream"], c["events"]
            be.stream_synchronize(stream)
            c.clear()  # drop torch tensors and the graph before the stream they ran on
            for event in events:
                be.event_destroy(event)
            be.stream_destroy(stream)
            close = getattr(be, "close", None)  # pycuda: pop the context pushed at creation
            if close is not None:
                close()
        self.module = None
