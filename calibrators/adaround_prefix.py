"""The quantized prefix for learned rounding, run incrementally (calibrators/adaround.py).

Layer k's inputs must come from the graph with layers 0..k-1 already learned. Re-running that prefix from
the network inputs before every layer costs ~layers/2 full forward passes; instead this keeps the tensors on
the frontier (computed tensors that nodes not yet run still read) and runs only the nodes between them and
the next layer's input. A cached tensor never goes stale: it is an ancestor of an earlier layer's input, so
(graph order being topological) it cannot depend on that layer's or any later layer's weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from trtbuild.core import ort as ort_core


class PrefixRunner:
    """Values of tensors of successive quantized graphs (same topology, weights learned so far)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], threads: int | None) -> None:
        self.feeds = [{k: np.asarray(v) for k, v in batch.items()} for batch in feeds]
        self.threads = threads
        self.cache: list[dict[str, np.ndarray]] = [dict(batch) for batch in self.feeds]
        self.done: set[str] = set()  # the nodes already run (by _key)

    def run(self, model: onnx.ModelProto, tensors: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """``tensors`` per feed batch, running only the nodes not covered by the cache."""
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for n in model.graph.node
            for a in n.attribute
        ):
            # Subgraphs read outer tensors without listing them: no cut is safe, run from the inputs.
            self.cache = [dict(batch) for batch in self.feeds]
            self.done = set()
        nodes = _needed(model, tensors, set(self.cache[0]))
        if not nodes:
            return [{t: c[t] for t in tensors} for c in self.cache]
        self.done |= {_key(n) for n in nodes}
        consumers = _consumers(model)
        produced = [o for n in nodes for o in n.output if o]
        # Keep what a node not yet run still reads (the frontier), plus the tensors asked for.
        keep = [t for t in produced if t in tensors or any(c not in self.done for c in consumers.get(t, ()))]
        sub = _subgraph(model, nodes, self.cache[0], keep)
        sess = ort_core.cpu_session(sub, ort_core.REFERENCE, self.threads)
        feed_names = [i.name for i in sub.graph.input]
        out: list[dict[str, np.ndarray]] = []
        for cached in self.cache:
            values = dict(zip(keep, sess.run(keep, {k: cached[k] for k in feed_names}), strict=True))
            cached.update(values)
            out.append({t: cached[t] for t in tensors})
        self._evict(model, consumers)
        return out

    def _evict(self, model: onnx.ModelProto, consumers: Mapping[str, list[str]]) -> None:
        inputs = {i.name for i in model.graph.input}
        for cached in self.cache:
            for t in list(cached):
                if t not in inputs and all(c in self.done for c in consumers.get(t, ())):
                    del cached[t]


def _consumers(model: onnx.ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(_key(n))
    for o in model.graph.output:
        out.setdefault(o.name, []).append("")  # a graph output is read by no node: never evicted
    return out


def _key(node: onnx.NodeProto) -> str:
    """A node's identity across rebuilds of the graph (names may be empty; output names are unique)."""
    return "\0".join(node.output)


def _needed(model: onnx.ModelProto, tensors: Sequence[str], have: set[str]) -> list[onnx.NodeProto]:
    """The nodes (in graph order) that compute ``tensors`` from ``have`` and the initializers."""
    producer = {o: n for n in model.graph.node for o in n.output}
    needed: set[int] = set()
    stack = list(tensors)
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if t in seen or t in have or node is None:
            continue
        seen.add(t)
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    return [n for n in model.graph.node if id(n) in needed]


def _subgraph(
    model: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    values: Mapping[str, np.ndarray],
    outputs: list[str],
) -> onnx.ModelProto:
    produced = {o for n in nodes for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    reads = dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced)
    graph = helper.make_graph(
        list(nodes),
        "adaround_prefix",
        [
            helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(values[t].dtype), None)
            for t in reads
            if t not in inits
        ],
        [helper.make_empty_tensor_value_info(t) for t in outputs],
        [inits[t] for t in reads if t in inits],
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return sub
