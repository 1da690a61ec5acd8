"""TensorRT engine runner (TensorRT >= 8.5 name-based API: set_input_shape / set_tensor_address /
execute_async_v3), with optional CUDA-graph capture and dynamic shapes. TensorRT is imported lazily:
it cannot be installed on most machines this code is developed on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.errors import TensorRTUnavailable, TrtbuildError
from trtbuild.hardware import tensorrt_available
from trtbuild.harness.cuda_backend import CudaBackend, get_backend
from trtbuild.harness.runner import Feed, IterationTiming, Runner, RunnerTensor

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def require_tensorrt(what: str) -> Any:
    if not tensorrt_available():
        raise TensorRTUnavailable(
            f"{what} needs TensorRT, which is not installed here (only its type stubs are, if anything)",
            "run it on the GPU machine it was built for, or profile the ONNX model with --runtime ort",
        )
    import tensorrt as trt

    return trt


def _nptype(trt: Any, dtype: Any) -> np.dtype[Any]:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:  # bf16 / fp8 / int4 have no numpy type: move them as raw bytes of the right size
        return np.dtype(f"V{max(1, int(getattr(dtype, 'itemsize', 1)))}")


class TrtRunner(Runner):
    runtime = "trt"
    device = "cuda"

    def __init__(
        self,
        engine: str | Path,
        cuda_backend: str = "cuda-python",
        cuda_graph: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name or Path(engine).name)
        self.engine_path = Path(engine)
        self.backend_name = cuda_backend
        self.cuda_graph = cuda_graph
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._buffers: dict[str, tuple[Any, np.ndarray]] = {}  # name -> (device buffer, pinned host array)
        self._graph: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    def activate(self) -> None:
        trt = self.trt = require_tensorrt(f"the engine {self.engine_path.name}")
        self.be: CudaBackend = get_backend(self.backend_name)
        free_before, _ = self.be.mem_info()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TrtbuildError(
                f"TensorRT {trt.__version__} could not load {self.engine_path}",
                "engines only load on the TensorRT version and GPU they were built for: rebuild it here",
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.stream = self.be.stream_create()
        self.events = [self.be.event_create() for _ in range(4)]
        self._free_before = free_before

    def deactivate(self) -> None:
        if not hasattr(self, "be"):
            return
        self.be.stream_synchronize(self.stream)
        self._release_buffers()
        for event in self.events:
            self.be.event_destroy(event)
        self.be.stream_destroy(self.stream)
        self.context = None
        self.engine = None
        close = getattr(self.be, "close", None)  # pycuda: pop the context pushed at creation
        if close is not None:
            close()

    def _release_buffers(self) -> None:
        if self._graph is not None:
            self.be.graph_destroy(self._graph)
            self._graph = None
        for dev, host in self._buffers.values():
            self.be.free(dev)
            self.be.free_pinned(host)
        self._buffers = {}
        self._shapes = None

    # -- shapes and buffers -----------------------------------------------------------------------
    def input_info(self) -> list[RunnerTensor]:
        infos = []
        for n in self.input_names:
            shape = tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n))
            infos.append(RunnerTensor(n, _nptype(self.trt, self.engine.get_tensor_dtype(n)), shape))
        return infos

    def _bind(self, feed: Feed) -> None:
        """Set input shapes and (re)allocate buffers when the shapes change; capture a graph if asked."""
        shapes = tuple(tuple(feed[n].shape) for n in self.input_names)
        if shapes == self._shapes:
            return
        self._release_buffers()
        for n, shape in zip(self.input_names, shapes, strict=True):
            if not self.context.set_input_shape(n, shape):
                lo, _, hi = self.engine.get_tensor_profile_shape(n, 0)
                raise TrtbuildError(
                    f"input '{n}' shape {shape} is outside the engine's profile ({tuple(lo)} to {tuple(hi)})",
                    "profile a batch inside the built range",
                )
        for n in self.input_names + self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise TrtbuildError(
                    f"output '{n}' has a data-dependent shape {shape}",
                    "profile this engine with trtexec; data-dependent outputs are not supported",
                )
            host = self.be.pinned_empty(shape, _nptype(self.trt, self.engine.get_tensor_dtype(n)))
            dev = self.be.malloc(host.nbytes)
            self.context.set_tensor_address(n, self.be.ptr(dev))
            self._buffers[n] = (dev, host)
        self._shapes = shapes
        handle = self.be.stream_handle(self.stream)
        # One plain run first: TensorRT does deferred allocations on the first enqueue after a shape change.
        self._enqueue(handle)
        self.be.stream_synchronize(self.stream)
        if self.cuda_graph:
            self.be.graph_capture_begin(self.stream)
            try:
                self._enqueue(handle)
            finally:
                self._graph = self.be.graph_capture_end(self.stream)

    def _enqueue(self, handle: int) -> None:
        if not self.context.execute_async_v3(handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.engine_path.name}")

    # -- running ----------------------------------------------------------------------------------
    def _run(self, feed: Feed, record: bool) -> None:
        self._bind(feed)
        be, s = self.be, self.stream
        for n in self.input_names:
            host = self._buffers[n][1]
            np.copyto(host, feed[n].astype(host.dtype, copy=False), casting="unsafe")
        e0, e1, e2, e3 = self.events
        if record:
            be.event_record(e0, s)
        for n in self.input_names:
            dev, host = self._buffers[n]
            be.memcpy_htod_async(dev, host, s)
        if record:
            be.event_record(e1, s)
        if self._graph is not None:
            be.graph_launch(self._graph, s)
        else:
            self._enqueue(be.stream_handle(s))
        if record:
            be.event_record(e2, s)
        for n in self.output_names:
            dev, host = self._buffers[n]
            be.memcpy_dtoh_async(host, dev, s)
        if record:
            be.event_record(e3, s)
        be.stream_synchronize(s)

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self._run(feed, record=False)
        return {n: self._buffers[n][1].copy() for n in self.output_names}

    def timed_iteration(self, feed: Feed) -> IterationTiming:
        start = time.perf_counter_ns()
        self._run(feed, record=True)
        host_ms = (time.perf_counter_ns() - start) / 1e6
        e0, e1, e2, e3 = self.events
        h2d, compute, d2h, total = (
            self.be.event_elapsed_ms(a, b) for a, b in ((e0, e1), (e1, e2), (e2, e3), (e0, e3))
        )
        return IterationTiming(total_ms=total, h2d_ms=h2d, compute_ms=compute, d2h_ms=d2h, host_ms=host_ms)

    def device_memory_bytes(self) -> int | None:
        free_now, _ = self.be.mem_info()
        return max(0, self._free_before - free_now)
