"""QAT runs the PyTorch model on batches of several samples (training steps, the teacher's targets, the 2:4
fit), while the export verifies it at the declared batch only. A forward() written for one batch size --
e.g. ``x.reshape(1, -1)`` before a Linear -- would export fine and then crash mid-run with a traceback, so
it is checked once, up front, before anything is exported or written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.train import as_outputs

TARGET_CHUNK = 8  # train.Trainer computes the teacher's targets in chunks of this many samples


def largest_batch(batch_size: int, fit_batch: int | None, samples: int) -> int:
    """The largest batch QAT feeds the model: training, the teacher's targets and (2:4) the fit."""
    return min(max(batch_size, TARGET_CHUNK, fit_batch or 0), samples)


def check_batch(
    model: nn.Module, samples: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str], size: int
) -> None:
    """Run ``model`` once on ``size`` samples stacked; a failure there that one sample does not have is one
    TrtbuildError line. A model that fails on one sample too is left to the export, which says why."""
    if size <= 1:
        return
    try:
        _forward(model, samples[:size], input_names)
    except TrtbuildError:
        raise
    except Exception as exc:
        try:
            _forward(model, samples[:1], input_names)
        except Exception:
            return  # not a batch problem: export_model reports the declared inputs' failure
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrtbuildError(
            f"the model fails on a batch of {size} samples ({type(exc).__name__}: {first}); "
            "QAT trains and evaluates it on batches of samples",
            "make forward() take any batch size (e.g. x.reshape(x.shape[0], -1), not reshape(1, -1))",
        ) from exc


def _forward(model: nn.Module, samples: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
    feeds = [torch.from_numpy(np.concatenate([s[n] for s in samples])) for n in names]
    with torch.no_grad():
        as_outputs(model(*feeds))
