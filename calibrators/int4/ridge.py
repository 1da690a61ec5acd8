"""The least-squares target of awq-gptq with its ridge chosen on held-out calibration rows.

W*(l) = (X_q^T X_q + l I)^-1 (X_q^T X_f W + l W) restores the FP32 output X_f W from the quantized
prefix's rows X_q. With few rows per unknown (mpnet's 3072-wide FFN input from 8192 rows) it also fits
calibration noise, so l is picked from RIDGES (shares of the mean Hessian diagonal; None = no correction,
W itself) by the output error on the last HOLDOUT_SHARE of the rows (whole sentences: rows are in sentence
order), fitting on the rest; the chosen l is then applied to all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGES: tuple[float | None, ...] = (0.01, 0.1, None)  # 0.01: GPTQ's damping, the old fixed choice
HOLDOUT_SHARE = 0.25


@dataclass(frozen=True)
class Grams:
    """X_q^T X_q, X_q^T X_f and X_f^T X_f (float64)."""

    hq: np.ndarray
    cross: np.ndarray
    hf: np.ndarray

    def __sub__(self, other: Grams) -> Grams:
        return Grams(self.hq - other.hq, self.cross - other.cross, self.hf - other.hf)


def grams(xq: np.ndarray, xf: np.ndarray) -> Grams:
    q, f = np.asarray(xq, np.float64), np.asarray(xf, np.float64)
    return Grams(q.T @ q, q.T @ f, f.T @ f)


def target(g: Grams, w: np.ndarray, ridge: float | None) -> np.ndarray:
    if ridge is None:
        return w
    damp = ridge * float(np.mean(np.diag(g.hq)))
    return np.linalg.solve(g.hq + damp * np.eye(len(g.hq)), g.cross @ w + damp * w)


def error(g: Grams, v: np.ndarray, w: np.ndarray) -> float:
    """|| X_q V - X_f W ||^2 from the Gram matrices."""
    return float(np.sum(v * (g.hq @ v)) - 2 * np.sum(v * (g.cross @ w)) + np.sum(w * (g.hf @ w)))


def choose_ridge(xq: np.ndarray, xf: np.ndarray, full: Grams, w: np.ndarray) -> float | None:
    """The ridge of RIDGES whose target, fitted without the held-out rows, restores them best."""
    start = int(len(xq) * (1 - HOLDOUT_SHARE))
    held = grams(xq[start:], xf[start:])
    fit = full - held
    errors = {ridge: error(held, target(fit, w, ridge), w) for ridge in RIDGES}
    return min(RIDGES, key=lambda r: errors[r])
