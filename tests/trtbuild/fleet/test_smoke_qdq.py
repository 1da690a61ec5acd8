"""The bundle smoke record (trtbuild/fleet/smoke.py) of a Q/DQ graph with a Concat and FP16 scales -- what a
strongly typed INT8 plan parses for any model that concatenates quantized branches. ORT's default QDQ
fusion turned it into QLinearConcat, which refuses FP16 scales: `bundle create` crashed with a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from trtbuild.bundle.manifest import Manifest
from trtbuild.fleet.smoke import run_smoke, write_smoke_record

SCALE = 0.05


def _qdq_concat(path: Path) -> None:
    scale = nh.from_array(np.array(SCALE, np.float16), "s")
    zero = nh.from_array(np.array(0, np.int8), "z")

    def qdq(x: str, y: str) -> list[onnx.NodeProto]:
        return [
            oh.make_node("QuantizeLinear", [x, "s", "z"], [f"{x}_q"]),
            oh.make_node("DequantizeLinear", [f"{x}_q", "s", "z"], [y]),
        ]

    nodes = [*qdq("a", "ad"), *qdq("b", "bd"), oh.make_node("Concat", ["ad", "bd"], ["c"], axis=1)]
    nodes += qdq("c", "y")
    inputs = [oh.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 4]) for n in "ab"]
    output = oh.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])
    graph = oh.make_graph(nodes, "qdq_concat", inputs, [output], [scale, zero])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)]), str(path))


def test_smoke_record_of_an_fp16_qdq_concat_runs_the_graph_as_written(tmp_path: Path) -> None:
    _qdq_concat(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    feeds = {n: (rng.standard_normal((1, 4)) * 4).astype(np.float16) for n in "ab"}
    write_smoke_record(tmp_path / "model.onnx", tmp_path, feeds)
    recorded = np.load(tmp_path / "smoke" / "output_0.npy")
    # Q/DQ as the ONNX spec defines it: round half to even, saturate to int8, scale back.
    grid = [np.clip(np.round(feeds[n].astype(np.float32) / SCALE), -128, 127) * SCALE for n in "ab"]
    np.testing.assert_allclose(recorded, np.concatenate(grid, axis=1), rtol=1e-3)
    manifest = Manifest("m", "1", "orin-jp6.1", "int8", {}, {}, {})
    assert "1 output(s) match the recorded run" in run_smoke(tmp_path, manifest)
