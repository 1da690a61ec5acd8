"""A tiny, real conv net for the QAT tests (seeded weights, real BatchNorm statistics)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv stem (3 channels: not 2:4-eligible), a depthwise conv (ineligible), pointwise convs with a
    residual add, pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.expand = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = torch.relu(self.expand(x))
        return self.head(x.mean(dim=(2, 3)))


def tiny_net() -> TinyNet:
    """Deterministic weights: seeded init, BatchNorm statistics from one pass over smooth images."""
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    with torch.no_grad():
        for bn in (model.stem[1], model.pw[1]):
            bn.momentum = None  # cumulative average: one pass sets the statistics
        model(torch.from_numpy(tiny_data(32, seed=5)))
    return model.eval()


def tiny_data(count: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (N, 3, 16, 16) float32: neighbouring pixels correlate like photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(count, 3, 4, 4)).astype(np.float32)
    return np.ascontiguousarray(
        coarse.repeat(4, axis=2).repeat(4, axis=3)
        + 0.3 * rng.normal(size=(count, 3, 16, 16)).astype(np.float32)
    )


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The trained state a checkpoint holds at its last step (student, step sizes, Adam moments), flat."""
    state = torch.load(path, weights_only=False)
    flat = {f"student.{k}": v for k, v in state["student"].items()}
    flat.update({f"extra.{i}": v for i, v in enumerate(state["extra"])})
    for i, moments in state["optimizer"]["state"].items():
        flat.update({f"adam.{i}.{k}": v for k, v in moments.items()})
    return flat


class Interrupt(Exception):
    """Raised by ``stop_at`` to simulate an interrupted training run."""


def stop_at(step: int) -> Callable[..., None]:
    """An ``on_step`` callback that interrupts training when it reaches ``step``."""

    def stop(at: int, *_: object) -> None:
        if at == step:
            raise Interrupt

    return stop
