"""QAT on fresh augmented views of the training samples (`qat --augment auto`, the default for images).

Why: QAT used to draw every batch from the same fixed calibration crops (128 of them on EfficientNet-Lite0)
with the teacher's outputs computed once; a few hundred steps then fit those crops, not the photos they
come from. Here every step draws new views of the *training* samples (augment.py: random resized crops,
flips, brightness/contrast, mixup) and the teacher labels the same views, so the student follows the
teacher on the neighbourhood of the data. Held-out samples are never augmented or trained on.

The loader plugs into train.Trainer as a labeled loader: its ``generator`` is the only randomness and the
Trainer checkpoints it, so same seed -> same views, and a resumed run draws the views the uninterrupted
one would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.augment import augment, augmentable
from trtbuild.qat.train import LossFn, as_outputs

AUGMENTS = ("auto", "off")  # auto: augmented views when the model has one image-like input


class AugmentedViews:
    """Endless (augmented inputs, teacher outputs on them) batches; ``loss`` is the distillation loss."""

    def __init__(
        self, teacher: nn.Module, pool: torch.Tensor, loss: LossFn, batch_size: int, seed: int
    ) -> None:
        self.teacher, self.pool, self.loss, self.batch_size = teacher, pool, loss, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        device = next(self.teacher.parameters()).device
        while True:
            x = augment(self.pool, self.batch_size, self.generator).to(device)
            with torch.no_grad():
                targets = as_outputs(self.teacher(x))
            yield x, targets


def augmented_views(
    mode: str,
    teacher: nn.Module,
    train: Sequence[Mapping[str, Any]],
    input_names: Sequence[str],
    loss: LossFn,
    batch_size: int,
    seed: int,
) -> AugmentedViews | None:
    """The QAT loader for ``mode`` ("auto": augmented views of an image model's training samples, None
    for other inputs; "off": None, i.e. the fixed samples with the teacher's outputs computed once)."""
    if mode not in AUGMENTS:
        raise TrtbuildError(f"unknown --augment '{mode}'", f"use one of {', '.join(AUGMENTS)}")
    if mode == "off" or len(input_names) != 1 or not train:
        return None
    pool = torch.from_numpy(np.concatenate([s[input_names[0]] for s in train])).float()
    if not augmentable([pool]):
        return None
    return AugmentedViews(teacher, pool, loss, batch_size, seed)
