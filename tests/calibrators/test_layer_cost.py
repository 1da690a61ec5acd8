"""Compute per layer, in MACs, as the fallback's "how much stays float" measure: exact on hand-built layers
whose shapes only a run can tell (pads from a Constant node, as exports write them), and the published
size of EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators.layer_cost import float_share, layer_macs


def test_macs_are_exact_where_shape_inference_cannot_see_the_shapes() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node(
            "Constant", [], ["pads"], value=numpy_helper.from_array(np.array([0, 0, 1, 1] * 2)), name="c"
        ),
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
        helper.make_node("Conv", ["xp", "w"], ["y"], name="conv"),  # 8 -> 16 channels, 3x3, 10x10 out
        helper.make_node("Flatten", ["y"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g"], ["z"], name="fc", transB=1),  # 1600 -> 10
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 10, 10])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=(16, 8, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=(10, 1600)).astype(np.float32), "g"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    costs = layer_macs(model, {"x": np.zeros((2, 8, 10, 10), np.float32)})
    assert costs == {"conv": 2 * 16 * 10 * 10 * 8 * 9, "fc": 2 * 10 * 1600}
    assert float_share(costs, ["conv"]) == costs["fc"] / sum(costs.values())


def test_efficientnet_lite0_is_about_400_mmacs(effnet_onnx: Path) -> None:
    costs = layer_macs(onnx.load(str(effnet_onnx)), {"images": np.zeros((1, 3, 224, 224), np.float32)})
    assert len(costs) == 50  # 49 convs and the classifier
    assert 370e6 < sum(costs.values()) < 420e6  # published: ~0.4 GMAC (385 M counted here)
