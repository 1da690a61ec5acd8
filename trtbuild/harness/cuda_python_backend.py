"""CUDA layer on cuda-python's runtime bindings (`cuda.bindings.runtime`, what TensorRT's samples use).

Every binding returns a tuple ``(cudaError_t, *values)``; ``_check`` turns a non-success code into an
exception naming the call, and unwraps the values, so no call's error is ever dropped.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.cuda_backend import no_gpu_error


class CudaCallError(RuntimeError):
    """A CUDA runtime call failed after the device was found (a bug or a device fault, not user input)."""


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise TrtbuildError(
            "the cuda-python backend needs the 'cuda-python' package, which is not installed",
            "pip install 'cuda-python>=12.6' (or use --cuda-backend pycuda)",
        ) from exc
    return runtime


def _error_text(rt: Any, err: Any) -> str:
    name = rt.cudaGetErrorName(err)[1]
    text = rt.cudaGetErrorString(err)[1]
    name = name.decode() if isinstance(name, bytes) else str(name)
    text = text.decode() if isinstance(text, bytes) else str(text)
    return f"{name}: {text}"


def _check(rt: Any, call: str, result: Any) -> Any:
    """Raise on error; return None, the single value, or the tuple of values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaCallError(f"{call} failed: {_error_text(rt, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class CudaPythonBackend:
    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        self.rt = rt = _runtime()
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0:
            raise no_gpu_error(self.name, _error_text(rt, err))
        if count < 1:
            raise no_gpu_error(self.name, "cudaGetDeviceCount reported 0 devices")
        if not 0 <= device < count:
            raise TrtbuildError(
                f"CUDA device {device} does not exist (this machine has {count})",
                f"pick a device index from 0 to {count - 1}",
            )
        self.device = device
        self._call("cudaSetDevice", device)
        self._call("cudaFree", 0)  # create the context now, not in the first timed call
        self._pinned: dict[int, int] = {}  # id(array) -> host pointer to free

    def _call(self, name: str, *args: Any) -> Any:
        return _check(self.rt, name, getattr(self.rt, name)(*args))

    # -- device -----------------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount"))

    def device_name(self) -> str:
        prop = self._call("cudaGetDeviceProperties", self.device)
        name = prop.name
        return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()

    def mem_info(self) -> tuple[int, int]:
        free, total = self._call("cudaMemGetInfo")
        return int(free), int(total)

    # -- memory -----------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", max(1, int(nbytes))))

    def free(self, buf: Any) -> None:
        self._call("cudaFree", int(buf))

    def ptr(self, buf: Any) -> int:
        return int(buf)

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        host = int(self._call("cudaMallocHost", nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(host)
        used = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        array = (
            np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8, count=used).view(dtype).reshape(shape)
        )
        self._pinned[id(array)] = host
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        host = self._pinned.pop(id(array), None)
        if host is not None:
            self._call("cudaFreeHost", host)

    # -- streams and events -----------------------------------------------------------------------
    def stream_create(self) -> Any:
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def event_create(self) -> Any:
        return self._call("cudaEventCreateWithFlags", self.rt.cudaEventDefault)

    def event_record(self, event: Any, stream: Any) -> None:
        self._call("cudaEventRecord", event, stream)

    def event_synchronize(self, event: Any) -> None:
        self._call("cudaEventSynchronize", event)

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call("cudaEventElapsedTime", start, end))

    def event_destroy(self, event: Any) -> None:
        self._call("cudaEventDestroy", event)

    # -- copies -----------------------------------------------------------------------------------
    def memcpy_htod_async(self, dst: Any, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", int(dst), src.ctypes.data, src.nbytes, kind, stream)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, int(src), dst.nbytes, kind, stream)

    def memcpy_dtod_async(self, dst: Any, src: Any, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call("cudaMemcpyAsync", int(dst), int(src), int(nbytes), kind, stream)

    # -- CUDA graphs ------------------------------------------------------------------------------
    def graph_capture_begin(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", stream, mode)

    def graph_capture_end(self, stream: Any) -> Any:
        graph = self._call("cudaStreamEndCapture", stream)
        try:
            return self._call("cudaGraphInstantiate", graph, 0)
        finally:
            self._call("cudaGraphDestroy", graph)  # the executable graph keeps what it needs

    def graph_launch(self, graph: Any, stream: Any) -> None:
        self._call("cudaGraphLaunch", graph, stream)

    def graph_destroy(self, graph: Any) -> None:
        self._call("cudaGraphExecDestroy", graph)
