"""THE one module that imports TensorRT: renders a BuildPlan through the TensorRT Python API.

Everything here is a thin shell around the plan (decided in ``plan.py``). TensorRT is imported lazily in
each function so the rest of trtbuild (and this module's pure helpers) works without it, and mypy checks
every call against `tensorrt-stubs` (the 10.13 API; ``tests/test_trt_conformance.py``).

Version split: functions named ``_legacy_*`` use API that exists only up to 10.x (precision builder flags,
calibrators, ``EXPLICIT_BATCH``, ``device_memory_size``) and are only called when the plan's TensorRT
version has them; every other function is the common path that must also work on 11.x, and the
conformance test checks each TensorRT name it uses against the 11.x bindings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trtbuild.core.atomic import write_bytes
from trtbuild.core.errors import TensorRTUnavailable, TrtbuildError
from trtbuild.core.hashing import sha256_file as file_sha256
from trtbuild.core.trt_versions import TrtVersion, calibration_cache_version_tag, has
from trtbuild.engine_meta import EngineMeta, TensorInfo, load_meta, write_meta
from trtbuild.hardware import tensorrt_available, tensorrt_version
from trtbuild.plan import BuildPlan

if TYPE_CHECKING:
    import tensorrt as trt

# Precision builder flags: removed in 11.0 (every network is strongly typed there).
LEGACY_PRECISION_FLAGS = frozenset({"FP16", "BF16", "INT8", "FP8"})


def unavailable_error(
    plan: BuildPlan,
    plan_path: str | os.PathLike[str] | None = None,
    script_path: str | os.PathLike[str] | None = None,
) -> TensorRTUnavailable:
    where = f"plan saved at {plan_path}" if plan_path else "save the plan with `trtbuild plan`"
    script = f", trtexec command at {script_path}" if script_path else ""
    return TensorRTUnavailable(
        f"TensorRT (libnvinfer + its Python bindings, not just the type stubs) is not importable here,"
        f" so {plan.engine} cannot be built",
        f"build on the {plan.gpu} with TensorRT {plan.trt_version}: {where}{script}",
    )


def _require_tensorrt(
    plan: BuildPlan, plan_path: str | os.PathLike[str] | None, script_path: str | os.PathLike[str] | None
) -> TrtVersion:
    if not tensorrt_available():
        raise unavailable_error(plan, plan_path, script_path)
    running = TrtVersion.parse(tensorrt_version() or "0.0")
    if running.short != plan.version.short:
        raise TrtbuildError(
            f"the plan is for TensorRT {plan.trt_version} but TensorRT {running} is installed",
            f"re-plan with --trt-version {running.short}, or build where TensorRT {plan.version.short} is",
        )
    return running


def build_engine(
    plan: BuildPlan,
    *,
    plan_path: str | os.PathLike[str] | None = None,
    script_path: str | os.PathLike[str] | None = None,
    verbose: bool = False,
) -> EngineMeta:
    """Build ``plan`` with the installed TensorRT; write the engine and its sidecar atomically.

    Raises TensorRTUnavailable (naming the saved plan and trtexec script) where TensorRT is missing.
    """
    running = _require_tensorrt(plan, plan_path, script_path)
    import tensorrt as trt

    gpu_name, cc = gpu_identity()
    if plan.hardware_compat is None and cc != plan.compute_capability:
        raise TrtbuildError(
            f"the plan is for {plan.gpu} (compute capability {plan.compute_capability}) but this GPU is "
            f"{gpu_name} ({cc})",
            "build on the target GPU, or re-plan with --hardware-compat",
        )
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(plan))
    parser = trt.OnnxParser(network, logger)
    _parse(parser, plan)
    config = builder.create_builder_config()
    profile = _configure(builder, config, plan)
    if not plan.strongly_typed:
        _legacy_precision_flags(config, plan)
    if plan.calib_cache:
        _legacy_attach_calibrator(config, profile, plan, running)
    timing_cache = _load_timing_cache(config, plan)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TrtbuildError(
            f"TensorRT could not build {plan.onnx} for {plan.target}",
            "re-run with --verbose to see TensorRT's log",
        )
    engine_bytes = bytes(memoryview(serialized))
    write_bytes(Path(plan.timing_cache), bytes(memoryview(timing_cache.serialize())))
    write_bytes(plan.engine, engine_bytes)

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    meta = EngineMeta(
        trt_version=str(running),
        gpu_name=gpu_name,
        compute_capability=cc,
        precision=plan.precision,
        tensors=tuple(_tensor_infos(engine)),
        onnx=plan.onnx,
        onnx_sha256=file_sha256(plan.onnx),
        plan=plan.to_json(),
        build_seconds=round(seconds, 3),
        engine_bytes=len(engine_bytes),
        device_memory_bytes=_device_memory(engine, running),
        num_layers=engine.num_layers,
    )
    write_meta(meta, plan.engine)
    return meta


def _network_flags(plan: BuildPlan) -> int:
    import tensorrt as trt

    flags = 0
    if has("explicit_batch_flag", plan.version):
        flags |= _legacy_explicit_batch()
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def _parse(parser: trt.OnnxParser, plan: BuildPlan) -> None:
    """Parse from file (so external weights next to the ONNX load); report every error with its node."""
    if parser.parse_from_file(str(plan.onnx)):
        return
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = f"node {error.node()}"
        if has("parser_error_node_name", plan.version):
            node += f" ({error.node_name()})"
        errors.append(f"{node}: {error.desc()}")
    raise TrtbuildError(
        f"TensorRT's ONNX parser rejected {plan.onnx}: " + "; ".join(errors),
        "fix or re-export those nodes (see `trtbuild prepare`)",
    )


def _configure(builder: trt.Builder, config: trt.IBuilderConfig, plan: BuildPlan) -> trt.IOptimizationProfile:
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    # Detailed layer information for `trtbuild inspect` (names, precisions, tactics); no runtime cost.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if plan.opt_level is not None:
        config.builder_optimization_level = plan.opt_level
    if plan.hardware_compat is not None:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compat)
    for name in plan.builder_flags:
        if name not in LEGACY_PRECISION_FLAGS:  # GPU_FALLBACK, SPARSE_WEIGHTS, VERSION_COMPATIBLE
            config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    profile = builder.create_optimization_profile()
    for spec in plan.inputs:
        profile.set_shape(
            spec.name, trt.Dims(list(spec.min)), trt.Dims(list(spec.opt_shape)), trt.Dims(list(spec.max))
        )
    config.add_optimization_profile(profile)
    return profile


def _load_timing_cache(config: trt.IBuilderConfig, plan: BuildPlan) -> trt.ITimingCache:
    """A persistent timing cache: later builds on the same GPU + TensorRT skip most tactic timing."""
    path = Path(plan.timing_cache)
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _tensor_infos(engine: trt.ICudaEngine) -> list[TensorInfo]:
    import tensorrt as trt

    infos = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dims = engine.get_tensor_shape(name)
        shape = tuple(int(dims[i]) for i in range(len(dims)))
        infos.append(TensorInfo(name, mode, shape, str(engine.get_tensor_dtype(name)).split(".")[-1].lower()))
    return infos


def _device_memory(engine: trt.ICudaEngine, version: TrtVersion) -> int:
    if has("device_memory_size_v2", version):
        return int(engine.device_memory_size_v2)
    return _legacy_device_memory(engine)


def inspect_engine(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar, plus TensorRT's per-layer information (IEngineInspector) where TensorRT is installed."""
    result: dict[str, Any] = {"sidecar": load_meta(engine_path).to_json(), "layers": None}
    if not tensorrt_available():
        result["layers_unavailable"] = "TensorRT is not installed here; showing the sidecar only"
        return result
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise TrtbuildError(
            f"TensorRT {tensorrt_version()} cannot load '{engine_path}'",
            "engines only load with the TensorRT version and GPU they were built for",
        )
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    result["layers"] = info.get("Layers", info)
    return result


# ---- running an engine: the harness's TensorRT calls (harness/trt_runner.py owns the CUDA side) ----


@dataclass
class LoadedEngine:
    """A deserialized engine with one execution context; the logger and runtime must outlive the engine."""

    logger: trt.Logger
    runtime: trt.Runtime
    engine: trt.ICudaEngine
    context: trt.IExecutionContext
    inputs: list[str]
    outputs: list[str]


def require_runtime(what: str) -> None:
    """Raise TensorRTUnavailable (naming ``what``) where TensorRT cannot be imported."""
    if not tensorrt_available():
        raise TensorRTUnavailable(
            f"{what} needs TensorRT, which is not installed here (only its type stubs are, if anything)",
            "run it on the GPU machine it was built for, or profile the ONNX model with --runtime ort",
        )


def load_engine(engine_path: Path) -> LoadedEngine:
    """Deserialize ``engine_path`` and create its execution context."""
    require_runtime(f"the engine {engine_path.name}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise TrtbuildError(
            f"TensorRT {trt.__version__} could not load {engine_path}",
            "engines only load on the TensorRT version and GPU they were built for: rebuild it here",
        )
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
    inputs = [n for n in names if is_input[n]]
    outputs = [n for n in names if not is_input[n]]
    return LoadedEngine(logger, runtime, engine, context, inputs, outputs)


# Host dtypes by DataType member name: trt.nptype lives in TensorRT's Python wrapper and DataType.itemsize is
# gone from the 11.x bindings, so neither is used. Types numpy lacks move as raw bytes of their storage size.
_NUMPY_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
    "BOOL": "bool", "UINT8": "uint8", "BF16": "V2", "FP8": "V1", "INT4": "V1", "FP4": "V1", "E8M0": "V1",
}  # fmt: skip


def tensor_numpy_dtype(engine: trt.ICudaEngine, name: str) -> np.dtype[Any]:
    """The host dtype of an I/O tensor (bf16 / fp8 / int4 / fp4 as raw bytes)."""
    return np.dtype(_NUMPY_DTYPES.get(engine.get_tensor_dtype(name).name, "V1"))


def engine_tensor_shape(engine: trt.ICudaEngine, name: str) -> tuple[int, ...]:
    """The engine's declared shape (-1 for a dynamic dimension)."""
    dims = engine.get_tensor_shape(name)
    return tuple(dims[i] for i in range(len(dims)))


def set_input_shape(
    context: trt.IExecutionContext, engine: trt.ICudaEngine, name: str, shape: tuple[int, ...]
) -> None:
    """Bind one input shape; a shape outside the optimization profile is a user error naming the range."""
    if not context.set_input_shape(name, shape):
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        raise TrtbuildError(
            f"input '{name}' shape {shape} is outside the engine's profile ({tuple(lo)} to {tuple(hi)})",
            "profile a batch inside the built range",
        )


def bound_shape(context: trt.IExecutionContext, name: str) -> tuple[int, ...]:
    """A tensor's shape once the inputs are bound (-1 where it is data-dependent)."""
    dims = context.get_tensor_shape(name)
    return tuple(dims[i] for i in range(len(dims)))


def set_tensor_address(context: trt.IExecutionContext, name: str, address: int) -> None:
    context.set_tensor_address(name, address)


def enqueue(context: trt.IExecutionContext, stream_handle: int) -> bool:
    return bool(context.execute_async_v3(stream_handle))


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of device 0, via cuda-python."""
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise TrtbuildError(f"no usable CUDA GPU ({err})", "build on a machine with an NVIDIA GPU")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


# ---- TensorRT <= 10.x only (removed in 11.0) -------------------------------------------------------


def _legacy_explicit_batch() -> int:
    import tensorrt as trt

    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _legacy_precision_flags(config: trt.IBuilderConfig, plan: BuildPlan) -> None:
    import tensorrt as trt

    for name in plan.builder_flags:
        if name in LEGACY_PRECISION_FLAGS:
            config.set_flag(getattr(trt.BuilderFlag, name))


def _legacy_device_memory(engine: trt.ICudaEngine) -> int:
    return int(engine.device_memory_size)


def served_calibration_cache(path: str | os.PathLike[str], version: TrtVersion | str) -> bytes:
    """Our cache file as the installed TensorRT expects it back from a calibrator: the same scales under
    that version's header (calibrators/cache.py is the one codec)."""
    from calibrators import cache as calib_cache

    scales = calib_cache.read_cache(Path(path))
    return calib_cache.render(scales, calibration_cache_version_tag(version)).encode()


def _legacy_attach_calibrator(
    config: trt.IBuilderConfig, profile: trt.IOptimizationProfile, plan: BuildPlan, running: TrtVersion
) -> None:
    """Implicit INT8: our calibration cache served through IInt8EntropyCalibrator2, so TensorRT takes every
    scale from the cache and never asks for a batch (it would get None and stop)."""
    assert plan.calib_cache is not None
    config.int8_calibrator = _legacy_cache_calibrator(served_calibration_cache(plan.calib_cache, running))
    if plan.dynamic:
        config.set_calibration_profile(profile)


def _legacy_cache_calibrator(cache: bytes) -> trt.IInt8EntropyCalibrator2:
    import tensorrt as trt

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int]:
            return []  # empty = no more data; never reached while the cache covers the network

        def read_calibration_cache(self) -> bytes:
            return self._cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None  # our cache is the source of truth; TensorRT's copy would be identical

    return CacheCalibrator()
