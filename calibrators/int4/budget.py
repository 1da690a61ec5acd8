"""`--weight-budget`: per-layer INT4 block sizes that spend a byte budget where the weights are most
sensitive (``quantize --precision int4-weights --weight-budget 1/7``).

An INT4 layer costs K*N/2 bytes of codes plus one FP32 scale per block and output column (what the
graph stores: calibrators/int4/graph.py), so block 128 is 4.25 bits per weight (1/7.53 of FP32), 64 is
4.5 (1/7.11), 32 is 5 (1/6.4). A budget of 1/7 of the FP32 MatMul weight bytes leaves room to give some
layers finer blocks. Each layer's sensitivity is the fallback's "local" measure, as in
calibrators/int4/mixed.py: the relative output noise |X (Q_b(W) - W)|^2 / |X W|^2 of its round-to-nearest
weight at each block size b on the calibration inputs. Starting from ``--block-size`` everywhere, the
greedy knapsack step buys the finer block with the largest noise reduction per extra byte that still
fits, until nothing fits. TensorRT takes each DequantizeLinear's own block_size (INT4 block quantization
of a 2-D weight constant along one axis), so a per-layer choice is a valid weight-only graph; candidates
are power-of-two divisors of the layer's K, at least MIN_BLOCK.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from calibrators.int4.awq import output_error
from calibrators.int4.blocks import quantize_blocks
from calibrators.int4.graph import WeightLayer, weight_kn
from trtbuild.core.errors import TrtbuildError

log = logging.getLogger(__name__)

MIN_BLOCK = 32  # ModelOpt's finest INT4 block; TensorRT documents no limit, 16 costs 6 bits a weight
SENSITIVITY_ROWS = 2048  # rows for the noise estimate: a ranking, not a fit
SCALE_BYTES = 4  # FP32 block scales, as the graph stores them


def parse_budget(value: str | float | None) -> float | None:
    """'1/7', '0.14' or a float -> the fraction of FP32 MatMul weight bytes; None: no budget."""
    if value is None or value == "":
        return None
    try:
        fraction = float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        fraction = float("nan")
    if not 0 < fraction <= 1:
        raise TrtbuildError(
            f"--weight-budget {value!r} is not a fraction of the FP32 weight bytes in (0, 1]",
            "give it as 1/7 or 0.14",
        )
    return fraction


def int4_bytes(k: int, n: int, block: int) -> int:
    """Packed INT4 codes plus FP32 block scales of one [K, N] weight."""
    return (k * n + 1) // 2 + (k // block) * n * SCALE_BYTES


def candidates(k: int, coarse: int) -> list[int]:
    """``coarse`` and its power-of-two fractions down to MIN_BLOCK that divide K, coarsest first."""
    out, block = [], coarse
    while block >= MIN_BLOCK and k % block == 0:
        out.append(block)
        if block % 2:
            break
        block //= 2
    return out


@dataclass(frozen=True)
class BlockPlan:
    blocks: dict[str, int]  # node -> block size
    budget: float  # fraction of FP32 bytes
    bytes: int  # INT4 bytes of the plan
    fp32_bytes: int
    noise: dict[str, dict[int, float]]  # node -> block -> relative output noise (RTN)

    def to_json(self) -> dict[str, object]:
        counts: dict[int, int] = {}
        for block in self.blocks.values():
            counts[block] = counts.get(block, 0) + 1
        return {
            "budget": self.budget,
            "ratio": self.bytes / max(1, self.fp32_bytes),
            "layers_per_block": {str(b): c for b, c in sorted(counts.items(), reverse=True)},
            "blocks": self.blocks,
            "noise": self.noise,
        }


def noise_table(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    rows: Mapping[str, np.ndarray],
    coarse: int,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Relative output noise of each layer's RTN weight at each candidate block, on its calibration rows."""
    grams: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    table: dict[str, dict[int, float]] = {}
    for layer in layers:
        if layer.activation not in grams:
            x = rows[layer.activation]
            if len(x) > SENSITIVITY_ROWS:
                x = x[np.sort(rng.choice(len(x), SENSITIVITY_ROWS, replace=False))]
            grams[layer.activation] = x.T @ x
        gram, w = grams[layer.activation], weight_kn(model, layer)
        signal = max(output_error(gram, w), 1e-30)
        table[layer.node] = {
            b: output_error(gram, quantize_blocks(w, b).dequantized() - w) / signal
            for b in candidates(layer.k, coarse)
        }
    return table


def at_outputs(
    local: Mapping[str, Mapping[int, float]], outputs: Mapping[str, float], coarse: int
) -> dict[str, dict[int, float]]:
    """Each layer's local noise per block rescaled to its measured effect at the model outputs at
    ``coarse`` (output_noise.py): the finer blocks keep their local ratios, the layers their real weight."""
    return {
        node: {b: v * outputs[node] / max(table[coarse], 1e-30) for b, v in table.items()}
        for node, table in local.items()
    }


def check_fits(layers: Sequence[WeightLayer], coarse: int, budget: float) -> None:
    """The budget must at least pay for ``coarse`` blocks everywhere (checked before the data pass)."""
    fp32 = sum(layer.k * layer.n * 4 for layer in layers)
    need = sum(int4_bytes(layer.k, layer.n, coarse) for layer in layers)
    if need > budget * fp32:
        raise TrtbuildError(
            f"--weight-budget {budget:.4f} (1/{1 / budget:.2f} of FP32) is below what block {coarse} needs "
            f"(1/{fp32 / need:.2f})",
            "raise --weight-budget or use a larger --block-size",
        )


def choose_blocks(
    layers: Sequence[WeightLayer], noise: Mapping[str, Mapping[int, float]], coarse: int, budget: float
) -> BlockPlan:
    """Greedy knapsack: from ``coarse`` everywhere, buy the finer block with the most noise removed per
    extra byte that fits the budget, until none fits. Raises TrtbuildError if ``coarse`` alone is over."""
    fp32 = sum(layer.k * layer.n * 4 for layer in layers)
    limit = int(budget * fp32)
    check_fits(layers, coarse, budget)
    blocks = {layer.node: coarse for layer in layers}
    spent = sum(int4_bytes(layer.k, layer.n, coarse) for layer in layers)
    while True:
        best: tuple[float, WeightLayer, int, int] | None = None
        for layer in layers:
            now = blocks[layer.node]
            for block in noise[layer.node]:
                if block >= now:
                    continue
                extra = int4_bytes(layer.k, layer.n, block) - int4_bytes(layer.k, layer.n, now)
                gain = noise[layer.node][now] - noise[layer.node][block]
                if spent + extra > limit or gain <= 0:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, layer, block, extra)
        if best is None:
            break
        _, layer, block, extra = best
        blocks[layer.node], spent = block, spent + extra
    log.info("weight budget 1/%.2f: INT4 bytes 1/%.2f of FP32", 1 / budget, fp32 / spent)
    return BlockPlan(blocks, budget, spent, fp32, {k: dict(v) for k, v in noise.items()})
