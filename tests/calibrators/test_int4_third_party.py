"""INT4 on third-party-style graphs found by the FP8/INT4 robustness sweep (issue #11): each case once
crashed or wrote a wrong graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli
from onnx import TensorProto, helper, numpy_helper


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
