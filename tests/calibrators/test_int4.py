"""INT4 weight-only quantization on real models: MiniLM-L6 (MatMul, opset 17 -> 21) and a torch MLP
exported at opset 13 as Gemm(transB=1) with a Constant-node weight; the memory plan against the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import run_cli
from onnx import TensorProto, helper, numpy_helper
from test_quantize_models import build_minilm_onnx

from calibrators.int4 import quantize_int4
from calibrators.int4.blocks import quantize_blocks
from calibrators.int4.graph import int4_tensor
from trtbuild.core import output_set
from trtbuild.core.errors import TrtbuildError
from trtbuild.memory_plan import activation_peak, weight_bytes
from trtbuild.targets import TARGETS


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    return build_minilm_onnx(tmp_path_factory.mktemp("minilm_int4"))


@pytest.fixture(scope="module")
def minilm_rtn(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    path, samples = minilm
    out = tmp_path_factory.mktemp("rtn")
    result = quantize_int4(path, samples, out, algorithm="rtn", holdout=8, min_fidelity="cosine=0.9")
    return {"result": result, "model": onnx.load(str(result.onnx_path))}


def test_int4_packing_and_rtn_grid_round_trip(minilm: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    model = onnx.load(str(minilm[0]))
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if list(t.dims) == [384, 1536])
    quant = quantize_blocks(weight, 128)
    assert quant.scales.shape == (3, 1536) and quant.codes.min() >= -8 and quant.codes.max() <= 7
    # RTN error is at most half a step of each block
    step = np.repeat(quant.scales, 128, axis=0)
    assert np.all(np.abs(quant.dequantized() - weight) <= step / 2 + 1e-6)
    packed = numpy_helper.to_array(int4_tensor("w", quant.codes))
    np.testing.assert_array_equal(packed.astype(np.int8), quant.codes)


def test_rtn_writes_tensorrt_weight_only_pattern(minilm_rtn: dict) -> None:
    result, model = minilm_rtn["result"], minilm_rtn["model"]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {t.name: t for t in model.graph.initializer}
    dqs = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dqs]
    assert len(matmuls) == len(result.layers) == 36  # 6 layers x (Q, K, V, out, FFN in, FFN out)
    for node in matmuls:
        dq = dqs[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 128}
        assert inits[dq.input[0]].data_type == TensorProto.INT4 and len(dq.input) == 2  # no zero point
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["trtbuild.precision"] == "int4-weights" and meta["trtbuild.int4.block_size"] == "128"
    assert result.int4_weight_bytes <= result.fp32_weight_bytes / 7
    assert output_set.verify(result.report_path) == []
    report = json.loads(result.report_path.read_text())
    assert report["fidelity"]["samples"] == 8 and report["fidelity"]["semantics"] == "reference"


@pytest.mark.slow  # two calibrated quantizations of MiniLM: 60-160 s on 2 busy cores
def test_awq_and_gptq_beat_rtn_on_held_out_sentences(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], minilm_rtn: dict, tmp_path: Path
) -> None:
    path, samples = minilm
    rtn_cos = minilm_rtn["result"].fidelity.outputs[0].cosine
    for algorithm in ("awq", "gptq"):
        result = quantize_int4(
            path, samples, tmp_path / algorithm, algorithm=algorithm, holdout=8, min_fidelity="cosine=0.9"
        )
        assert result.calibration_samples == 16
        # on the calibration rows every layer's output error is below RTN's
        assert all(layer.error is not None and layer.error_rtn is not None for layer in result.layers)
        assert all(layer.error <= layer.error_rtn for layer in result.layers)  # type: ignore[operator]
        # and on held-out sentences the embedding follows FP32 more closely
        assert result.fidelity.outputs[0].cosine > rtn_cos, algorithm
        if algorithm == "awq":  # BERT's LayerNorm outputs also feed residual Adds: 1/s stays a Mul
            assert {layer.input_scale for layer in result.layers} == {"mul"}


def test_gemm_transb_opset13_with_constant_weight(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(
        mlp,
        (torch.randn(2, 256),),
        str(path),
        opset_version=13,
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}},
    )
    model = onnx.load(str(path))
    first = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(t for t in model.graph.initializer if t.name == first.input[1])
    model.graph.initializer.remove(weight)  # third-party style: the weight as a Constant node
    model.graph.node.insert(0, helper.make_node("Constant", [], [first.input[1]], value=weight))
    odd = tmp_path / "odd name.onnx"
    onnx.save(model, str(odd))
    data = list(np.random.default_rng(0).standard_normal((40, 1, 256)).astype(np.float32))
    result = quantize_int4(odd, data, tmp_path / "out", algorithm="gptq", holdout=8, min_fidelity="top1=0.5")
    written = onnx.load(str(result.onnx_path))
    dqs = [n for n in written.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and all(
        helper.get_attribute_value(a) == 1 for d in dqs for a in d.attribute if a.name == "axis"
    )  # Gemm transB=1 stores [N, K]: blocks along axis 1
    assert result.layers[0].k == 256 and result.layers[1].k == 128


def test_bad_block_size_and_no_matmul_are_one_line_errors(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, samples = minilm
    data = tmp_path / "tokens.npz"
    np.savez(data, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "quantize",
            str(path),
            "--data",
            str(data),
            "--precision",
            "int4-weights",
            "--block-size",
            "100",
            "--out-dir",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and err.count("error:") == 1 and "--block-size 100 does not divide" in err
    assert "Traceback" not in err and not out.exists()
    conv = tmp_path / "conv.onnx"
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(conv))
    np.save(tmp_path / "x.npy", np.ones((4, 3, 8, 8), np.float32))
    code, _, err = run_cli(
        [
            "quantize",
            str(conv),
            "--data",
            str(tmp_path / "x.npy"),
            "--precision",
            "int4-weights",
            "--out-dir",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and err.count("error:") == 1 and "no MatMul/Gemm" in err and not out.exists()
    code, stdout, _ = run_cli(
        [
            "quantize",
            str(path),
            "--data",
            str(data),
            "--precision",
            "int4-weights",
            "--int4-algorithm",
            "rtn",
            "--holdout",
            "8",
            "--min-fidelity",
            "cosine=0.9",
            "--out-dir",
            str(out),
            "--json",
        ],
        capsys,
    )
    summary = json.loads(stdout)
    assert code == 0 and summary["precision"] == "int4-weights" and summary["algorithm"] == "rtn"
    assert sorted(p.name for p in out.iterdir()) == ["minilm.int4.json", "minilm.int4.onnx"]


def test_memory_plan_matches_files_and_plan_refuses(
    minilm: tuple[Path, list[dict[str, np.ndarray]]],
    minilm_rtn: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = minilm[0]
    fp32_bytes = weight_bytes(onnx.load(str(path)), "fp32")
    assert abs(fp32_bytes - path.stat().st_size) / path.stat().st_size < 0.02
    int4_path = minilm_rtn["result"].onnx_path
    as_written = weight_bytes(minilm_rtn["model"], "int4-weights", float_bytes=4)
    assert abs(as_written - int4_path.stat().st_size) / int4_path.stat().st_size < 0.05
    assert weight_bytes(onnx.load(str(path)), "int4-weights") < fp32_bytes / 3  # FP16 embedding table stays
    peak_small = activation_peak(onnx.load(str(path)), {"input_ids": (1, 24), "attention_mask": (1, 24)})
    peak_big = activation_peak(onnx.load(str(path)), {"input_ids": (8, 96), "attention_mask": (8, 96)})
    assert not peak_big.unknown and peak_big.bytes > 20 * peak_small.bytes  # 32x tokens, quadratic attention

    shapes = ["--shape", "input_ids:1x24,8x128,4096x512", "--shape", "attention_mask:1x24,8x128,4096x512"]
    code, _, err = run_cli(
        ["plan", str(path), "-t", "xavier-jp5", "-p", "fp16", *shapes, "--out", str(tmp_path / "eng")], capsys
    )
    assert code == 2 and "does not fit xavier-jp5" in err and err.count("error:") == 1
    code, _, err = run_cli(
        [
            "plan",
            str(path),
            "-t",
            "xavier-jp5",
            "-p",
            "int4-weights",
            "--qdq-onnx",
            str(int4_path),
            *shapes,
            "--out",
            str(tmp_path / "eng"),
        ],
        capsys,
    )
    assert code == 2 and "sm80+" in err
    code, out, _ = run_cli(
        [
            "targets",
            "--model",
            str(path),
            "--shape",
            "input_ids:1x24,8x128,64x128",
            "--shape",
            "attention_mask:1x24,8x128,64x128",
            "--json",
        ],
        capsys,
    )
    rows = json.loads(out)
    assert code == 0 and {r["target"] for r in rows} == set(TARGETS)
    assert not any(
        r["precision"] == "int4-weights" for r in rows if r["target"] in ("xavier-jp5", "orin-jp6.0")
    )
    assert all(r["fits"] for r in rows)


def test_onnxruntime_activation_model_matches_measured_peak(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], minilm_rtn: dict
) -> None:
    """The "onnxruntime" activation model (ORT's execution order, its Where temporaries, the dequantized
    weights it materialises) within 10 % of the peak a fresh ORT process measures, as the bench does."""
    from bench.bench_int4 import rss_delta

    path, int4_path = minilm[0], minilm_rtn["result"].onnx_path
    float_model = onnx.load(str(path))
    shapes = {"input_ids": (8, 64), "attention_mask": (8, 64)}
    spec = {name: ("int64", [[1, 8], list(dims)]) for name, dims in shapes.items()}
    peaks = {}
    for label, graph in (("fp32", path), ("int4", int4_path)):
        model = onnx.load(str(graph))
        ort_peak = activation_peak(model, shapes, runtime="onnxruntime", shapes_from=float_model)
        trt_peak = activation_peak(model, shapes, runtime="tensorrt", shapes_from=float_model)
        assert not ort_peak.unknown and not trt_peak.unknown
        measured = rss_delta(graph, spec)
        assert abs(ort_peak.bytes / measured - 1) < 0.10, (label, ort_peak.bytes, measured)
        peaks[label] = (ort_peak.bytes, trt_peak.bytes)
    # TensorRT fuses the weight DequantizeLinear into the GEMM: its INT4 peak is the FP32 one; ORT runs
    # every weight's DequantizeLinear early and holds most of the FP32 MatMul weights (~40 MiB) at once.
    assert peaks["int4"][1] == peaks["fp32"][1]
    assert peaks["int4"][0] - peaks["fp32"][0] > 20 * 2**20
    with pytest.raises(TrtbuildError, match="runtime 'tvm'"):
        activation_peak(float_model, shapes, runtime="tvm")
