"""Recovery training from the PyTorch source: QAT and 2:4 sparsity by distillation (docs/qat-sparsity.md).

Imports torch; the numpy-only 2:4 rules live in calibrators/sparsity.py.
"""

from __future__ import annotations

from trtbuild.qat.pipeline import QatResult, qat

__all__ = ["QatResult", "qat"]
