"""Real TensorRT builds of EfficientNet-Lite0 (FP32 and FP16), run on the GPU and compared with ONNX Runtime.

Marked `tensorrt`: they run wherever a real TensorRT and an NVIDIA GPU exist and skip elsewhere (conftest).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from trtbuild.plan import BuildPlan, make_plan
from trtbuild.targets import TARGETS

pytestmark = pytest.mark.tensorrt


def _local_target() -> tuple[str, str]:
    from trtbuild.core.trt_versions import TrtVersion
    from trtbuild.hardware import tensorrt_version
    from trtbuild.trt_backend import gpu_identity

    _, cc = gpu_identity()
    version = TrtVersion.parse(tensorrt_version() or "0.0")
    sm = tuple(int(x) for x in cc.split("."))
    for target in TARGETS.values():
        if target.sm == sm and (
            not target.trt_versions
            or any(TrtVersion.parse(v).short == version.short for v in target.trt_versions)
        ):
            return target.id, version.short
    pytest.skip(f"no trtbuild target for compute capability {cc} with TensorRT {version}")


def _run_engine(engine_path: str, x: np.ndarray) -> np.ndarray:
    """Run a built engine with the TensorRT 10+/11 tensor-address API through cuda-python."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    def ok(result: tuple[Any, ...]) -> Any:
        assert int(result[0]) == 0, result[0]
        return result[1] if len(result) > 1 else None

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    context.set_input_shape("images", x.shape)
    out_shape = tuple(context.get_tensor_shape("logits"))
    y = np.empty(out_shape, dtype=np.float32)
    d_x = ok(cudart.cudaMalloc(x.nbytes))
    d_y = ok(cudart.cudaMalloc(y.nbytes))
    stream = ok(cudart.cudaStreamCreate())
    try:
        ok(cudart.cudaMemcpy(d_x, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        context.set_tensor_address("images", int(d_x))
        context.set_tensor_address("logits", int(d_y))
        assert context.execute_async_v3(int(stream))
        ok(cudart.cudaStreamSynchronize(stream))
        ok(cudart.cudaMemcpy(y.ctypes.data, d_y, y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    finally:
        cudart.cudaFree(d_x)
        cudart.cudaFree(d_y)
        cudart.cudaStreamDestroy(stream)
    return y


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.mark.parametrize(
    ("precision", "min_cosine", "min_top1"), [("fp32", 0.9999, 1.0), ("fp16", 0.998, 0.9)]
)
def test_build_and_run_effnet(
    effnet_onnx: Path,
    photo_batch: np.ndarray,
    tmp_path: Path,
    precision: str,
    min_cosine: float,
    min_top1: float,
) -> None:
    from export.fp16 import convert_fp16
    from trtbuild.core.trt_versions import strongly_typed_only
    from trtbuild.trt_backend import build_engine, inspect_engine

    target, version = _local_target()
    model = tmp_path / "effnet.onnx"
    shutil.copy(effnet_onnx, model)
    fp16 = convert_fp16(model) if precision == "fp16" and strongly_typed_only(version) else None
    plan = make_plan(
        model,
        target,
        precision,
        trt_version=version if not TARGETS[target].trt_versions else None,
        fp16_onnx=fp16,
        out_root=tmp_path,
    )
    meta = build_engine(plan)

    assert Path(plan.engine).stat().st_size == meta.engine_bytes > 0
    assert Path(plan.timing_cache).stat().st_size > 0  # persisted for the next build
    assert meta.precision == precision and meta.compute_capability == plan.compute_capability
    assert meta.device_memory_bytes > 0 and meta.num_layers > 0
    assert BuildPlan.from_json(meta.plan) == plan
    assert {(t.name, t.mode) for t in meta.tensors} == {("images", "input"), ("logits", "output")}
    assert inspect_engine(plan.engine)["layers"]

    x = np.ascontiguousarray(photo_batch[:8])
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"images": x})[
        0
    ]
    got = _run_engine(plan.engine, x)
    assert got.shape == reference.shape
    assert _cosine(got, reference) >= min_cosine
    assert float((got.argmax(1) == reference.argmax(1)).mean()) >= min_top1

    # A second build reuses the timing cache (and must give an engine of the same I/O).
    again = build_engine(plan)
    assert again.tensors == meta.tensors
