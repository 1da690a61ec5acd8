"""CUDA layer on pycuda's driver API (`pycuda.driver`), the binding many Jetson images ship.

pycuda raises ``pycuda.driver.Error`` subclasses on failure itself, so each call is checked by pycuda;
we only translate "no driver / no device" into a TrtbuildError. Imported lazily: pycuda is optional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.cuda_backend import no_gpu_error


def _driver() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise TrtbuildError(
            "the pycuda backend needs the 'pycuda' package, which is not installed",
            "pip install 'pycuda>=2024.1' (JetPack images ship it) or use --cuda-backend cuda-python",
        ) from exc
    return cuda


class PycudaBackend:
    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        self.cuda = cuda = _driver()
        try:
            cuda.init()
            count = cuda.Device.count()
        except cuda.Error as exc:
            raise no_gpu_error(self.name, str(exc)) from exc
        if count < 1:
            raise no_gpu_error(self.name, "Device.count() reported 0 devices")
        if not 0 <= device < count:
            raise TrtbuildError(
                f"CUDA device {device} does not exist (this machine has {count})",
                f"pick a device index from 0 to {count - 1}",
            )
        self.device = device
        self._dev = cuda.Device(device)
        # Share the primary context the runtime API (TensorRT, torch) uses; don't make a new one.
        self._ctx = self._dev.retain_primary_context()
        self._ctx.push()

    def close(self) -> None:
        """Pop the context pushed in __init__ (call once when done with this backend)."""
        if self._ctx is not None:
            self.cuda.Context.pop()
            self._ctx = None

    def device_count(self) -> int:
        return int(self.cuda.Device.count())

    def device_name(self) -> str:
        return str(self._dev.name())

    def mem_info(self) -> tuple[int, int]:
        free, total = self.cuda.mem_get_info()
        return int(free), int(total)

    def malloc(self, nbytes: int) -> Any:
        return self.cuda.mem_alloc(max(1, int(nbytes)))  # DeviceAllocation, freed by .free() or GC

    def free(self, buf: Any) -> None:
        buf.free()

    def ptr(self, buf: Any) -> int:
        return int(buf)

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        return self.cuda.pagelocked_empty(shape, np.dtype(dtype))

    def free_pinned(self, array: np.ndarray) -> None:
        base = getattr(array, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()

    def stream_create(self) -> Any:
        return self.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def stream_destroy(self, stream: Any) -> None:
        del stream  # pycuda destroys streams when the object is collected

    def event_create(self) -> Any:
        return self.cuda.Event()

    def event_record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def event_synchronize(self, event: Any) -> None:
        event.synchronize()

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(end.time_since(start))  # pycuda: later.time_since(earlier), in ms

    def event_destroy(self, event: Any) -> None:
        del event

    def memcpy_htod_async(self, dst: Any, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst, src, stream)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, stream)

    def memcpy_dtod_async(self, dst: Any, src: Any, nbytes: int, stream: Any) -> None:
        self.cuda.memcpy_dtod_async(dst, src, int(nbytes), stream)

    def graph_capture_begin(self, stream: Any) -> None:
        if not hasattr(stream, "begin_capture"):  # stream capture arrived in pycuda 2022.x
            raise TrtbuildError(
                "this pycuda has no CUDA graph capture",
                "upgrade pycuda (pip install -U pycuda) or drop --cuda-graph",
            )
        stream.begin_capture(self.cuda.capture_mode.THREAD_LOCAL)

    def graph_capture_end(self, stream: Any) -> Any:
        graph = stream.end_capture()
        return graph.instance()  # GraphExec

    def graph_launch(self, graph: Any, stream: Any) -> None:
        graph.launch(stream)

    def graph_destroy(self, graph: Any) -> None:
        del graph
