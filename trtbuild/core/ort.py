"""ONNX Runtime CPU sessions, with the semantics a measurement needs said out loud.

A Q/DQ graph means "round to the integer grid, then compute in float" (the ONNX spec, and what TensorRT
builds from it). ORT at its default optimisation level instead fuses Q/DQ into its own x86 integer kernels,
which on CPUs without VNNI saturate (trtbuild/core/cpu.py) and so measure the CPU, not the model. Two
semantics, one factory:

- ``reference``: the graph as written: Q/DQ ops evaluated exactly, everything else in float. ORT's QDQ
  fusions are switched off (``session.disable_quant_qdq``), its float optimisations stay on (and fold each
  weight's DequantizeLinear into a float constant, which computes the same values once). Used for every
  fidelity number of a TensorRT-target graph: the gate, auto-fallback, bias correction, profile accuracy.
- ``ort-cpu``: what ORT really runs on this machine, fused integer kernels included. Used for the uint8
  ORT-CPU deployment graph, which is built for the CPU it will run on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

# ORT 1.32's Relu/Clip -> QuantizeLinear rewrites assume an integer zero point: on a float8 one the Clip
# rewrite fails the session and the Relu rewrite drops the Relu (FP8 keeps negatives: wrong results).
# Reference semantics evaluate the graph as written, so both stay off there (docs/fp8.md).
REFERENCE_DISABLED_OPTIMIZERS = ("ClipQuantRewrite", "ReluQuantRewrite")

REFERENCE = "reference"
ORT_CPU = "ort-cpu"
SEMANTICS = (REFERENCE, ORT_CPU)

# ONNX metadata written on every graph trtbuild quantizes, read back to pick the semantics.
META_TARGET = "trtbuild.qdq_target"  # "tensorrt" or "ort-cpu"
META_WEIGHT_FORMAT = "trtbuild.weight_format"  # int8 / int7 / uint8 (calibrators/weights.py)
META_CPU_KIND = "trtbuild.ort_cpu_kind"  # the CPU kind an ORT-CPU graph was built for

_DESCRIPTIONS = {
    REFERENCE: "reference Q/DQ semantics (exact quantize/dequantize, float math; ORT's int8 fusion off)",
    ORT_CPU: "ONNX Runtime CPU kernels as they run on this machine (fused int8)",
}


def describe(semantics: str) -> str:
    return _DESCRIPTIONS[semantics]


def session_options(semantics: str = REFERENCE, threads: int | None = None) -> ort.SessionOptions:
    """Quiet CPU session options for ``semantics``."""
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; use one of {SEMANTICS}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's graph-cleanup warnings are not the user's problem
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if semantics == REFERENCE:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def cpu_session(
    model: onnx.ModelProto | str | Path | bytes,
    semantics: str = REFERENCE,
    threads: int | None = None,
    optimized_model_path: str | Path | None = None,
) -> ort.InferenceSession:
    """An ORT CPU session of ``model`` (a ModelProto, serialized bytes or a path) under ``semantics``.
    ``optimized_model_path`` saves the graph ORT will run (to show what it fused)."""
    options = session_options(semantics, threads)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    source: Any = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, Path):
        source = str(source)
    disabled = list(REFERENCE_DISABLED_OPTIMIZERS) if semantics == REFERENCE else None
    return ort.InferenceSession(
        source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set (or replace) metadata_props entries in place."""
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def semantics_for(model: onnx.ModelProto) -> str:
    """How a graph's fidelity must be measured: ``ort-cpu`` for a graph built for ORT's CPU kernels
    (our metadata says so, or a third-party graph with uint8 activations: ORT quantize_static's
    default); ``reference`` for everything else (TensorRT Q/DQ graphs with int8 activations, float graphs,
    where both semantics agree)."""
    target = metadata(model).get(META_TARGET)
    if target is not None:
        return ORT_CPU if target == ORT_CPU else REFERENCE
    zero_point_types = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) >= 3 and node.input[2] in zero_point_types:
            return ORT_CPU if zero_point_types[node.input[2]] == onnx.TensorProto.UINT8 else REFERENCE
    return REFERENCE
