"""Auto-fallback: find the fewest layers to keep in float so the INT8 model meets the fidelity gate.

1. Sensitivity, two strategies. "drop_one" (one run per layer): keep only that layer in float and measure
   how much the fidelity error (KL for classifiers, 1 - cosine otherwise) drops. "local" (one FP32 and one
   INT8 run): the relative noise each layer adds between its input and its output. "auto" (default) uses
   drop_one when its work (one run per layer, counted in multiply-adds) fits the budget, else local. The
   choice is made from the model, never from a wall clock, so a loaded machine gives the same result.
2. Greedy with verification: rank layers (calibrators/fallback_ranking.py: by gain per MAC by default, or
   by gain alone), keep the top-k in float for the smallest k that passes on the full held-out split
   (doubling k, then bisecting), then try to put the most expensive kept layers back in INT8; every
   candidate is verified by a real run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from rich.table import Table

from calibrators import fallback_ranking, fidelity, layer_cost
from calibrators.fidelity import Feeds, FidelityReport, FidelityThreshold
from calibrators.output_kinds import OutputKind
from calibrators.qdq import GraphCache, QdqOptions, QdqPlan, apply_qdq, plan_qdq
from calibrators.qdq_mixed import MixedPlanner
from calibrators.ranges import TensorRange
from trtbuild.core.errors import TrtbuildError

FALLBACK_REASON = "kept in float by auto-fallback (sensitivity analysis)"
DEFAULT_MAX_FLOAT_COMPUTE = 0.5  # never hand back a "quantized" model that is mostly float
# drop_one sensitivity when one run per layer costs at most this many multiply-adds: about a minute of
# reference-semantics ORT on two cores. Counted, not timed, so the strategy never depends on machine load.
DROP_ONE_BUDGET_MACS = 3e11


@dataclass(frozen=True)
class LayerSensitivity:
    """How much keeping one layer in float reduces the INT8 error on the sensitivity samples."""

    node: str
    op_type: str
    error_if_float: float | None  # fidelity error with only this layer in float ("drop_one" strategy)
    gain: float  # error removed by keeping it float ("drop_one") or relative noise it adds ("local")


@dataclass
class FallbackResult:
    kept_float: list[str]
    sensitivities: list[LayerSensitivity]
    baseline: FidelityReport
    final: FidelityReport
    plan: QdqPlan
    model: onnx.ModelProto
    trials: list[dict[str, Any]] = field(default_factory=list)  # k, passed, error for each verification
    strategy: str = ""  # how sensitivity was measured: "local" or "drop_one"
    float_compute: float = 0.0  # share of the model's Conv/Gemm/MatMul MACs left in float
    stopped: str | None = None  # why the search stopped short of the gate (the float-compute limit)
    ranking: str = fallback_ranking.DEFAULT_RANKING  # "cost" (gain per MAC) or "sensitivity" (gain)
    layer_macs: dict[str, float] = field(default_factory=dict)  # every compute layer's MACs

    @property
    def passed(self) -> bool:
        return self.final.passed and self.stopped is None

    def why(self) -> dict[str, LayerSensitivity]:
        by_node = {s.node: s for s in self.sensitivities}
        return {n: by_node[n] for n in self.kept_float if n in by_node}

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "kept_float": [
                {"node": s.node, "op_type": s.op_type, "gain": s.gain, "error_if_float": s.error_if_float}
                for s in self.why().values()
            ],
            "baseline": self.baseline.to_json(),
            "final": self.final.to_json(),
            "trials": self.trials,
            "strategy": self.strategy,
            "float_compute": self.float_compute,
            "ranking": self.ranking,
            "stopped": self.stopped,
            "sensitivities": [s.__dict__ for s in self.sensitivities],
        }

    def table(self, top: int = 10) -> Table:
        kept = set(self.kept_float)
        table = Table(
            title=f"Auto-fallback: {len(kept)} layer(s) kept in float "
            f"(error {self.baseline.score():.4g} -> {self.final.score():.4g}, {self.strategy} sensitivity, "
            f"{self.ranking} ranking), {self.float_compute:.1%} of the compute float; most sensitive layers"
        )
        total = sum(self.layer_macs.values()) or 1.0
        for col in ("layer", "op", "error if float", "gain", "compute", "kept float"):
            table.add_column(col, justify="left" if col in ("layer", "op") else "right")
        shown = [s for s in self.sensitivities if s.node in kept]
        shown += [s for s in self.sensitivities if s.node not in kept][: max(0, top - len(shown))]
        for s in shown:
            err = "-" if s.error_if_float is None else f"{s.error_if_float:.4g}"
            share = f"{self.layer_macs[s.node] / total:.2%}" if s.node in self.layer_macs else "-"
            table.add_row(s.node, s.op_type, err, f"{s.gain:+.4g}", share, "yes" if s.node in kept else "")
        return table


class _Planner:
    """Re-plans with extra layers kept float, so Q/DQ that only fed those layers (Pad/Concat chains,
    residual skips) disappears with them."""

    def __init__(
        self,
        model: onnx.ModelProto,
        ranges: Mapping[str, TensorRange],
        options: QdqOptions,
        semantics: str | None = None,
        kinds: Mapping[str, OutputKind] | None = None,
        fp8_ranges: Mapping[str, TensorRange] | None = None,
    ) -> None:
        self.cache = GraphCache(model)
        self.kinds = kinds
        # --precision int8,fp8: layers taken out of INT8 run in FP8 where they can (calibrators/qdq_mixed.py)
        self.mixed = MixedPlanner(self.cache, ranges, fp8_ranges, options) if fp8_ranges is not None else None
        self.focus: set[str] | None = None  # the outputs failing the gate: layers are ranked by their error
        self.ranges, self.options = ranges, options
        # Judge candidates the way the gate does: TensorRT graphs by their reference semantics.
        self.semantics = semantics or fidelity.semantics_for_activations(options.activation_type)

    def plan(self, float_layers: Sequence[str] = ()) -> QdqPlan:
        if self.mixed is not None:
            return self.mixed.plan(float_layers, FALLBACK_REASON)
        kept = tuple((n, FALLBACK_REASON) for n in float_layers)
        options = replace(self.options, keep_float=(*self.options.keep_float, *kept))
        return plan_qdq(self.cache, self.ranges, options)


def _error(
    planner: _Planner,
    plan: QdqPlan,
    batches: Sequence[Feeds],
    reference: dict[str, np.ndarray],
    threshold: FidelityThreshold,
) -> FidelityReport:
    qmodel = apply_qdq(planner.cache, plan, check=False)
    sess = fidelity.session(qmodel, semantics=planner.semantics)
    test = fidelity.run_batches(sess, batches)
    if planner.kinds is None:
        planner.kinds = fidelity.decide_kinds(planner.cache.model, reference)
    return fidelity.compare(reference, test, threshold, planner.kinds, planner.semantics)


def _slice_reference(reference: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in reference.items()}


def layer_sensitivity(
    model: onnx.ModelProto,
    ranges: Mapping[str, TensorRange],
    options: QdqOptions,
    batches: Sequence[Feeds],
    reference: dict[str, np.ndarray],
    threshold: FidelityThreshold,
    on_layer: Callable[[str], None] | None = None,
    semantics: str | None = None,
    kinds: Mapping[str, OutputKind] | None = None,
    focus: set[str] | None = None,
    fp8_ranges: Mapping[str, TensorRange] | None = None,
) -> tuple[float, list[LayerSensitivity]]:
    """Baseline error and, per quantized layer, the error with only it in float (most sensitive first).
    ``focus``: rank by the error of these outputs only (the ones failing the gate). ``fp8_ranges``: mixed
    INT8/FP8: the error with only it in FP8 instead (FP8 is not always closer than INT8: E4M3 has 3
    mantissa bits, so a layer whose INT8 error is weight rounding, not activation outliers, gets worse)."""
    planner = _Planner(model, ranges, options, semantics, kinds, fp8_ranges)
    planner.focus = focus
    plan = planner.plan()
    baseline = _error(planner, plan, batches, reference, threshold).score(planner.focus)
    result = []
    for node in plan.quantized_nodes:
        err = _error(planner, planner.plan([node]), batches, reference, threshold).score(planner.focus)
        result.append(LayerSensitivity(node, plan.node_types.get(node, ""), err, baseline - err))
        if on_layer:
            on_layer(node)
    result.sort(key=lambda s: s.gain, reverse=True)
    return baseline, result


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
            present.add(name)
    return extended


def local_sensitivity(planner: _Planner, plan: QdqPlan, batches: Sequence[Feeds]) -> list[LayerSensitivity]:
    """One pass: the relative noise each layer adds, |int8 - fp32|^2 / |fp32|^2 at its output minus at its
    (float) input, with FP32 and INT8 run side by side. Cheap (two runs) and ranks the layers whose own
    quantization hurts most; the greedy search verifies every choice with real runs."""
    cache = planner.cache
    by_name = {n.name: n for n in cache.model.graph.node}
    inputs = {
        n: [
            t
            for t in by_name[n].input
            if t in plan.activations and any(c[0] == n for c in plan.activations[t].consumers)
        ]
        for n in plan.quantized_nodes
    }
    watched = sorted({t for n in plan.quantized_nodes for t in (*inputs[n], by_name[n].output[0])})
    # Reference semantics on both sides: extra outputs inside fused integer kernels would change what ORT
    # fuses, and this pass only ranks layers (every choice is verified under the gate's semantics).
    ref = fidelity.run_batches(fidelity.session(_with_outputs(cache.model, watched)), batches)
    qmodel = apply_qdq(cache, plan, check=False)
    test = fidelity.run_batches(fidelity.session(_with_outputs(qmodel, watched)), batches)

    def noise(t: str) -> float:
        r, q = ref[t].astype(np.float64), test[t].astype(np.float64)
        power = float((r**2).sum())
        return float(((r - q) ** 2).sum()) / power if power > 0 else 0.0

    result = []
    for n in plan.quantized_nodes:
        out_noise = noise(by_name[n].output[0])
        in_noise = max((noise(t) for t in inputs[n]), default=0.0)
        result.append(LayerSensitivity(n, plan.node_types.get(n, ""), None, out_noise - in_noise))
    result.sort(key=lambda s: s.gain, reverse=True)
    return result


def auto_fallback(
    model: onnx.ModelProto,
    ranges: Mapping[str, TensorRange],
    options: QdqOptions,
    holdout: Sequence[Feeds],
    threshold: FidelityThreshold,
    *,
    reference: dict[str, np.ndarray] | None = None,
    sensitivity_samples: int = 8,
    strategy: str = "auto",
    sensitivity_budget_macs: float = DROP_ONE_BUDGET_MACS,
    on_layer: Callable[[str], None] | None = None,
    semantics: str | None = None,
    kinds: Mapping[str, OutputKind] | None = None,
    max_float_compute: float = DEFAULT_MAX_FLOAT_COMPUTE,
    ranking: str = fallback_ranking.DEFAULT_RANKING,
    prune_trials: int = 3,
    fp8_ranges: Mapping[str, TensorRange] | None = None,
) -> FallbackResult:
    """Keep the fewest most-sensitive layers in float so the model passes ``threshold`` on ``holdout``.
    ``semantics``: how candidates are run (default: from the activation type, as the gate does);
    ``kinds``: each output's kind (default: decided from the graph and the FP32 outputs).
    ``max_float_compute``: never return a model with more than this share of its Conv/Gemm/MatMul MACs in
    float; when the gate needs more, stop and say which outputs and layers drive it (``stopped``).
    ``ranking``: "cost" tries layers by sensitivity gain per MAC (fewest MACs float), "sensitivity" by
    gain alone; ``prune_trials``: how many of the most expensive kept layers to try back in INT8.
    ``fp8_ranges``: mixed INT8/FP8 (``--precision int8,fp8``): the chosen layers run in FP8 (these ranges,
    on the E4M3 grid) instead of float where the FP8 placement takes them; ranked by the same float
    sensitivities, every candidate verified as the real mixed graph."""
    if ranking not in fallback_ranking.RANKINGS:
        raise TrtbuildError(f"unknown fallback ranking '{ranking}'", "use 'cost' or 'sensitivity'")
    if reference is None:
        reference = fidelity.run_batches(fidelity.session(model), holdout)
    planner = _Planner(
        model, ranges, options, semantics, kinds or fidelity.decide_kinds(model, reference), fp8_ranges
    )
    plan = planner.plan()
    costs = layer_cost.layer_macs(model, holdout[0])
    baseline = _error(planner, plan, holdout, reference, threshold)
    base_share = layer_cost.float_share(costs, plan.quantized_nodes)
    if baseline.passed:
        return FallbackResult(
            [],
            [],
            baseline,
            baseline,
            plan,
            apply_qdq(model, plan),
            float_compute=base_share,
            ranking=ranking,
            layer_macs=costs,
        )

    planner.focus = {o.name for o in baseline.failing()}
    sens_batches, n = _first_samples(holdout, sensitivity_samples)
    if strategy not in ("auto", "local", "drop_one"):
        raise TrtbuildError(f"unknown sensitivity strategy '{strategy}'", "use 'auto', 'local' or 'drop_one'")
    if strategy == "auto":
        # drop_one measures each layer exactly but costs one run per layer: use it when that work fits.
        per_sample = sum(costs.values()) / max(1, _batch_rows(holdout[0]))
        work = per_sample * n * len(plan.quantized_nodes)
        strategy = "drop_one" if work <= sensitivity_budget_macs else "local"
    if strategy == "local":
        sens = local_sensitivity(planner, plan, sens_batches)
    else:
        _, sens = layer_sensitivity(
            model,
            ranges,
            options,
            sens_batches,
            _slice_reference(reference, n),
            threshold,
            on_layer,
            planner.semantics,
            planner.kinds,
            planner.focus,
            fp8_ranges,
        )

    verify = _Verifier(planner, holdout, reference, threshold, costs, set(plan.quantized_nodes), baseline)
    # The requested order first; with "cost", the plain gain order is then searched within the MACs that
    # found (a discrete gate such as top-1 can be met by one big layer sooner than by many cheap ones), and
    # whichever passing set keeps fewer MACs float wins.
    orders = [fallback_ranking.order(sens, costs, ranking)]
    if ranking == "cost":
        orders.append(fallback_ranking.order(sens, costs, "sensitivity"))
    best: list[str] | None = None
    budget = max_float_compute
    first: tuple[list[str], int, int] | None = None
    for order in orders:
        k, passed, limit = _search(verify, order, budget)
        if passed:
            best, budget = order[:k], verify.share(order[:k]) - 1e-9
        elif first is None:
            first = (order, k, limit)
    stopped = None
    if best is None:
        assert first is not None
        order, k, limit = first
        best = order[:k]  # the limit (or every layer) in float does not pass: report the best allowed
        if limit < len(order):
            stopped = _stop_reason(verify(best), k, verify.share(best), max_float_compute, order[:5])
    kept, final = list(best), verify(best)
    if stopped is None and final.passed:
        kept, final = _prune(verify, kept, costs, prune_trials)
    final_plan = planner.plan(kept)
    return FallbackResult(
        kept,
        sens,
        baseline,
        final,
        final_plan,
        apply_qdq(model, final_plan),
        verify.trials,
        strategy,
        verify.share(kept),
        stopped,
        ranking,
        costs,
    )


class _Verifier:
    """Runs a candidate set of float layers on the full held-out split, once per distinct set."""

    def __init__(
        self,
        planner: _Planner,
        holdout: Sequence[Feeds],
        reference: dict[str, np.ndarray],
        threshold: FidelityThreshold,
        costs: Mapping[str, float],
        quantized: set[str],
        baseline: FidelityReport,
    ) -> None:
        self.planner, self.holdout, self.reference, self.threshold = planner, holdout, reference, threshold
        self.costs, self.quantized = costs, quantized
        self.cache: dict[frozenset[str], FidelityReport] = {frozenset(): baseline}
        self.trials: list[dict[str, Any]] = []

    def share(self, layers: Sequence[str]) -> float:
        """Share of the MACs in float with ``layers`` taken out of INT8 (in FP8 where mixed planning can)."""
        mixed = self.planner.mixed
        out = mixed.float_part(layers) if mixed is not None else set(layers)
        return layer_cost.float_share(self.costs, self.quantized - out)

    def __call__(self, layers: Sequence[str]) -> FidelityReport:
        key = frozenset(layers)
        if key not in self.cache:
            p = self.planner
            report = _error(p, p.plan(list(layers)), self.holdout, self.reference, self.threshold)
            self.cache[key] = report
            self.trials.append(
                {
                    "float_layers": len(key),
                    "passed": report.passed,
                    "error": report.score(p.focus),
                    "float_compute": self.share(layers),
                }
            )
        return self.cache[key]


def _search(verify: _Verifier, order: Sequence[str], max_share: float) -> tuple[int, bool, int]:
    """(k, passed, limit): the shortest prefix of ``order`` that passes, keeping at most ``max_share`` of
    the MACs float (``limit``: the longest such prefix); doubling, then bisection."""
    limit = max((k for k in range(len(order) + 1) if verify.share(order[:k]) <= max_share), default=0)
    lo, hi = 0, min(1, limit)
    while hi < limit and not verify(order[:hi]).passed:
        lo, hi = hi, min(hi * 2, limit)
    if not verify(order[:hi]).passed:
        return hi, False, limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if verify(order[:mid]).passed:
            hi = mid
        else:
            lo = mid
    return hi, True, limit


def _prune(
    verify: _Verifier, kept: list[str], costs: Mapping[str, float], limit: int
) -> tuple[list[str], FidelityReport]:
    """Put the most expensive kept-float layers back in INT8 one at a time while the gate still passes:
    the prefix search is greedy, and a big layer taken early may not be needed once cheaper ones are float."""
    final = verify(kept)
    for node in fallback_ranking.prune_order(kept, costs, limit if len(kept) > 1 else 0):
        trial = [n for n in kept if n != node]
        report = verify(trial)
        if report.passed:
            kept, final = trial, report
    return kept, final


def _stop_reason(report: FidelityReport, k: int, share: float, limit: float, leading: Sequence[str]) -> str:
    failing = "; ".join(
        f"{o.name} ({o.kind}): {', '.join(o.failures(report.threshold))}" for o in report.failing()
    )
    return (
        f"meeting the gate needs more than {limit:.0%} of the compute in float: with the {k} most sensitive "
        f"layers float ({share:.0%} of the MACs) still failing: {failing}; the most sensitive layers are "
        f"{', '.join(leading)}. Check those outputs' kind and bounds (--output-kind, per-output "
        "--min-fidelity) or allow more with --max-float-compute"
    )


def _first_samples(batches: Sequence[Feeds], n: int) -> tuple[list[Feeds], int]:
    """The first batches holding at least ``n`` samples (all of them if fewer), unchanged: a model with a
    fixed batch dimension only accepts the batches it was given."""
    chosen: list[Feeds] = []
    count = 0
    for batch in batches:
        if count >= n:
            break
        chosen.append(batch)
        count += int(np.asarray(next(iter(batch.values()))).shape[0])
    return chosen, count


def _batch_rows(feeds: Feeds) -> int:
    """Samples in one batch (the leading dimension of its first input)."""
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1
