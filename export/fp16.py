"""FP16 graph conversion (what TensorRT 11's strongly typed networks need) and its check in ONNX Runtime.

The conversion itself is onnxconverter-common's maintained float16 converter; this module picks what
stays FP32 and verifies the result against the FP32 graph on real inputs.

BF16: no maintained ONNX converter writes BF16 graphs, and ONNX Runtime's CPU provider cannot execute
most ops in BF16, so a BF16 graph could not be verified here. trtbuild therefore supports BF16 only as a
builder flag on TensorRT 9.x/10.x and refuses it on 11.x (see ``trtbuild/plan.py``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxconverter_common import float16

from trtbuild.core import metrics
from trtbuild.core.atomic import atomic_path
from trtbuild.core.errors import TrtbuildError

# Kept in FP32 on top of the converter's defaults (which already block index/coordinate ops such as
# Resize, Range, TopK, NonMaxSuppression, RoiAlign, CumSum: FP16 represents integers exactly only up to
# 2048, so sizes, indices and box coordinates would be rounded):
# - sums and products over many elements overflow FP16's 65504 maximum (ReduceSum/SumSquare/L2/Prod,
#   LogSumExp), and Pow is mostly x**2 in variance computations, which overflows for |x| > 256.
FP16_BLOCK_LIST: tuple[str, ...] = (
    *float16.DEFAULT_OP_BLOCK_LIST,
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceProd",
    "ReduceLogSumExp",
    "Pow",
)


def fp16_path(onnx_path: str | os.PathLike[str]) -> Path:
    """`engines/m/m.onnx` -> `engines/m/m.fp16.onnx`."""
    path = Path(onnx_path)
    return path.with_name(path.name.split(".")[0] + ".fp16.onnx")


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
    model = _opset_for_fp16_qdq(model)
    with warnings.catch_warnings():  # one warning per tiny weight clamped to FP16's range: noise
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(op_block_list),
            node_block_list=list(node_block_list),
        )
    _restore_float_outputs(model, converted)
    _cast_to_declared_fp16(converted)
    out = Path(out_path) if out_path is not None else fp16_path(src)
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save(converted, str(tmp))
        onnx.checker.check_model(str(tmp))
    return out


def _cast_to_declared_fp16(model: onnx.ModelProto) -> None:
    """The converter declares a converted Cast(to=FLOAT)'s output FP16 but leaves ``to`` at FLOAT (e.g.
    BERT's attention-mask Cast), which ONNX Runtime refuses to load: make ``to`` what is declared."""
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    outputs = {o.name for o in model.graph.output}  # FP32 by _restore_float_outputs: their Casts stay FLOAT
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        if declared.get(node.output[0]) != onnx.TensorProto.FLOAT16:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16


QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float16 inputs and scales from opset 19


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _opset_for_fp16_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QDQ_FP16_OPSET)
    if not has_qdq(model) or opset >= QDQ_FP16_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, QDQ_FP16_OPSET)
    except Exception as exc:  # the converter raises its own and onnx's error types
        raise TrtbuildError(
            f"the Q/DQ graph (opset {opset}) could not be converted to opset {QDQ_FP16_OPSET} for FP16 "
            f"Q/DQ ({str(exc).splitlines()[0][:200]})",
            "quantize an opset 19+ export, or build weakly typed (TensorRT 8.x/10.x with flags)",
        ) from exc


def _restore_float_outputs(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Work around an onnxconverter-common 1.16 bug: when a blocked (FP32) node produces a graph output,
    keep_io_types is ignored and the output is cast to FP16, so a sum kept in FP32 to avoid overflow
    still overflows at the very end. Make such outputs FP32 again."""
    float_outputs = {
        o.name for o in original.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    producers = {name: node for node in converted.graph.node for name in node.output}
    for output in converted.graph.output:
        tensor_type = output.type.tensor_type
        if output.name not in float_outputs or tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(output.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:  # its input is the blocked node's FP32 result: cast to FP32 instead
                if attr.name == "to":
                    attr.i = onnx.TensorProto.FLOAT
        else:
            fp16_name = output.name + "_fp16"
            for n in converted.graph.node:
                n.output[:] = [fp16_name if o == output.name else o for o in n.output]
            converted.graph.node.append(
                onnx.helper.make_node(
                    "Cast",
                    [fp16_name],
                    [output.name],
                    to=onnx.TensorProto.FLOAT,
                    name=output.name + "_to_fp32",
                )
            )
        tensor_type.elem_type = onnx.TensorProto.FLOAT


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
    s16 = ort_core.cpu_session(Path(fp16_path_))
    n = len(next(iter(inputs.values())))
    out32: list[list[np.ndarray]] = []
    out16: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        feed = {k: v[start : start + batch] for k, v in inputs.items()}
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
