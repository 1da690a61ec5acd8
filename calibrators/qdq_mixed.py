"""Mixed INT8 / FP8 per layer (`--precision int8,fp8`): one Q/DQ graph, INT8 everywhere, FP8 (E4M3) on the
layers whose INT8 error the gate cannot take.

TensorRT's strongly typed builds (Ada/Hopper/Blackwell, docs/fp8.md) take each layer's precision from its
own Q/DQ, so a graph may mix INT8 and FP8 layers. The merged plan is two ordinary plans over the same graph:
the INT8 plan with the FP8 layers kept out of it, and the FP8 plan holding only those layers. A tensor read
by layers of both precisions gets one Q/DQ pair per precision (each consumer rewired to its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from calibrators import weights as wq
from calibrators.qdq_scales import GraphCache, plan_qdq
from calibrators.qdq_types import QdqOptions, QdqPlan
from calibrators.ranges import TensorRange

FP8_REASON = "runs in FP8 (--precision int8,fp8: its INT8 error is what the gate cannot take)"
FP8_KEY_SUFFIX = "@fp8"  # plan key of an FP8 Q/DQ on a tensor that also has an INT8 one


@dataclass
class MixedPlanner:
    """Plans with a chosen set of layers in FP8 and the rest in INT8 (one graph cache, both range sets)."""

    cache: GraphCache
    int8_ranges: Mapping[str, TensorRange]
    fp8_ranges: Mapping[str, TensorRange]  # the same collection's ranges on the E4M3 grid
    options: QdqOptions  # the INT8 options (exclusions, bias correction, learned rounding)

    def __post_init__(self) -> None:
        fp8_options = replace(
            self.options, activation_type=wq.FP8, weight_format=wq.FP8, learned_rounding=None
        )
        self._fp8_options = fp8_options
        self._fp8_all = plan_qdq(self.cache, self.fp8_ranges, fp8_options)

    @property
    def fp8_capable(self) -> set[str]:
        """Layers the FP8 placement quantizes (others can only be INT8 or float)."""
        return set(self._fp8_all.quantized_nodes)

    def float_part(self, chosen: Iterable[str]) -> set[str]:
        """Of the layers taken out of INT8, those the FP8 placement cannot take: they stay float."""
        return set(chosen) - self.fp8_capable

    def plan(self, chosen: Iterable[str] = (), float_reason: str = "kept in float") -> QdqPlan:
        """INT8 everywhere but ``chosen``: those in FP8 where the FP8 placement takes them, else float."""
        chosen = set(chosen)
        fp8 = sorted(chosen & self.fp8_capable)
        out_of_int8 = (
            *((n, FP8_REASON) for n in fp8),
            *((n, float_reason) for n in sorted(self.float_part(chosen))),
        )
        int8_plan = plan_qdq(
            self.cache,
            self.int8_ranges,
            replace(self.options, keep_float=(*self.options.keep_float, *out_of_int8)),
        )
        if not fp8:
            return int8_plan
        others = sorted(self.fp8_capable - set(fp8))
        fp8_plan = plan_qdq(
            self.cache,
            self.fp8_ranges,
            replace(
                self._fp8_options,
                keep_float=(*self._fp8_options.keep_float, *((n, "INT8 or float layer") for n in others)),
            ),
        )
        return merge(int8_plan, fp8_plan)


def merge(int8_plan: QdqPlan, fp8_plan: QdqPlan) -> QdqPlan:
    """One plan: the INT8 plan plus the FP8 plan's Q/DQ for its quantized layers."""
    fp8_nodes = set(fp8_plan.quantized_nodes)
    merged = QdqPlan(
        activation_type=int8_plan.activation_type,
        activations=dict(int8_plan.activations),
        weights=dict(int8_plan.weights),
        excluded=[e for e in int8_plan.excluded if e.node not in fp8_nodes],
        quantized_nodes=[*int8_plan.quantized_nodes, *fp8_plan.quantized_nodes],
        node_types={**int8_plan.node_types, **fp8_plan.node_types},
        rounded_weights=dict(int8_plan.rounded_weights),
        fp8_nodes=sorted(fp8_nodes),
    )
    for key, act in fp8_plan.activations.items():
        merged.activations[key + FP8_KEY_SUFFIX if key in merged.activations else key] = act
    for key, w in fp8_plan.weights.items():
        merged.weights[key + FP8_KEY_SUFFIX if key in merged.weights else key] = w
    return merged


def fp8_share(plan: QdqPlan, macs: Mapping[str, float]) -> float:
    """Share of the Conv/Gemm/MatMul MACs that run in FP8."""
    total = sum(macs.values())
    return sum(macs.get(n, 0.0) for n in plan.fp8_nodes) / total if total else 0.0
