"""TensorRT engine runner (TensorRT >= 8.5 name-based API: set_input_shape / set_tensor_address /
execute_async_v3), with optional CUDA-graph capture and dynamic shapes. Its TensorRT calls live in
trtbuild/trt_backend.py (imported lazily there: TensorRT is missing on most machines we work on)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild import trt_backend as backend
from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.cuda_backend import CudaBackend, get_backend
from trtbuild.harness.runner import Feed, IterationTiming, Runner, RunnerTensor

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

# Every TensorRT call goes through trtbuild/trt_backend.py, so mypy checks it against tensorrt-stubs and the
# conformance test checks its names against TensorRT 11 (tests/test_trt_conformance.py).
require_tensorrt = backend.require_runtime


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
        backend.require_runtime(f"the engine {self.engine_path.name}")  # before any CUDA work
        self.be: CudaBackend = get_backend(self.backend_name)
        free_before, _ = self.be.mem_info()
        self.loaded = backend.load_engine(self.engine_path)
        self.input_names = list(self.loaded.inputs)
        self.output_names = list(self.loaded.outputs)
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
        del self.loaded
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
            engine = self.loaded.engine
            shape = tuple(d if d >= 0 else None for d in backend.engine_tensor_shape(engine, n))
            infos.append(RunnerTensor(n, backend.tensor_numpy_dtype(engine, n), shape))
        return infos

    def _bind(self, feed: Feed) -> None:
        """Set input shapes and (re)allocate buffers when the shapes change; capture a graph if asked."""
        shapes = tuple(tuple(feed[n].shape) for n in self.input_names)
        if shapes == self._shapes:
            return
        self._release_buffers()
        for n, shape in zip(self.input_names, shapes, strict=True):
            backend.set_input_shape(self.loaded.context, self.loaded.engine, n, shape)
        for n in self.input_names + self.output_names:
            shape = backend.bound_shape(self.loaded.context, n)
            if any(d < 0 for d in shape):
                raise TrtbuildError(
                    f"output '{n}' has a data-dependent shape {shape}",
                    "profile this engine with trtexec; data-dependent outputs are not supported",
                )
            host = self.be.pinned_empty(shape, backend.tensor_numpy_dtype(self.loaded.engine, n))
            dev = self.be.malloc(host.nbytes)
            backend.set_tensor_address(self.loaded.context, n, self.be.ptr(dev))
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
        if not backend.enqueue(self.loaded.context, handle):
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
