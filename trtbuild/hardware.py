"""What this machine has: a real TensorRT (not just type stubs), a CUDA GPU, which CUDA Python backend."""

from __future__ import annotations

import functools
import importlib
import importlib.util


@functools.cache
def tensorrt_version() -> str | None:
    """The real TensorRT's version, or None. `tensorrt-stubs` installs an importable namespace package
    with no code, so a bare `import tensorrt` proves nothing: require the Builder class."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # a broken install (libnvinfer missing) raises OSError/ImportError
        return None
    if not hasattr(trt, "Builder"):
        return None
    return str(getattr(trt, "__version__", "unknown"))


def tensorrt_available() -> bool:
    return tensorrt_version() is not None


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device can be used (through torch or cuda-python)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:
        pass
    try:
        from cuda.bindings import runtime

        err, count = runtime.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:
        return False
