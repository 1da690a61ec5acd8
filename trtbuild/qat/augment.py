"""Fresh augmented image batches for 2:4 recovery, drawn from the calibration samples only.

Why: the recovery set is a few hundred fixed crops of a handful of photos; a re-fit or distillation on
them over-fits (30 steps on 128 fixed crops made the held-out KL worse). Every call draws new views of the
training samples -- random resized crops at several scales and aspect ratios, horizontal flips, a per-image
brightness/contrast jitter and mixup between two samples -- so the pruned model follows the teacher on the
neighbourhood of the data, not on the samples themselves. Held-out samples are never touched.
Only image-like inputs (one float NCHW tensor) are augmented; `augmentable` says whether a model's are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SCALE = (0.25, 1.0)  # crop area as a share of the sample
RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # contrast x (1 +- JITTER), brightness +- JITTER (in normalised units)
MIXUP = 0.3  # share of a batch mixed with another sample, weight ~ U(0, 0.5)


def augmentable(samples: Sequence[torch.Tensor]) -> bool:
    """True for one 4-D floating-point input of at least 8x8 pixels per sample."""
    x = samples[0]
    return x.dim() == 4 and x.is_floating_point() and min(x.shape[2:]) >= 8


def augment(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` augmented views of random samples of ``pool`` ([N, C, H, W]), same size as the pool."""
    n, _, h, w = pool.shape
    pick = torch.randint(0, n, (count,), generator=generator)
    r = torch.rand(count, 8, generator=generator)
    views = []
    for i in range(count):
        area = (SCALE[0] + (SCALE[1] - SCALE[0]) * r[i, 0]) * h * w
        ratio = math.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * float(r[i, 1]))
        ch = max(8, min(h, round(math.sqrt(area / ratio))))
        cw = max(8, min(w, round(math.sqrt(area * ratio))))
        top, left = int(r[i, 2] * (h - ch + 1)), int(r[i, 3] * (w - cw + 1))
        view = pool[pick[i], :, top : top + ch, left : left + cw].unsqueeze(0)
        view = F.interpolate(view, size=(h, w), mode="bilinear", align_corners=False)
        if r[i, 4] < 0.5:
            view = view.flip(-1)
        contrast = 1 + JITTER * (2 * float(r[i, 5]) - 1)
        brightness = JITTER * (2 * float(r[i, 6]) - 1)
        views.append(view * contrast + brightness)
    batch = torch.cat(views)
    mixed = torch.rand(count, generator=generator) < MIXUP
    if mixed.any():
        partner = torch.randperm(count, generator=generator)
        weight = (0.5 * torch.rand(count, generator=generator)).view(-1, 1, 1, 1) * mixed.view(-1, 1, 1, 1)
        batch = (1 - weight) * batch + weight * batch[partner]
    return batch.contiguous()
