"""Run a graph piece by piece, so awq-gptq sees each layer group's inputs from the quantized prefix in
one forward pass in all (was: one full pass of the whole model per group).

The graph's nodes are in topological order. Group g reads activation A_g, made by node p_g; groups are
visited in the order of p_g. Before group g is fitted, the nodes (p_{g-1}, p_g] run on the tensors still
alive at p_{g-1} (kept per calibration batch), with every group before g already holding its quantized
weight. A node reading a quantized weight lies after its group's p, so it runs in a later piece with the
weight already set: A_g comes out exactly as a full pass of the partly quantized model computes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators import fidelity
from calibrators.int4.rows import real_token_rows, sample_rows

Feeds = Mapping[str, np.ndarray]


def _read_names(node: onnx.NodeProto) -> set[str]:
    """Tensors a node reads: its inputs and the outer-scope names its subgraphs (If/Loop/Scan) use."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names |= _read_names(inner)
    return names


class SegmentRunner:
    """The calibration batches pushed through ``model`` up to each requested activation in turn."""

    def __init__(
        self, model: onnx.ModelProto, batches: Iterable[Feeds], threads: int | None, seed: int
    ) -> None:
        self.model = model
        self.threads = threads
        self.seed = seed
        self.nodes = list(model.graph.node)
        self.reads = [_read_names(node) for node in self.nodes]
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.last_use: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                self.last_use[name] = i
        for output in model.graph.output:
            self.last_use[output.name] = len(self.nodes)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.batches = [dict(b) for b in batches]
        # tensors alive after node self.done, per batch (the graph inputs to begin with)
        self.state: list[dict[str, np.ndarray]] = [dict(b) for b in self.batches]
        self.done = -1

    def position(self, activation: str) -> int:
        """Index of the node making ``activation`` (-1 for a graph input): the visiting order."""
        return self.producer.get(activation, -1)

    def rows(self, activation: str, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """``activation``'s calibration rows (real tokens, sampled as pipeline.collect_inputs does) with the
        initializers in ``weights`` replaced; activations must be asked for in graph order."""
        end = self.position(activation)
        if end < self.done:
            raise ValueError(f"{activation} is made before the last activation asked for: ask in graph order")
        if end > self.done:
            self._advance(end, weights)
        chunks = [
            real_token_rows(np.asarray(state[activation], np.float32), batch)
            for state, batch in zip(self.state, self.batches, strict=True)
        ]
        return sample_rows(chunks, self.seed)

    def _advance(self, end: int, weights: Mapping[str, np.ndarray]) -> None:
        start = self.done + 1
        nodes = self.nodes[start : end + 1]
        made = {out for node in nodes for out in node.output if out}
        read = set().union(*self.reads[start : end + 1])
        inputs = sorted(name for name in read - made if name not in self.initializers)
        outputs = sorted(name for name in made if self.last_use.get(name, -1) > end)
        inits = [
            numpy_helper.from_array(np.asarray(weights[name]), name)
            if name in weights
            else self.initializers[name]
            for name in sorted(read & self.initializers.keys())
        ]
        first = self.state[0]
        dtype = {n: helper.np_dtype_to_tensor_dtype(first[n].dtype) for n in inputs}
        graph = helper.make_graph(
            nodes,
            "segment",
            [helper.make_tensor_value_info(n, dtype[n], None) for n in inputs],
            [helper.make_empty_tensor_value_info(n) for n in outputs],
            inits,
        )
        model = self.model
        piece = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        piece.functions.extend(self.model.functions)
        session = fidelity.session(piece, self.threads) if outputs else None
        for state in self.state:
            values = session.run(outputs, {n: state[n] for n in inputs}) if session else []
            state.update(zip(outputs, values, strict=True))
            for name in [n for n in state if self.last_use.get(n, -1) <= end]:
                del state[name]
        self.done = end


def order_groups(runner: SegmentRunner, activations: Sequence[str]) -> list[str]:
    """Activations in the order their producers run (stable for ties)."""
    return sorted(activations, key=runner.position)
