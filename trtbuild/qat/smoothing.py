"""SmoothQuant in QAT: train the smoothed model, so that the graph `qat` exports is the one it trained.

PTQ (calibrators/smoothquant.py) divides an activation by ``s`` per channel -- folded into its producer:
a LayerNorm's gamma/beta (duplicated when its output also feeds a residual Add), GELU's ``* 0.5`` -- and
multiplies each consumer's weight by ``s`` per input channel. In PyTorch the producer cannot absorb 1/s
without also changing the residual it feeds, so the student does it at the consumer: the fake quantizer
sees ``x / s`` and the Linear computes with ``W diag(s)``, fake-quantized per output channel -- the
integers and scales of the smoothed Q/DQ graph. The trained parameter stays ``W`` (unsmoothed); the
fine-tuned export is smoothed again with the very same ``s`` (not re-chosen on new statistics), so the
ranges learned for ``x / s`` belong to the graph that ships.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from calibrators import smooth_groups, smoothquant
from calibrators.graph_index import ensure_node_names
from calibrators.qdq import QdqPlan
from calibrators.smoothquant import SmoothReport
from trtbuild.core.errors import TrtbuildError


@dataclass
class Smoothing:
    report: SmoothReport

    def consumer_scales(self) -> dict[str, np.ndarray]:
        """ONNX MatMul/Gemm node -> the ``s`` its activation input was divided by."""
        return {c.node: s for cand, s in self.report.scales.values() for c in cand.consumers}

    def tensor_scales(self, plan: QdqPlan) -> dict[str, np.ndarray]:
        """Quantized activation tensor of the smoothed graph -> its ``s`` (tensors read by smoothed
        consumers; after a duplicated LayerNorm that is the copy's output, not the group's own tensor)."""
        by_node = self.consumer_scales()
        out: dict[str, np.ndarray] = {}
        for tensor, act in plan.activations.items():
            found = [by_node[n] for n, _ in act.consumers if n in by_node]
            if found:
                out[tensor] = np.asarray(found[0], np.float64)
        return out

    def reapply(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        """``graph`` (the fine-tuned export) smoothed with the same groups and ``s`` as the start."""
        graph = ensure_node_names(graph)
        names = {n.name for n in graph.graph.node}
        missing = [
            c.node for cand, _ in self.report.scales.values() for c in cand.consumers if c.node not in names
        ]
        if missing:
            raise TrtbuildError(
                f"the fine-tuned export has other node names than the first one ({missing[0]} is gone)",
                "export deterministically (same exporter and opset), or run qat with --smooth-quant off",
            )
        return smooth_groups.apply(graph, self.report.scales)


def smooth_graph(
    graph: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    mode: str,
    quantized: set[str],
    seed: int,
    threads: int | None = 1,
) -> tuple[onnx.ModelProto, Smoothing | None]:
    """What `quantize --smooth-quant MODE` does to ``graph`` before calibrating (None: nothing smoothed)."""
    smoothed, report = smoothquant.smooth(graph, batches, mode, quantized, threads=threads, seed=seed)
    return (smoothed, Smoothing(report)) if report.scales else (graph, None)
