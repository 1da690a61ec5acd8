"""The CUDA layer: without a GPU (here) it must fail with one clear TrtbuildError; with one (marked `gpu`)
its events must time real copies and kernels consistently with torch's own events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtbuild.core.errors import TensorRTUnavailable, TrtbuildError
from trtbuild.hardware import cuda_available, tensorrt_available
from trtbuild.harness.cuda_backend import CudaBackend, get_backend

no_gpu_here = pytest.mark.skipif(
    cuda_available(), reason="checks the no-GPU error path; this machine has a GPU"
)


@no_gpu_here
def test_cuda_python_backend_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(TrtbuildError) as info:
        get_backend("cuda-python")
    message = info.value.one_line()
    assert "no usable CUDA GPU" in message and "cudaError" in message  # names the real CUDA error
    assert "\n" not in message


def test_check_unwraps_values_and_raises_named_errors() -> None:
    from cuda.bindings import runtime as rt

    from trtbuild.harness.cuda_python_backend import CudaCallError, _check

    ok = rt.cudaError_t.cudaSuccess
    assert _check(rt, "f", (ok,)) is None
    assert _check(rt, "f", (ok, 5)) == 5
    assert _check(rt, "f", (ok, 1, 2)) == (1, 2)
    with pytest.raises(CudaCallError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation"):
        _check(rt, "cudaMalloc", (rt.cudaError_t.cudaErrorMemoryAllocation, None))


@no_gpu_here
def test_real_binding_failure_goes_through_check() -> None:
    """A real cuda.bindings call (no driver here) returns an error tuple; _check must raise, not return."""
    from cuda.bindings import runtime as rt

    from trtbuild.harness.cuda_python_backend import CudaCallError, _check

    with pytest.raises(CudaCallError, match="cudaMalloc failed"):
        _check(rt, "cudaMalloc", rt.cudaMalloc(1024))


def test_unknown_backend_and_missing_pycuda() -> None:
    with pytest.raises(TrtbuildError, match="unknown CUDA backend"):
        get_backend("opencl")
    try:
        import pycuda  # noqa: F401
    except ImportError:
        with pytest.raises(TrtbuildError, match="pip install 'pycuda"):
            get_backend("pycuda")


@pytest.mark.skipif(tensorrt_available(), reason="checks the no-TensorRT path")
def test_trt_runner_without_tensorrt(tmp_path: Path) -> None:
    from trtbuild.harness.trt_runner import TrtRunner

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(TensorRTUnavailable, match="needs TensorRT"), TrtRunner(engine):
        pass


# ---- on a GPU ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["cuda-python", "pycuda"])
def backend(request: pytest.FixtureRequest) -> CudaBackend:
    if request.param == "pycuda":
        pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    return get_backend(request.param)


@pytest.mark.gpu
def test_events_time_a_device_copy_like_torch(backend: CudaBackend) -> None:
    import torch

    nbytes = 256 * 1024 * 1024
    src, dst = backend.malloc(nbytes), backend.malloc(nbytes)
    stream = backend.stream_create()
    e0, e1 = backend.event_create(), backend.event_create()
    ours = []
    for _ in range(10):
        backend.event_record(e0, stream)
        backend.memcpy_dtod_async(dst, src, nbytes, stream)
        backend.event_record(e1, stream)
        backend.event_synchronize(e1)
        ours.append(backend.event_elapsed_ms(e0, e1))
    a_t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b_t = torch.empty_like(a_t)
    ref = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        b_t.copy_(a_t)
        b.record()
        b.synchronize()
        ref.append(a.elapsed_time(b))
    assert np.median(ours[2:]) == pytest.approx(np.median(ref[2:]), rel=0.1)
    backend.free(src)
    backend.free(dst)


@pytest.mark.gpu
def test_pinned_roundtrip(backend: CudaBackend) -> None:
    host = backend.pinned_empty((1000,), np.dtype(np.float32))
    host[:] = np.arange(1000, dtype=np.float32)
    back = backend.pinned_empty((1000,), np.dtype(np.float32))
    dev = backend.malloc(host.nbytes)
    stream = backend.stream_create()
    backend.memcpy_htod_async(dev, host, stream)
    backend.memcpy_dtoh_async(back, dev, stream)
    backend.stream_synchronize(stream)
    np.testing.assert_array_equal(back, host)


@pytest.mark.gpu
def test_torch_runner_cuda_split(effnet_model: object, photo_batch: np.ndarray) -> None:
    from trtbuild.harness.measure import measure
    from trtbuild.harness.runner import RunnerTensor
    from trtbuild.harness.torch_runner import TorchRunner

    info = [RunnerTensor("images", np.dtype(np.float32), ("batch", 3, 224, 224))]
    for graph in (False, True):
        with TorchRunner(effnet_model, info, device="cuda", cuda_graph=graph) as runner:
            m = measure(runner, {"images": photo_batch[:8]}, batch=8, warmup_s=0.5, iterations=30)
        split = m.split_stats()
        assert {"h2d", "compute", "d2h", "host"} <= split.keys()
        assert split["compute"].median_ms > 0
        assert m.stats().median_ms == pytest.approx(
            split["h2d"].median_ms + split["compute"].median_ms + split["d2h"].median_ms, rel=0.15
        )


@pytest.mark.tensorrt
def test_trt_runner_matches_onnx(effnet_onnx: Path, photo_batch: np.ndarray, tmp_path: Path) -> None:
    import tensorrt as trt

    from trtbuild.harness.measure import measure
    from trtbuild.harness.ort_runner import OrtRunner
    from trtbuild.harness.trt_runner import TrtRunner

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(effnet_onnx.read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224))
    config.add_optimization_profile(profile)
    engine = tmp_path / "effnet.engine"
    engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
    feed = {"images": photo_batch[:4]}
    with OrtRunner(effnet_onnx) as ort_runner:
        expected = ort_runner.infer(feed)["logits"]
    for graph in (False, True):
        with TrtRunner(engine, cuda_graph=graph) as runner:
            got = runner.infer(feed)["logits"]
            m = measure(runner, feed, batch=4, warmup_s=0.2, iterations=20)
        np.testing.assert_allclose(got, expected, atol=5e-2)
        assert m.split_stats()["compute"].median_ms > 0
