"""2:4 masks chosen by optimal brain surgeon updates (SparseGPT, Frantar & Alistarh 2023).

Why: Wanda picks each group's 2 kept inputs by |w_j| * ||x_j|| alone, blind to how correlated the inputs
are; SparseGPT walks the input columns left to right and, at every group of 4, drops the 2 entries whose
removal costs least *after* the not-yet-pruned columns have absorbed the error of the earlier ones
(error ``w_j^2 / [H^-1]_jj``, update ``-e_j [H^-1]_j,: / [H^-1]_jj``).
The objective is prune_fit's: ``||X_p w' - X_o w||^2 + lambda ||w' - w||^2``, which equals
``(w' - w*)' H (w' - w*)`` + const with ``H = X_p'X_p + lambda I`` and ``w* = H^-1 (X_p'X_o w + lambda w)``
the dense optimum on the pruned model's inputs -- so SparseGPT runs on ``w*`` with ``H``. Only the mask is
taken: prune_fit then solves the kept entries exactly, which can only lower the objective further.
"""

from __future__ import annotations

import torch

from calibrators.sparsity import GROUP, KEEP

BLOCK = 128  # columns updated lazily per block (SparseGPT's blocking; exact, it only batches the updates)


def sparsegpt_mask(w: torch.Tensor, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0/1 2:4 mask [out, in] for the rows ``target @ H^-1`` (the dense optimum), H damped, float64."""
    chol = torch.linalg.cholesky(h)
    weights = torch.cholesky_solve(target.T, chol).T.clone()  # w*, row per output channel
    # Upper Cholesky factor of H^-1: row j holds the OBS update of column j over the later columns.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    columns = weights.shape[1]
    mask = torch.zeros_like(weights)
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        block = weights[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        diag = hinv_block.diagonal()
        for i in range(i2 - i1):
            if i % GROUP == 0:
                cost = block[:, i : i + GROUP] ** 2 / diag[i : i + GROUP] ** 2
                keep = cost.topk(KEEP, dim=1).indices
                mask[:, i1 + i : i1 + i + GROUP].scatter_(1, keep, 1.0)
            col = block[:, i]
            pruned = col * (1 - mask[:, i1 + i])
            errors[:, i] = pruned / diag[i]
            block[:, i:] -= errors[:, i : i + 1] @ hinv_block[i : i + 1, i:]
        weights[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return mask
