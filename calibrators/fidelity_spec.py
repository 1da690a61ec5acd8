"""What the fidelity gate demands: default bounds per kind of output, and per-output bounds a user sets.

Forms of ``--min-fidelity`` (repeatable):
- ``99%`` or ``0.99``: top-1 agreement for classification/probability outputs and cosine for all others.
- ``top1=0.98,cosine=0.995``: the two defaults separately.
- ``NAME:METRIC=VALUE[,METRIC=VALUE...]``: bounds for one output, replacing its defaults; metrics are
  ``top1`` and ``cosine`` (minimum, 0..1 or a percentage), ``sqnr`` (minimum, dB), ``kl`` (maximum),
  ``err`` (maximum |error| over the output's value range) and ``iou`` (minimum IoU of a prob_map output
  thresholded at 0.3). An output name may contain ``:`` (the last
  one before the first ``=`` separates it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from trtbuild.core.errors import TrtbuildError

# metric -> (direction, description); "min": the value must be at least the bound, "max": at most.
METRICS: dict[str, tuple[str, str]] = {
    "top1": ("min", "top-1 agreement"),
    "cosine": ("min", "cosine"),
    "sqnr": ("min", "SQNR dB"),
    "kl": ("max", "KL"),
    "err": ("max", "max error / range"),
    "iou": ("min", "map IoU@0.3"),  # prob_map outputs only (trtbuild/core/metrics.py map_iou)
}
FRACTION_METRICS = ("top1", "cosine", "iou")
TOP1_KINDS = ("classification", "probability")  # kinds judged by top-1 agreement by default
_FIX = "pass e.g. 99%, 0.99, top1=0.98,cosine=0.995 or OUTPUT:cosine=0.995"


@dataclass(frozen=True)
class FidelityThreshold:
    """Default minimum top-1 agreement (classification and probability outputs) and cosine (every other
    output), and per-output bounds that replace the defaults for the outputs they name."""

    top1: float = 0.99
    cosine: float = 0.99
    per_output: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    def bounds_for(self, name: str, kind: str, top1_applies: bool = True) -> dict[str, float]:
        """The bounds an output must meet: its own if the user set them, else its kind's default."""
        own = dict(self.per_output).get(name)
        if own is not None:
            return dict(own)
        if kind in TOP1_KINDS and top1_applies:
            return {"top1": self.top1}
        return {"cosine": self.cosine}

    def named_outputs(self) -> list[str]:
        return [name for name, _ in self.per_output]

    def describe(self) -> str:
        text = f"top-1 agreement >= {self.top1:.2%} (classification), cosine >= {self.cosine:.4f} (others)"
        for name, bounds in self.per_output:
            text += f"; {name}: " + ", ".join(describe_bound(m, v) for m, v in bounds)
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "top1": self.top1,
            "cosine": self.cosine,
            "per_output": {name: dict(bounds) for name, bounds in self.per_output},
        }


DEFAULT_THRESHOLD = FidelityThreshold()


def describe_bound(metric: str, value: float) -> str:
    direction, label = METRICS[metric]
    shown = f"{value:.2%}" if metric == "top1" else f"{value:.4g}"
    return f"{label} {'>=' if direction == 'min' else '<='} {shown}"


def meets(metric: str, measured: float | None, bound: float) -> bool:
    if measured is None or math.isnan(measured):
        return False
    return measured >= bound if METRICS[metric][0] == "min" else measured <= bound


def parse_min_fidelity(spec: str | float | Sequence[str] | None) -> FidelityThreshold:
    """Parse one or more ``--min-fidelity`` values (see the module docstring)."""
    if spec is None:
        return DEFAULT_THRESHOLD
    if isinstance(spec, (int, float)):
        value = _number("top1", str(spec))
        return FidelityThreshold(top1=value, cosine=value)
    items: Iterable[str] = [spec] if isinstance(spec, str) else spec
    top1, cosine = DEFAULT_THRESHOLD.top1, DEFAULT_THRESHOLD.cosine
    per_output: dict[str, tuple[tuple[str, float], ...]] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            raise TrtbuildError("--min-fidelity is empty", _FIX)
        first_eq = item.find("=")
        prefix = item[:first_eq] if first_eq >= 0 else item
        if first_eq >= 0 and ":" in prefix:  # NAME:metric=value,...
            name = prefix.rsplit(":", 1)[0]
            bounds_text = item[len(name) + 1 :]
            if not name:
                raise TrtbuildError(f"--min-fidelity '{raw}' names no output before ':'", _FIX)
            if name in per_output:
                raise TrtbuildError(f"--min-fidelity sets output '{name}' twice", "give each output once")
            per_output[name] = tuple(_pairs(bounds_text, raw).items())
        elif first_eq >= 0:  # top1=..,cosine=..
            pairs = _pairs(item, raw)
            extra = set(pairs) - set(FRACTION_METRICS)
            if extra:
                raise TrtbuildError(
                    f"--min-fidelity '{raw}': {', '.join(sorted(extra))} needs an output name",
                    "write OUTPUT:sqnr=20 (the defaults are top1= and cosine=)",
                )
            top1, cosine = pairs.get("top1", top1), pairs.get("cosine", cosine)
        else:  # one number for both defaults
            top1 = cosine = _number("top1", item)
    return FidelityThreshold(top1, cosine, tuple(per_output.items()))


def _pairs(text: str, raw: str) -> dict[str, float]:
    pairs: dict[str, float] = {}
    for part in text.split(","):
        metric, eq, value = part.strip().partition("=")
        metric = metric.strip()
        if not eq or not metric or not value.strip():
            raise TrtbuildError(f"--min-fidelity '{raw}' has an incomplete part '{part.strip()}'", _FIX)
        if metric not in METRICS:
            raise TrtbuildError(
                f"--min-fidelity '{raw}' has unknown metric '{metric}'", f"use one of {', '.join(METRICS)}"
            )
        if metric in pairs:
            raise TrtbuildError(f"--min-fidelity '{raw}' sets {metric} twice", "give each metric once")
        pairs[metric] = _number(metric, value.strip())
    return pairs


def _number(metric: str, text: str) -> float:
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*", text)
    if not match:
        raise TrtbuildError(f"--min-fidelity value '{text}' is not a number", _FIX)
    value, percent = float(match.group(1)), bool(match.group(2))
    if metric in FRACTION_METRICS:
        if percent:
            value /= 100.0
        elif value > 1.0:
            raise TrtbuildError(
                f"--min-fidelity {metric} '{text}' is above 1",
                f"write a fraction (0.99) or a percentage ({text}%)",
            )
        if not 0.0 <= value <= 1.0:
            raise TrtbuildError(f"--min-fidelity {metric} '{text}' is outside 0..100%", _FIX)
    elif percent:
        raise TrtbuildError(f"--min-fidelity {metric} takes a plain number, not '{text}'", _FIX)
    elif metric in ("kl", "err") and value < 0:
        raise TrtbuildError(f"--min-fidelity {metric} '{text}' is negative", f"pass {metric}=0 or more")
    return value


def check_outputs(
    threshold: FidelityThreshold,
    outputs: Mapping[str, object] | Sequence[str],
    parts_known: bool = False,
    possible_parts: Mapping[str, Sequence[str] | None] | None = None,
) -> None:
    """Every output a bound names exists (one error line listing the real ones). Before the graph runs
    (``parts_known`` False) a part name (``output0[4:22]``) of a real output must be one of
    ``possible_parts[output]`` (the graph's Concat spans), and is taken on trust where the graph does
    not say (None, or no mapping given)."""
    known = list(outputs)
    possible = possible_parts or {}

    def exists(name: str) -> bool:
        if name in known:
            return True
        if parts_known or not _is_part_of(name, known):
            return False
        allowed = possible.get(name.partition("[")[0])
        return allowed is None or name in allowed

    unknown = [n for n in threshold.named_outputs() if not exists(n)]
    if unknown:
        parts = [p for n in unknown if _is_part_of(n, known) for p in possible.get(n.partition("[")[0]) or ()]
        raise TrtbuildError(
            f"--min-fidelity names output(s) {', '.join(repr(n) for n in unknown)} the model does not have",
            f"the outputs are {', '.join(repr(n) for n in known)}"
            + (f"; the parts it can judge apart are {', '.join(repr(p) for p in parts)}" if parts else ""),
        )


def _is_part_of(name: str, outputs: Sequence[str]) -> bool:
    """``output0[4:22]``: a part of a known output (calibrators/output_kinds.py), checked by name here,
    before the graph is run; compare() checks it exists once the parts are known."""
    base, bracket, rest = name.partition("[")
    return bool(bracket) and rest.endswith("]") and base in outputs
