"""Small real-ish test models for export: two inputs (image + int64 token ids), unusual ops.

ImageTextNet embeds token ids (Embedding + LayerNorm), predicts an affine warp from them, resamples the
image with GridSample, and classifies conv features joined with the text vector: two outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 100


class ImageTextNet(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.theta = nn.Linear(dim, 6)
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.head = nn.Linear(2 * dim, classes)
        self.identity: torch.Tensor
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def forward(self, image: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.norm(self.embed(token_ids)).mean(dim=1)
        theta = self.identity + 0.1 * torch.tanh(self.theta(text)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        features = F.relu(self.conv(warped)).mean(dim=(2, 3))
        return self.head(torch.cat([features, text], dim=1)), text


class Eigen(nn.Module):
    """Uses torch.linalg.eigh, which neither ONNX exporter can translate: the export must fail cleanly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


def build() -> ImageTextNet:
    torch.manual_seed(0)
    return ImageTextNet().eval()


def build_small_vocab() -> ImageTextNet:
    """Same architecture with another vocabulary: its weights do not fit build()."""
    torch.manual_seed(1)
    return ImageTextNet(vocab=50).eval()
