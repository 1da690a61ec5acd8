"""Calibration rows of one activation: real tokens only, capped at MAX_ROWS by a seeded sample.

Shared by the one-pass FP32 collection (pipeline.collect_inputs) and the segment runner of awq-gptq
(segments.py): both must pick the very same rows so the FP32 and quantized-prefix rows pair up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MAX_ROWS = 8192  # calibration rows per activation: GPTQ needs more rows than K (1536 in BERT's FFN)


def real_token_rows(array: np.ndarray, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows [rows, K] of ``array``, without padded tokens: where a 2-D ``*mask`` input lines up with the
    activation's [batch, seq] axes, rows whose mask is 0 are dropped (the FP32 model ignores them too, so
    fitting the weights to them would only spend accuracy)."""
    rows = array.reshape(-1, array.shape[-1])
    for name, mask in batch.items():
        if "mask" in name.lower() and mask.ndim == 2 and array.ndim == 3 and mask.shape == array.shape[:2]:
            keep = mask.reshape(-1) != 0
            return rows[keep] if keep.any() else rows
    return rows


def sample_rows(chunks: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """The batches' rows joined, sampled down to MAX_ROWS with a fresh generator per activation (the same
    rows are picked from every model: awq-gptq pairs them)."""
    x = np.concatenate(chunks, axis=0)
    if len(x) > MAX_ROWS:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_ROWS, replace=False))]
    return x
