"""QDrop-style input mixing for learned rounding (Wei et al., "QDrop: Randomly Dropping Quantization for
Extremely Low-bit Post-Training Quantization", ICLR 2022).

Learned rounding fits each layer on its input from the quantized prefix (calibrators/adaround.py). Fitted
only there, the rounding also learns to cancel that prefix's particular error on the calibration crops,
which need not carry to other inputs. QDrop fits on a mix instead: each element of the layer's input tensor
takes its float value with probability ``drop`` and its quantized value otherwise (one fixed mask per
batch, drawn from the seed), so the rounding must work for a family of nearby inputs (a flatter optimum).
The target stays the float output W x_fp; the held-out rows that decide learned vs nearest stay purely
quantized (what the deployed graph sees).

The float inputs come from the float graph run incrementally (calibrators/adaround_prefix.py): about one
extra float forward pass in all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from calibrators.adaround_prefix import PrefixRunner
from calibrators.qdq_scales import GraphCache


class FloatInputs:
    """Each layer's input tensor in the float graph, per calibration batch, computed incrementally."""

    def __init__(self, cache: GraphCache, feeds: Sequence[Mapping[str, np.ndarray]], threads: int | None):
        self.model = cache.model
        self.runner = PrefixRunner(feeds, threads)

    def values(self, tensor: str) -> list[np.ndarray]:
        return [np.asarray(v[tensor], np.float32) for v in self.runner.run(self.model, [tensor])]


def mix(
    quantized: Sequence[np.ndarray], floats: Sequence[np.ndarray], drop: float, seed: int, layer: int
) -> list[np.ndarray]:
    """Per batch: each element float with probability ``drop``, else quantized (deterministic per seed)."""
    out = []
    for b, (q, f) in enumerate(zip(quantized, floats, strict=True)):
        rng = np.random.default_rng([seed, layer, b, 7])
        out.append(np.where(rng.random(q.shape, dtype=np.float32) < drop, f, np.asarray(q, np.float32)))
    return out
