"""INT4 on third-party-style graphs found by the FP8/INT4 robustness sweep (issue #11): each case once
crashed or wrote a wrong graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli
from onnx import TensorProto, helper, numpy_helper

from calibrators.graph_index import ensure_node_names
from trtbuild.core.ort import cpu_session
from trtbuild.memory_plan import weight_bytes


def _save(path: Path, nodes: list, inits: list, opset: int = 13) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


@pytest.mark.parametrize("precision", ["int4-weights", "int4-weights,int8"])
def test_model_onnxruntime_cannot_load_is_one_error_line(
    precision: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch's dynamo exporter names the embedding Gather's output after the graph output when the user
    # passes output_names=["embedding"] for a BERT: two definitions of one name, which ORT refuses. The
    # INT4 paths built their first session deep in the pipeline and died with ORT's traceback.
    weight = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    path = _save(
        tmp_path / "dup.onnx",
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["x"], ["y"])],
        [weight],
    )
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((24, 64)).astype(np.float32))
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["quantize", str(path), "--data", str(tmp_path / "x.npy"), "--precision", precision]
        + ["--int4-algorithm", "rtn", "--block-size", "32", "--out-dir", str(out)],
        capsys,
    )
    assert code == 2 and err.count("error:") == 1, err
    assert "ONNX Runtime cannot load the model" in err and "Duplicate definition" in err
    assert "Traceback" not in err and not out.exists()


def _mlp(path: Path, initializers_as_inputs: bool) -> Path:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), name)
        for name in ("w1", "w2")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    _save(path, nodes, inits)
    if initializers_as_inputs:  # as old exporters wrote them (IR 3, keep_initializers_as_inputs=True)
        model = onnx.load(str(path))
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits)
        model.ir_version = 3
        onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("precision", ["int4-weights", "fp8", "int8", "int4-weights,int8"])
def test_initializers_listed_as_inputs_are_weights(
    precision: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The quantized graph kept 'w1'/'w2' as graph inputs after their initializers became INT4/FP8, so
    # ONNX Runtime demanded them as feeds (a traceback in the gate); now they are dropped on load.
    path = _mlp(tmp_path / "old.onnx", initializers_as_inputs=True)
    x = np.random.default_rng(1).standard_normal((48, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["quantize", str(path), "--data", str(tmp_path / "x.npy"), "--precision", precision]
        + (["--int4-algorithm", "rtn", "--block-size", "32"] if precision.startswith("int4") else [])
        + ["--min-fidelity", "y:cosine=0.9", "--holdout", "16", "--out-dir", str(out)],
        capsys,
    )
    assert code == 0 and "Traceback" not in err, err
    written = next(p for p in out.iterdir() if p.suffix == ".onnx")
    model = onnx.load(str(written))
    assert [i.name for i in model.graph.input] == ["x"]
    # reference semantics: ORT's ReluQuantRewrite would drop the Relu before an FP8 Q (docs/fp8.md)
    float_y = cpu_session(path).run(None, {"x": x})[0]
    y = cpu_session(written).run(None, {"x": x})[0]
    cosine = float(np.sum(y * float_y) / np.linalg.norm(y) / np.linalg.norm(float_y))
    assert cosine > 0.9, cosine


def test_memory_plan_counts_constant_node_weights(tmp_path: Path) -> None:
    # Third-party exports (the demo's EfficientNet-Lite0 variant too) hold every weight in a Constant
    # node: the memory plan read only initializers and planned 0 weight bytes for a 17.8 MB file.
    path = _mlp(tmp_path / "inits.onnx", initializers_as_inputs=False)
    model = onnx.load(str(path))
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.node.insert(0, consts[1])
    model.graph.node.insert(0, consts[0])
    const_path = tmp_path / "consts.onnx"
    onnx.save(model, str(const_path))
    as_stored = weight_bytes(onnx.load(str(const_path)), "fp32", float_bytes=4)
    assert abs(as_stored - const_path.stat().st_size) < 0.05 * const_path.stat().st_size
    for precision in ("fp32", "fp16", "int8", "int4-weights"):
        assert weight_bytes(model, precision, block=32) == weight_bytes(
            onnx.load(str(path)), precision, block=32
        )


@pytest.mark.parametrize(
    ("precision", "flags", "named"),
    [
        ("int4-weights", ["--report"], "--report"),
        ("int4-weights,int8", ["--report", "--method", "minmax"], "--method, --report"),
        (
            "int4-weights",
            ["--exclude-op-type", "Gemm", "--rounding", "learned"],
            "--exclude-op-type, --rounding",
        ),
        ("fp8", ["--block-size", "32", "--weight-budget", "1/7"], "--block-size, --weight-budget"),
        ("int8", ["--int4-algorithm", "gptq"], "--int4-algorithm"),
    ],
)
def test_options_the_precision_ignores_are_refused(
    precision: str, flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # These were accepted and silently ignored: `--report` with int4-weights wrote no report,
    # `--exclude-op-type Gemm` quantized the Gemms anyway, `--weight-budget` with fp8 did nothing.
    path = _mlp(tmp_path / "m.onnx", initializers_as_inputs=False)
    np.save(tmp_path / "x.npy", np.zeros((24, 64), np.float32))
    out = tmp_path / "out"
    argv = ["quantize", str(path), "--data", str(tmp_path / "x.npy"), "--precision", precision, *flags]
    code, _, err = run_cli([*argv, "--out-dir", str(out)], capsys)
    assert code == 2 and err.count("error:") == 1 and f"{named} do" in err, err
    assert f"not apply to --precision {precision}" in err and not out.exists()


def test_given_node_names_survive_next_to_unnamed_nodes() -> None:
    # an unnamed Gemm at index 1 would be called "Gemm_1", which the file gives the last Gemm
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Gemm", ["a", "w"], ["b"]),
        helper.make_node("Gemm", ["b", "w"], ["y"], name="Gemm_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    named = ensure_node_names(helper.make_model(graph))
    names = [n.name for n in named.graph.node]
    assert names[0] == "first" and names[2] == "Gemm_1" and names[1] not in ("", "Gemm_1")
    assert len(set(names)) == 3


def test_matmuls_left_float_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A weight read twice, a weight also read by an Add, a weight as MatMul's FIRST input: all stay
    # float (TensorRT's weight-only pattern is one DequantizeLinear into one GEMM's B) -- and the
    # report used to list only the INT4 layers, so these passed for INT4.
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), name)
        for name in ("w1", "shared", "wt", "both")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="int4"),
        helper.make_node("MatMul", ["h", "shared"], ["a"], name="shared_a"),
        helper.make_node("MatMul", ["a", "shared"], ["b"], name="shared_b"),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
        helper.make_node("MatMul", ["wt", "bt"], ["ct"], name="weight_first"),
        helper.make_node("Transpose", ["ct"], ["c"], perm=[1, 0]),
        helper.make_node("MatMul", ["c", "both"], ["d"], name="also_added"),
        helper.make_node("ReduceMean", ["both"], ["m"], axes=[0], name="add"),
        helper.make_node("Add", ["d", "m"], ["y"]),
    ]
    path = _save(tmp_path / "m.onnx", nodes, inits)
    np.save(tmp_path / "x.npy", rng.standard_normal((24, 64)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["quantize", str(path), "--data", str(tmp_path / "x.npy"), "--precision", "int4-weights"]
    argv += ["--int4-algorithm", "rtn", "--block-size", "32", "--min-fidelity", "y:cosine=0.9"]
    code, stdout, err = run_cli([*argv, "--holdout", "8", "--out-dir", str(out), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert [layer["node"] for layer in summary["layers"]] == ["int4"]
    assert {k["node"]: k["reason"] for k in summary["kept_float"]} == {
        "shared_a": "the weight is also read by shared_b",
        "shared_b": "the weight is also read by shared_a",
        "weight_first": "the weight is the first input",
        "also_added": "the weight is also read by add",
    }
    written = json.loads((out / "m.int4.json").read_text())
    assert written["kept_float"] == summary["kept_float"]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_model_that_fails_on_the_data_is_one_error_line(
    precision: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # y = x @ w + w only broadcasts for a batch of 64 rows: the FP32 reference run on the held-out
    # batches raised ORT's traceback
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["d"]), helper.make_node("Add", ["d", "w"], ["y"])]
    path = _save(tmp_path / "bad.onnx", nodes, [w])
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((24, 64)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["quantize", str(path), "--data", str(tmp_path / "x.npy"), "--precision", precision]
    code, _, err = run_cli([*argv, "--holdout", "8", "--out-dir", str(out)], capsys)
    assert code == 2 and err.count("error:") == 1 and "cannot run the FP32 model" in err, err
    assert "Traceback" not in err and not out.exists()


def test_weight_first_matmul_is_reported_as_such_in_fp8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # MatMul(W, x^T) was reported as an "attention score MatMul (both inputs activations ...)"
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), n)
        for n in ("w1", "wt")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="plain"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0]),
        helper.make_node("MatMul", ["wt", "ht"], ["yt"], name="weight_first"),
        helper.make_node("Transpose", ["yt"], ["y"], perm=[1, 0]),
    ]
    path = _save(tmp_path / "m.onnx", nodes, inits)
    np.save(tmp_path / "x.npy", rng.standard_normal((24, 64)).astype(np.float32))
    argv = ["quantize", str(path), "--data", str(tmp_path / "x.npy"), "--precision", "fp8", "--json"]
    argv += ["--min-fidelity", "y:cosine=0.9", "--holdout", "8", "--out-dir", str(tmp_path / "out")]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    reasons = {f["node"]: f["reason"] for f in json.loads(stdout)["float_layers"]}
    assert reasons["weight_first"].startswith("the weight is the first input") and "plain" not in reasons
