"""A strongly typed INT8 build takes every tensor's type from the graph, so its Q/DQ graph must carry FP16
in its float parts (else every unquantized layer runs FP32/TF32). Checked on the real EfficientNet-Lite0
quantized from real photos: the plan parses the FP16-float Q/DQ graph, which is written, checked against
its FP32-float source, and runs in ONNX Runtime with the same answers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.quantize import quantize
from trtbuild import examples
from trtbuild.core import metrics
from trtbuild.core import ort as ort_core
from trtbuild.core.onnx_file import qdq_scale_type
from trtbuild.plan import fp16_qdq_path, make_plan
from trtbuild.plan_graphs import write_plan_graph
from trtbuild.trtexec import command_line


@pytest.fixture(scope="module")
def qdq(effnet_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    photos = examples.write_photo_folder(tmp_path_factory.mktemp("photos"), 16, seed=6)
    out = tmp_path_factory.mktemp("q")
    return quantize(
        effnet_onnx, photos, out, samples=8, holdout=8, min_fidelity=0, show_progress=False
    ).onnx_path


def test_strongly_typed_int8_plan_builds_the_fp16_float_qdq_graph(effnet_onnx: Path, qdq: Path) -> None:
    plan = make_plan(effnet_onnx, "h100", "int8", trt_version="10.13", qdq_onnx=qdq, out_root=str(qdq.parent))
    assert (
        plan.strongly_typed and plan.onnx == str(fp16_qdq_path(qdq)) and plan.onnx.endswith(".int8.fp16.onnx")
    )
    assert any("FP16 float parts" in note for note in plan.notes)
    written = write_plan_graph(plan)
    assert written == Path(plan.onnx) and written.is_file()
    assert f"--onnx={plan.onnx}" in command_line(plan)

    graph = onnx.load(str(written))
    assert qdq_scale_type(graph) == onnx.TensorProto.FLOAT16  # Q/DQ on FP16 tensors
    assert min(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = {i.name: i.data_type for i in graph.graph.initializer}
    float_weights = Counter(
        t for t in inits.values() if t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    )
    assert float_weights[onnx.TensorProto.FLOAT16] > 10 * float_weights[onnx.TensorProto.FLOAT]
    ops = Counter(n.op_type for n in graph.graph.node)
    assert (
        ops["QuantizeLinear"] >= 45
        and ops["Conv"] == Counter(n.op_type for n in onnx.load(str(qdq)).graph.node)["Conv"]
    )
    # The I/O stay FP32 (callers feed the same tensors) and the answers stay the model's.
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    photos = examples.normalize_imagenet(examples.photo_crops(8, seed=9))
    fp32_qdq = ort_core.cpu_session(qdq).run(None, {"images": photos})[0]
    fp16_qdq = ort_core.cpu_session(written).run(None, {"images": photos})[0]
    assert fp16_qdq.dtype == np.float32
    assert metrics.cosine_per_sample(fp32_qdq, fp16_qdq).min() > 0.99
    # Already there: not rewritten.
    stamp = written.stat().st_mtime_ns
    assert write_plan_graph(plan) == written and written.stat().st_mtime_ns == stamp


def test_weakly_typed_and_fp16_qdq_plans_parse_the_graph_as_given(effnet_onnx: Path, qdq: Path) -> None:
    weak = make_plan(effnet_onnx, "a100", "int8", trt_version="8.6", qdq_onnx=qdq, out_root=str(qdq.parent))
    assert not weak.strongly_typed and weak.onnx == str(qdq) and "FP16" in weak.builder_flags
    assert write_plan_graph(weak) is None
    # A Q/DQ graph whose float parts are FP16 already is built as it is.
    typed = make_plan(
        effnet_onnx, "h100", "int8", trt_version="10.13", qdq_onnx=qdq, out_root=str(qdq.parent)
    )
    fp16_graph = write_plan_graph(typed)
    assert fp16_graph is not None
    again = make_plan(
        effnet_onnx, "h100", "int8", trt_version="10.13", qdq_onnx=fp16_graph, out_root=str(qdq.parent)
    )
    assert again.onnx == str(fp16_graph)
