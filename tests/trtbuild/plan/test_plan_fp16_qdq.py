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


def test_a_qdq_graph_that_drifts_in_fp16_is_refused_with_a_flag_that_builds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PP-OCRv4's CTC reader (third-party, opset 12): its Q/DQ graph's float parts drift in FP16 (min
    cosine < 0.99 on the plan's seeded inputs), so the strongly typed plan refuses the derived graph, names
    --high-precision fp32, and with it parses the Q/DQ graph as given (unquantized layers FP32)."""
    from cli_helpers import run_cli
    from test_quantize_models import REC_MEMBER, fetch_rapidocr_onnx, make_text_lines

    from calibrators.calibrate import compute_ranges
    from calibrators.collect import collect
    from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations
    from calibrators.quantize import upgrade_opset
    from trtbuild.core.inputs import parse_profile_spec

    model = upgrade_opset(onnx.load(str(fetch_rapidocr_onnx(REC_MEMBER))))
    source = tmp_path / "rec.onnx"
    onnx.save(model, str(source))
    lines = make_text_lines(8)
    ranges = compute_ranges(
        collect(model, [{"x": lines}], tensors=quantizable_activations(model), show_progress=False), "mse"
    )
    qdq = tmp_path / "rec.int8.onnx"
    onnx.save(apply_qdq(model, plan_qdq(model, ranges, QdqOptions())), str(qdq))
    out_root = str(tmp_path / "e")
    args = ["plan", str(source), "-t", "h100", "-p", "int8", "--qdq-onnx", str(qdq), "--out", out_root]
    args += ["--shape", "x:1x3x48x160,8x3x48x320,32x3x48x640"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and err.count("error:") == 1 and "--high-precision fp32" in err, err
    assert not fp16_qdq_path(qdq).exists() and not list((tmp_path / "e").rglob("*.plan.json"))
    code, out, err = run_cli([*args, "--high-precision", "fp32", "--json"], capsys)
    assert code == 0, err
    shapes = [parse_profile_spec(args[-1])]
    plan = make_plan(
        source, "h100", "int8", qdq_onnx=qdq, high_precision="fp32", shapes=shapes, out_root=out_root
    )
    assert plan.strongly_typed and plan.onnx == str(qdq) and write_plan_graph(plan) is None
    assert any("unquantized ones in FP32" in note for note in plan.notes)
