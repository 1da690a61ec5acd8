"""The order auto-fallback tries layers in: by sensitivity alone, or by sensitivity per unit of compute.

Keeping a layer float costs its multiply-accumulates (calibrators/layer_cost.py), not "one layer": a
depthwise 3x3 that removes a third of the error for 1% of the MACs is a better buy than a pointwise
conv that removes half of it for 10%. The "cost" ranking sorts layers whose float copy helps by gain per
MAC; layers that do not help go last, most helpful first, so the search can still reach them.
auto_fallback also searches the gain order within the MACs the cost order needed and keeps the cheaper
passing set (calibrators/fallback.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

RANKINGS = ("cost", "sensitivity")
DEFAULT_RANKING = "cost"


class Ranked(Protocol):
    @property
    def node(self) -> str: ...

    @property
    def gain(self) -> float: ...


def order(sensitivities: Sequence[Ranked], costs: Mapping[str, float], ranking: str) -> list[str]:
    """Node names in the order fallback keeps them float (``ranking``: "cost" or "sensitivity")."""
    if ranking == "sensitivity":
        return [s.node for s in sorted(sensitivities, key=lambda s: s.gain, reverse=True)]
    helpful = [s for s in sensitivities if s.gain > 0]
    rest = [s for s in sensitivities if s.gain <= 0]
    helpful.sort(key=lambda s: s.gain / max(costs.get(s.node, 1.0), 1.0), reverse=True)
    rest.sort(key=lambda s: s.gain, reverse=True)
    return [s.node for s in (*helpful, *rest)]


def prune_order(kept: Sequence[str], costs: Mapping[str, float], limit: int) -> list[str]:
    """The kept-float layers worth trying to quantize again: the ``limit`` most expensive, costliest first
    (one of them back in INT8 saves the most compute if the gate still passes)."""
    return sorted(kept, key=lambda n: costs.get(n, 0.0), reverse=True)[:limit]
