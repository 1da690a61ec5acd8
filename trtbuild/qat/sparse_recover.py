"""2:4 recovery by feature distillation on freshly augmented data (what `qat --sparsity 2:4` trains).

Why: the end-to-end KL on 128 fixed crops made the held-out KL worse (over-fitting a tiny set with one
scalar signal per sample). Here every step draws new augmented views of the calibration samples
(augment.py), the teacher runs on the same views, and the loss adds to the KL on the logits the output
of every block that holds a pruned layer, as MSE normalised by the teacher's variance there: each block is
told where its output should be (BRECQ-like block reconstruction signal, trained jointly end to end).
The loss plugs into train.Trainer as a labeled loader + loss function, so early stopping on the held-out
samples, checkpoints and best-state restore are the same as for QAT.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trtbuild.qat.augment import augment
from trtbuild.qat.train import LossFn, as_outputs

FEATURE_WEIGHT = 1.0  # weight of the (summed, per-block normalised) feature loss next to the logits' KL


def feature_points(model: nn.Module, pruned: Sequence[str]) -> list[str]:
    """The blocks to match: children of a ModuleList/Sequential that hold a pruned layer (EfficientNet's
    MBConv blocks, a transformer's layers), innermost containers first excluded."""
    points = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        for child, _ in module.named_children():
            full = f"{name}.{child}" if name else child
            if any(p == full or p.startswith(full + ".") for p in pruned):
                points.append(full)
    # Keep the outermost blocks only (a Sequential inside a block would double-count).
    return [p for p in points if not any(p.startswith(q + ".") for q in points if q != p)]


class _Capture:
    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(_: nn.Module, __: Any, out: Any) -> None:
            self.values[name] = out if isinstance(out, torch.Tensor) else as_outputs(out)[0]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FeatureDistillation:
    """Loader of (augmented inputs, [teacher outputs..., teacher block outputs...]) and the matching loss."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pool: torch.Tensor,
        points: Sequence[str],
        output_loss: LossFn,
        batch_size: int,
        seed: int,
    ) -> None:
        self.student, self.teacher, self.pool, self.points = student, teacher, pool, list(points)
        self.output_loss, self.batch_size = output_loss, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.student_capture = _Capture(student, self.points)
        self.teacher_capture = _Capture(teacher, self.points)
        self.outputs = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        device = next(self.teacher.parameters()).device
        while True:
            x = augment(self.pool, self.batch_size, self.generator).to(device)
            with torch.no_grad():
                outs = as_outputs(self.teacher(x))
            self.outputs = len(outs)
            feats = [self.teacher_capture.values[p] for p in self.points]
            yield x, [*outs, *feats]

    def loss(self, student: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        outs, feats = targets[: self.outputs], targets[self.outputs :]
        total = self.output_loss(student, outs)
        if not feats:
            return total
        feature = torch.zeros((), device=total.device)
        for name, t in zip(self.points, feats, strict=True):
            s = self.student_capture.values[name]
            feature = feature + ((s - t) ** 2).mean() / t.var().clamp_min(1e-12)
        return total + FEATURE_WEIGHT * feature / len(feats)

    def remove(self) -> None:
        self.student_capture.remove()
        self.teacher_capture.remove()


def stack_pool(samples: Sequence[Mapping[str, Any]], name: str) -> torch.Tensor:
    """The calibration samples' one input as a [N, C, H, W] float tensor (the augmentation pool)."""
    import numpy as np

    return torch.from_numpy(np.concatenate([s[name] for s in samples])).float()
