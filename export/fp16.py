"""FP16 graph conversion (what TensorRT 11's strongly typed networks need) and its check in ONNX Runtime.

The conversion (what stays FP32, and the converter's repairs) is trtbuild.core.fp16_graph, shared with
the fidelity gate's near-tie floor; this module writes the file atomically and verifies the result
against the FP32 graph on real inputs.

BF16: no maintained ONNX converter writes BF16 graphs, and ONNX Runtime's CPU provider cannot execute
most ops in BF16, so a BF16 graph could not be verified here. trtbuild therefore supports BF16 only as a
builder flag on TensorRT 9.x/10.x and refuses it on 11.x (see ``trtbuild/plan.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trtbuild.core import metrics
from trtbuild.core.atomic import atomic_path
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.fp16_graph import FP16_BLOCK_LIST, to_fp16
from trtbuild.core.onnx_file import model_name


def fp16_path(onnx_path: str | os.PathLike[str]) -> Path:
    """`engines/m/m.onnx` -> `engines/m/m.fp16.onnx`."""
    path = Path(onnx_path)
    return path.with_name(model_name(path) + ".fp16.onnx")


def convert_fp16(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    op_block_list: tuple[str, ...] = FP16_BLOCK_LIST,
    node_block_list: tuple[str, ...] = (),
) -> Path:
    """Write an FP16 copy of ``onnx_path`` (I/O stay FP32 so callers feed the same tensors); atomic.

    A Q/DQ graph keeps its integer tensors and gets FP16 everywhere else, scales included (the graph a
    strongly typed TensorRT build needs to run its unquantized layers in FP16): Q/DQ on FP16 tensors needs
    opset 19, so older graphs are converted first."""
    src = Path(onnx_path)
    if not src.is_file():
        raise TrtbuildError(f"ONNX file '{src}' does not exist", "check the path")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # protobuf raises several types for a corrupt file
        raise TrtbuildError(
            f"cannot read '{src}' as ONNX ({type(exc).__name__})", "re-export the model"
        ) from exc
    converted = to_fp16(model, op_block_list, node_block_list)
    out = Path(out_path) if out_path is not None else fp16_path(src)
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save(converted, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:  # e.g. Silero VAD: the converter breaks If branches
            first = (str(exc).strip().splitlines() or ["invalid graph"])[0][:200]
            subgraphs = " (it has If/Loop/Scan subgraphs)" if _has_subgraphs(model.graph) else ""
            raise TrtbuildError(
                f"the FP16 converter wrote an invalid graph for {src.name}{subgraphs}: {first}",
                "plan --precision fp32, give --fp16-onnx an FP16 graph you converted, or plan for "
                "TensorRT 10.x, where FP16 is a builder flag on the FP32 graph",
            ) from exc
    return out


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    )


@dataclass(frozen=True)
class Fp16Check:
    """FP16 graph vs FP32 graph on the same inputs, per output (worst output reported)."""

    samples: int
    cosine_min: float  # lowest per-sample cosine similarity of the flattened outputs
    cosine_mean: float
    max_abs_error: float
    rel_error: float  # max |fp16 - fp32| / max |fp32|
    top1_agreement: float | None  # for (batch, classes) outputs: argmax agreement
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verify_fp16(
    fp32_path: str | os.PathLike[str],
    fp16_path_: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    min_cosine: float = 0.999,
    batch: int = 8,
) -> Fp16Check:
    """Run both graphs in ONNX Runtime (CPU) on ``inputs`` and compare their outputs.

    This catches what FP16 weights and FP16 tensors between ops do to accuracy. It cannot catch overflow
    inside an op: ORT's CPU kernels accumulate FP16 reductions in FP32 (a 65536-element FP16 ReduceSum
    of 3.0 returns 196608, not inf), while TensorRT on a GPU computes in FP16. The block list above covers
    those ops structurally; a real engine is compared with ORT in tests/test_trt_gpu.py.
    """
    from trtbuild.core import ort as ort_core

    s32 = ort_core.cpu_session(Path(fp32_path))
    try:
        s16 = ort_core.cpu_session(Path(fp16_path_))
    except Exception as exc:  # ORT's Fail/InvalidGraph: the conversion wrote a graph it cannot load
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrtbuildError(
            f"ONNX Runtime cannot load the FP16 graph converted from {Path(fp32_path).name} ({first})",
            "plan --precision fp32, or give --fp16-onnx an FP16 graph that loads",
        ) from exc
    n = len(next(iter(inputs.values())))
    out32: list[list[np.ndarray]] = []
    out16: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        # inputs without the runs on axis 0 (a scalar, Silero VAD's `state`) are fed whole each run
        feed = {k: v[start : start + batch] if v.ndim and len(v) == n else v for k, v in inputs.items()}
        out32.append([np.asarray(o, dtype=np.float32) for o in s32.run(None, feed)])
        out16.append([np.asarray(o, dtype=np.float32) for o in s16.run(None, feed)])
    cos: list[float] = []
    max_abs = rel = 0.0
    agree: list[float] = []
    for index in range(len(out32[0])):
        a = np.concatenate([o[index] for o in out32]).reshape(n, -1)
        b = np.concatenate([o[index] for o in out16]).reshape(n, -1)
        if not np.isfinite(b).all():
            cos.append(-1.0)
            continue
        cos += metrics.cosine_per_sample(a, b).tolist()  # all-zero vs non-zero scores 0, never 1
        err = metrics.max_abs_error(a, b)
        max_abs = max(max_abs, err)
        rel = max(rel, err / max(float(np.abs(a).max()), 1e-30))
        if a.ndim == 2 and a.shape[1] > 1:
            agree.append(metrics.top1_agreement(a, b))
    cos_min = float(min(cos))
    return Fp16Check(
        samples=n,
        cosine_min=cos_min,
        cosine_mean=float(np.mean(cos)),
        max_abs_error=max_abs,
        rel_error=rel,
        top1_agreement=float(min(agree)) if agree else None,
        passed=cos_min >= min_cosine,
    )
