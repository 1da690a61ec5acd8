"""How much each weight layer's INT4 rounding moves the model's outputs (the fallback's "global"
sensitivity, for one layer's weight at a time): sum over outputs of |y_l - y|^2 / |y|^2, where y_l is the
FP32 model with only layer l's weight round-to-nearest INT4 at its block size.

A layer's local noise |X (Q(W) - W)|^2 / |X W|^2 does not say how far it travels: on MiniLM the query/key
projections have the same local noise as the FFN but move the embedding 10x less (softmax damps them), so
a byte budget spent by local noise goes to the wrong layers (docs/int4-weight-only.md). Here the weights
become graph inputs (ONNX Runtime takes an initializer that is also a graph input as overridable), so one
session runs every layer's probe: one forward pass of a few samples per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from calibrators import fidelity
from calibrators.int4.blocks import quantize_blocks
from calibrators.int4.graph import WeightLayer, weight_kn

SAMPLES = 8  # calibration samples per probe: a ranking, not a gate


def _with_weight_inputs(model: onnx.ModelProto, layers: Sequence[WeightLayer]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inits = {t.name: t for t in probe.graph.initializer}
    listed = {i.name for i in probe.graph.input}
    for layer in layers:
        if layer.weight not in listed:
            t = inits[layer.weight]
            probe.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return probe


def output_noise(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    batches: Sequence[Mapping[str, np.ndarray]],
    block: int,
    threads: int | None = None,
) -> dict[str, float]:
    """Per layer: the outputs' relative squared error with that layer alone RTN INT4 at ``block``."""
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    session = fidelity.session(_with_weight_inputs(model, layers), threads)
    reference = fidelity.run_batches(session, [dict(b) for b in batches])
    energy = {n: max(float(np.sum(np.square(v, dtype=np.float64))), 1e-30) for n, v in reference.items()}
    noise = {}
    for layer in layers:
        q = quantize_blocks(weight_kn(model, layer), block).dequantized()
        stored = np.ascontiguousarray(q.T if layer.transposed else q, dtypes[layer.weight])
        test = fidelity.run_batches(session, [{**b, layer.weight: stored} for b in batches])
        noise[layer.node] = sum(
            float(np.sum(np.square(test[name] - ref, dtype=np.float64))) / energy[name]
            for name, ref in reference.items()
        )
    return noise
